"""Hostile samples cost only their own row: each becomes a one-sentence error and its neighbours are scored.

Every case here once failed a whole shard (and, retried three times, the whole run) or took the machine's
memory: a 1x100000 PNG (open_clip's resize asks for ~15 GB), a `.json` of 100,000 `[` (RecursionError),
a JSON number of 5,000 digits (ValueError), members far beyond any real sample (memory), and 40,000
members in one sample (quadratic time). The reading and the flow run in a child process under an
address-space limit (RLIMIT_AS) set just above what the child holds once its imports are done, so a
regression fails the test instead of swapping the machine; the child's own timeout bounds the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support.tars import (
    Member,
    ZeroMember,
    deeply_nested_json,
    drawn_image,
    encode,
    good_sample_members,
    long_number_json,
    many_members_sample,
    wide_png,
    write_tar_with_holes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 300

# Run first in the child: its imports, then the address-space limit (what it holds now + headroom).
_LIMIT_PRELUDE = """
import json, os, resource, sys
{imports}
def _held_address_space():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
_limit = _held_address_space() + {headroom} + (16 << 20) * len(os.sched_getaffinity(0))  # a thread stack per core
resource.setrlimit(resource.RLIMIT_AS, (_limit, _limit))
"""


def run_limited(code: str, imports: str, headroom: int, **env: str) -> object:
    """Run `code` in a child Python under RLIMIT_AS = (its size after `imports`) + `headroom`; its last stdout line is JSON."""
    child_env = {
        **os.environ,
        # glibc reserves 64 MiB of address space per thread arena, and OpenMP a stack per core: keep both
        # small so the limit measures the data, not the machine's core count.
        "MALLOC_ARENA_MAX": "2",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
        **env,
    }
    prelude = _LIMIT_PRELUDE.format(imports=imports, headroom=headroom)
    done = subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=REPO_ROOT, env=child_env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )
    assert done.returncode == 0, f"the child failed under the address-space limit:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def jpeg(seed: int) -> bytes:
    return encode(drawn_image(48, 36, seed=seed), "JPEG")


# Each hostile sample's key -> the error it must carry (the whole sentence). The 1 x 100000 image "wide" is
# hostile only to a naive resize: it is read and scored (tasks/models/bounded_transform.py) within the same limit.
HOSTILE_ERRORS = {
    "deep": "member 'deep.json' nests JSON deeper than 128 levels",
    "number": "member 'number.json' holds a number of 5000 characters, over the limit of 100",
    "huge": f"the sample's members pass the {256 << 20}-byte read limit at member 'huge.m00'",
}


def hostile_shard_members(huge_member_bytes: int) -> list:
    """Good samples around each hostile one, in one shard: wide image, deep JSON, long number, a huge member."""
    return [
        *good_sample_members("good-0", seed=0),
        Member("wide.png", wide_png()),
        Member("wide.txt", b"a 1 x 100000 PNG"),
        *good_sample_members("good-1", seed=1),
        Member("deep.jpg", jpeg(2)),
        Member("deep.json", deeply_nested_json()),
        *good_sample_members("good-2", seed=3),
        Member("number.jpg", jpeg(4)),
        Member("number.json", long_number_json()),
        *good_sample_members("good-3", seed=5),
        Member("huge.jpg", jpeg(6)),
        ZeroMember("huge.m00", huge_member_bytes),  # zeros, over the 256 MiB sample budget on its own
        Member("huge.txt", b"never held: the budget was passed before it"),
        *good_sample_members("good-4", seed=7),
    ]


EXPECTED_KEYS = ["good-0", "wide", "good-1", "deep", "good-2", "number", "good-3", "huge", "good-4"]


# Measured beyond the imports: the reader child holds ~140 MiB (two decode threads, small images), the flow
# ~1.5 GiB (CLIP, the head, Prefect's threads); a held 257-320 MiB member would not fit the reader's headroom.
READER_HEADROOM = 256 << 20
FLOW_HEADROOM = 2048 << 20
READ_ROWS = """
rows = []
for batch in iter_batches({shards!r}, task_batch_size=4, threads=2):
    rows += [[s.key, s.error, None if s.image is None else list(s.image.size), list(s.members)] for s in batch]
