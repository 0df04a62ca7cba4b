"""keep_passed: webdataset over the original shards yields exactly what a filter run's scores passed."""

from __future__ import annotations

import logging
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from tasks.errors import UserError
from tasks.io.keep_passed import keep_passed, shard_identity
from tasks.io.locations import Location
from tasks.io.write import SCORES_SCHEMA, PartitionResult, write_manifest, write_scores
from tests.support.tars import Member, encode, drawn_image, shard_of_good_samples, write_tar

SCORED = "000"  # the folder of the shards the run scored; "other" holds a shard of the same name it never listed


@dataclass
class Run:
    root: Path
    output: Path
    shards: list[Path]  # the shards the run listed, in order
    unlisted: Path  # same name and keys as shards[0], in another folder
    expected: list[str]  # the keys that passed, in input order


def scores_rows(shard: str, rows: list[tuple[str | None, bool]]) -> dict[str, list]:
    """Rows in the run's schema for (key, passed) pairs of one shard."""
    return {
        "key": [key for key, _ in rows],
        "shard": [shard] * len(rows),
        "nsfw_score": [0.1 if passed else 0.9 for _, passed in rows],
        "passed": [passed for _, passed in rows],
        "filtered_by": [None if passed else "nsfw >= 0.5" for _, passed in rows],
        "error": [None] * len(rows),
        "output_shard": [None] * len(rows),
    }


def committed_scores(output: Path, index: int, rows: dict[str, list]) -> None:
    """A partition's scores file and the manifest that commits it, as the writer leaves a finished partition."""
    scores_file = output / "scores" / f"part-{index:06d}.parquet"
    write_scores(scores_file, rows)
    passed = sum(rows["passed"])
    write_manifest(str(output), PartitionResult(index, f"p{index}", sorted(set(rows["shard"])), len(rows["key"]), passed, len(rows["key"]) - passed, 0,
                                                [0] * 20, str(scores_file)))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("keep-passed")
    first = write_tar(root / "in" / SCORED / "part-000000.tar", shard_of_good_samples([f"a/{j}" for j in range(6)], size=(32, 24)))
    # b/2 comes back after b/3: webdataset yields two b/2 samples, and the run's second b/2 row did not pass
    second = write_tar(
        root / "in" / SCORED / "part-000001.tar",
        [*shard_of_good_samples(["b/0", "b/1"], size=(32, 24)), Member("b/2.jpg", encode(drawn_image(32, 24, seed=7))),
         Member("b/3.jpg", encode(drawn_image(32, 24, seed=8))), Member("b/2.txt", b"a caption after another key")],
    )
    unlisted = write_tar(root / "in" / "other" / "part-000000.tar", shard_of_good_samples([f"a/{j}" for j in range(6)], size=(32, 24)))
    output = root / "out"
    # a/5 has no row: the run never checked it
    committed_scores(output, 0, scores_rows(str(first), [("a/0", True), ("a/1", False), ("a/2", True), ("a/3", True), ("a/4", False)]))
    committed_scores(output, 1, scores_rows(str(second), [("b/0", True), ("b/1", True), ("b/2", True), ("b/3", False), ("b/2", False), (None, False)]))
    return Run(root, output, [first, second], unlisted, ["a/0", "a/2", "a/3", "b/0", "b/1"])


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}


def content(sample: dict) -> tuple[str, dict[str, bytes]]:
    return sample["__key__"], {name: value for name, value in sample.items() if not name.startswith("__")}


def passed_keys(urls: list[str], scores) -> list[str]:
    return [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False).compose(keep_passed(scores))]


def test_yields_the_passed_samples_in_order_untouched_and_counts_the_rest(run):
    seen: list[dict] = []

    def remember(samples):
        for sample in samples:
            seen.append(sample)
            yield sample

    stage = keep_passed(run.output)
    kept = list(wds.WebDataset([str(path) for path in run.shards], shardshuffle=False).compose(remember, stage))
    assert [sample["__key__"] for sample in kept] == run.expected
    assert all(any(sample is original for original in seen) for sample in kept)  # the same dicts, not copies
    members = {**tar_members(run.shards[0]), **tar_members(run.shards[1])}
    for sample in kept:
        key, data = content(sample)
        assert {f"{key}.{extension}": value for extension, value in data.items()} == {
            name: value for name, value in members.items() if name.startswith(f"{key}.")
        }
    # a/1, a/4, b/3 and both b/2 (one of its rows did not pass) did not pass; a/5 has no row
    assert (stage.counts.kept, stage.counts.not_passed, stage.counts.unknown_key, stage.counts.unknown_shard) == (5, 5, 1, 0)
    assert stage.shards == 2


def test_a_shard_the_run_never_listed_is_dropped_though_its_name_and_keys_match(run, caplog):
    stage = keep_passed(run.output)
    with caplog.at_level(logging.INFO, logger="tasks.io.keep_passed"):
        kept = list(wds.WebDataset([str(run.unlisted), str(run.shards[0])], shardshuffle=False).compose(stage))
    assert [sample["__key__"] for sample in kept] == run.expected[:3]
    assert (stage.counts.kept, stage.counts.unknown_shard) == (3, 6)
    assert "kept 3 of 12 samples" in caplog.text and "6 from shards not in the scores" in caplog.text
    assert "a/" not in caplog.text  # counts only: no key is logged


@pytest.mark.parametrize("spelling", ["file-url", "relative", "dotted", "symlink"])
def test_file_urls_relative_paths_and_symlinks_name_the_listed_shard(run, spelling, monkeypatch):
    monkeypatch.chdir(run.root)
    if spelling == "symlink" and not (run.root / "linked").exists():
        os.symlink(run.root / "in" / SCORED, run.root / "linked")
    urls = {
        "file-url": [path.as_uri() for path in run.shards],
        "relative": [os.path.relpath(path) for path in run.shards],
        "dotted": [str(path.parent / ".." / SCORED / path.name) for path in run.shards],
        "symlink": [str(run.root / "linked" / path.name) for path in run.shards],
    }[spelling]
    assert passed_keys(urls, run.output) == run.expected


def test_the_output_folder_its_scores_folder_and_a_location_all_work(run):
    urls = [str(path) for path in run.shards]
    for scores in (run.output / "scores", Location(str(run.output)), f"{run.output}/", run.output.as_uri()):
        assert passed_keys(urls, scores) == run.expected
    # a DataLoader worker receives the stage pickled
    copied = pickle.loads(pickle.dumps(keep_passed(run.output)))
    assert [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False).compose(copied)] == run.expected


def test_object_store_shards_match_as_written_without_a_trailing_slash(tmp_path):
    shard = "s3://bucket/x/part-000001.tar"
    committed_scores(tmp_path, 0, scores_rows(shard, [("k", True)]))
    stage = keep_passed(tmp_path)
    urls = [shard, "S3://bucket/x/part-000001.tar/", "s3://bucket/y/part-000001.tar", "s3://bucket/x//part-000001.tar", "part-000001.tar"]
    samples = [{"__key__": "k", "__url__": url, "jpg": b"\xff\xd8"} for url in urls]
    assert list(stage(iter(samples))) == samples[:2]
    assert stage.counts.unknown_shard == 3
    assert shard_identity("file:///data/a%20b/x.tar") == os.path.realpath("/data/a b/x.tar")  # as webdataset opens it


def test_scores_no_manifest_commits_are_not_trusted(tmp_path):
    committed_scores(tmp_path, 0, scores_rows("/data/a.tar", [("k", True)]))
    write_scores(tmp_path / "scores" / "part-000001.parquet", scores_rows("/data/b.tar", [("k", True)]))  # a stopped partition
    stage = keep_passed(tmp_path)
    samples = [{"__key__": "k", "__url__": url} for url in ("/data/a.tar", "/data/b.tar")]
    assert list(stage(iter(samples))) == samples[:1] and stage.incomplete_partitions == 1 and stage.counts.unknown_shard == 1


def _write_bad(scores: Path, case: str) -> Path:
    scores.mkdir(parents=True)
    good = {name: pa.array(values, type=SCORES_SCHEMA.field(name).type) for name, values in scores_rows("/x.tar", [("k", True)]).items()}
    pq.write_table(pa.table(good), scores / "part-000000.parquet")
    bad = scores / "part-000001.parquet"
    if case == "no passed column":
        pq.write_table(pa.table({name: good[name] for name in ("key", "shard")}), bad)
    elif case == "passed as text":
        pq.write_table(pa.table({**good, "passed": pa.array(["yes"])}), bad)
    elif case == "numeric keys":
        pq.write_table(pa.table({**good, "key": pa.array([np.int64(1)])}), bad)
    elif case == "not parquet":
        bad.write_bytes(b"PAR1 this is not a Parquet file")
    return bad


@pytest.mark.parametrize(
    "case, sentence",
    [
        ("no passed column", "has no column passed; pass the output_path of an nsfw-filter run"),
        ("passed as text", "has column passed of type string where bool is expected"),
        ("numeric keys", "has column key of type int64 where string is expected"),
        ("not parquet", "is not a readable Parquet file"),
    ],
)
def test_a_bad_scores_file_is_one_sentence_naming_it(tmp_path, case, sentence):
    bad = _write_bad(tmp_path / "out" / "scores", case)
    with pytest.raises(UserError) as raised:
        keep_passed(tmp_path / "out")
    message = str(raised.value)
    assert message.startswith(f"scores file {bad} ") and sentence in message
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0


def test_a_folder_without_scores_is_one_sentence(tmp_path):
    (tmp_path / "empty" / "scores").mkdir(parents=True)
    (tmp_path / "empty" / "scores" / ".part-000000.parquet.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"")
    with pytest.raises(UserError, match=r"^.*empty/scores holds no scores file \(part-NNNNNN\.parquet\); pass the output_path"):
        keep_passed(tmp_path / "empty")
    with pytest.raises(UserError, match=r"^.*nowhere does not exist or is not a folder; pass the output_path of an nsfw-filter run"):
        keep_passed(tmp_path / "nowhere")


def test_over_the_original_shards_it_yields_the_real_runs_filtered_shards_byte_for_byte(tmp_path, tiny_clip_768, laion_dir, prefect_api):
    from flows.nsfw_filter import nsfw_filter
    from tests.support.filter_parameters import local_filter_parameters

    shards = [
        str(write_tar(tmp_path / "in" / f"part-{s:06d}.tar", shard_of_good_samples([f"{s:03d}/{j:04d}" for j in range(4)], size=(64, 48))))
        for s in range(3)
    ]
    parameters = local_filter_parameters(tmp_path, tiny_clip_768, laion_dir, files_per_partition=2, images_per_tar=3)
    nsfw_filter(**parameters)
    # a threshold between the middle scores, so both sides are exercised (the re-run reuses the embeddings)
    scores = sorted(pq.read_table(tmp_path / "out" / "scores").column("nsfw_score").to_pylist())
    nsfw_filter(**parameters, score_threshold=float(np.float32((scores[5] + scores[6]) / 2)))
    kept = [content(sample) for sample in wds.WebDataset(shards, shardshuffle=False).compose(keep_passed(tmp_path / "out"))]
    filtered = sorted(str(path) for path in (tmp_path / "out" / "shards").glob("*.tar"))
    assert kept == [content(sample) for sample in wds.WebDataset(filtered, shardshuffle=False)]
    assert 0 < len(kept) < 12