print(json.dumps(rows))
"""


def read_limited(shards: list[Path]) -> dict[str, tuple]:
    """key -> (error, image size, member extensions) of every sample, read by `iter_batches` in a child under the limit."""
    code = READ_ROWS.format(shards=[str(path) for path in shards])
    rows = run_limited(code, imports="from tasks.io.read import iter_batches", headroom=READER_HEADROOM)
    assert len({key for key, *_ in rows}) == len(rows)
    return {key: tuple(rest) for key, *rest in rows}


def test_hostile_samples_are_error_rows_while_reading_under_a_memory_limit(tmp_path):
    # A 320 MiB member is over the 256 MiB sample budget and over the child's headroom: holding it (as the
    # former 1 GiB member limit allowed) fails the child instead of passing.
    hostile = write_tar_with_holes(tmp_path / "hostile.tar", hostile_shard_members(320 << 20))
    samples = read_limited([hostile])
    assert list(samples) == EXPECTED_KEYS
    for key, (error, size, members) in samples.items():
        if key.startswith("good"):
            assert error is None and size == [320, 240] and members == ["jpg", "txt", "json"], key
        elif key == "wide":
            assert error is None and size == [1, 100_000] and members == ["png", "txt"], key
        else:
            assert error == HOSTILE_ERRORS[key] and size is None, key
    assert samples["huge"][2] == ["jpg"]  # the members from the one over the budget on were never held


def test_forty_thousand_members_in_one_sample_are_read_in_linear_time(tmp_path):
    # Checking each member against the sample's others once took 239 s here (quadratic); now it is a set lookup.
    many = write_tar_with_holes(tmp_path / "many.tar", [*good_sample_members("before"), *many_members_sample("many"), *good_sample_members("after", seed=1)])
    samples = read_limited([many])
    assert list(samples) == ["before", "many", "after"]
    error, size, members = samples["many"]
    assert error is None and size == [64, 48] and len(members) == 40_002 and members[-1] == "m039999"
    assert samples["before"][0] is None and samples["after"][0] is None


@pytest.mark.usefixtures("prefect_api")
def test_flow_scores_the_neighbours_of_hostile_samples_and_records_their_errors(tmp_path, tiny_clip_768, laion_dir, prefect_api):
    input_dir = tmp_path / "in"
    write_tar_with_holes(input_dir / "part-000000.tar", hostile_shard_members((256 << 20) + 1))
    write_tar_with_holes(input_dir / "part-000001.tar", [*good_sample_members("next-0", seed=8), *good_sample_members("next-1", seed=9)])
    config_path, checkpoint_path = tiny_clip_768
    parameters = dict(
        file_paths=str(input_dir),
        output_path=str(tmp_path / "out"),
        files_per_partition=2,
        task_batch_size=4,
        clip_model=str(config_path),
        clip_pretrained=str(checkpoint_path),
        nsfw_weights=str(laion_dir / "vit_l_14.safetensors"),
        cache_path=str(tmp_path / "cache"),
        images_per_tar=3,
        model_dir=str(tmp_path / "models"),
        max_workers=1,
    )
    code = f"print(json.dumps(nsfw_filter(**{parameters!r})))"
    summary = run_limited(code, imports="from flows.nsfw_filter import nsfw_filter", headroom=FLOW_HEADROOM, PREFECT_API_URL=prefect_api)
    scores = pq.read_table(tmp_path / "out" / "scores").to_pydict()
    rows = {(shard.rsplit("/", 1)[-1], key): (score, error) for shard, key, score, error in zip(scores["shard"], scores["key"], scores["nsfw_score"], scores["error"])}
    expected = [("part-000000.tar", key) for key in EXPECTED_KEYS] + [("part-000001.tar", "next-0"), ("part-000001.tar", "next-1")]
    assert list(rows) == expected  # one row per sample, in input order
    for (_, key), (score, error) in rows.items():
        if key in HOSTILE_ERRORS:
            assert error == HOSTILE_ERRORS[key] and score is None, key
        else:
            assert error is None and 0.0 <= score <= 1.0, key
    assert summary["samples"] == len(expected) and summary["errors"] == len(HOSTILE_ERRORS)
