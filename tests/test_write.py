"""Output writing: filtered shards byte for byte, scores rows, manifests, stale-file cleanup, S3."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.io.write import (
    FilteredShardWriter,
    RunSummary,
    ScoredRow,
    read_manifest,
    write_filtered_partition,
)
from tasks.signals.plan import SignalPlan
from tasks.signals.schema import default_policy
from tasks.signals.scoring import filtered_by


@dataclass
class FakeSample:  # a plain record of the reader's shape; the code under test is the writer
    key: str | None
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)


def write_nsfw(output, index, partition_id, shards, triples, threshold, images_per_tar, **kwargs):
    """The writer fed (sample, nsfw_score, error) triples under the default policy (drop nsfw_score >= threshold)."""
    policy = default_policy(threshold)

    def rows():
        for sample, score, error in triples:
            verdict = filtered_by(policy, {"nsfw": np.array([score], dtype=np.float32)}, {}, 1)[0]
            yield sample, ScoredRow({"nsfw_score": float(score)}, verdict, error)

    return write_filtered_partition(output, index, partition_id, shards, rows(), SignalPlan(policy=policy).scored(), images_per_tar, **kwargs)


def make_samples(n: int, shard: str = "in/a.tar") -> list[FakeSample]:
    rng = np.random.default_rng(0)
    return [
        FakeSample(f"dir/{i:05d}", shard, {"jpg": rng.bytes(100 + i), "txt": f"caption {i}".encode(), "json": b'{"i": %d}' % i})
        for i in range(n)
    ]


def read_tar(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_writer_rotates_and_keeps_members_byte_for_byte(tmp_path):
    samples = make_samples(7)
    with FilteredShardWriter(str(tmp_path), 3, images_per_tar=3) as writer:
        targets = [writer.add(s) for s in samples]
    assert [t.rsplit("/", 1)[1] for t in writer.written] == ["part-000003-0000.tar", "part-000003-0001.tar", "part-000003-0002.tar"]
    assert targets == [writer.written[i // 3] for i in range(7)]
    members = [m for url in writer.written for m in read_tar(url)]
    expected = [(f"{s.key}.{ext}", data) for s in samples for ext, data in s.members.items()]
    assert members == expected
    assert not list(tmp_path.rglob("*.tmp"))


def test_partition_outputs_scores_and_manifest(tmp_path):
    samples = make_samples(10) + [FakeSample(None, "in/a.tar")]
    scores = [0.1, 0.9, 0.5, 0.49999, float("nan"), 0.2, 0.0, 1.0, 0.3, 0.7, float("nan")]
    errors = [None, None, None, None, "image is truncated", None, None, None, None, None, "tar is truncated after 10 samples"]
    out = str(tmp_path / "out")
    result = write_nsfw(out, 0, "pid", ["in/a.tar"], zip(samples, scores, errors), 0.5, 2)
    table = pq.read_table(result.scores_file)
    assert table.schema.field("nsfw_score").type == pa.float32()
    frame = table.to_pydict()
    assert frame["key"] == [s.key for s in samples]
    assert frame["passed"] == [True, False, False, True, False, True, True, False, True, False, False]
    assert frame["error"][4] == "image is truncated" and frame["nsfw_score"][4] is None
    assert frame["nsfw_score"][10] is None and frame["error"][10].startswith("tar is truncated")
    passed_keys = [s.key for s, p in zip(samples, frame["passed"]) if p]
    written = [name.rsplit(".", 1)[0] for url in result.output_shards for name, _ in read_tar(url)]
    assert sorted(set(written)) == sorted(passed_keys)
    assert (result.samples, result.passed, result.filtered, result.errors) == (11, 5, 4, 2)
    assert sum(result.histogram) == 9
    assert read_manifest(out, 0) == result


def test_rerun_with_fewer_outputs_removes_stale_shards(tmp_path):
    out = str(tmp_path / "out")
    samples = make_samples(6)
    first = write_nsfw(out, 1, "p", ["a"], [(s, 0.0, None) for s in samples], 0.5, 2)
    assert len(first.output_shards) == 3
    second = write_nsfw(out, 1, "p", ["a"], [(s, 0.0 if i < 2 else 0.9, None) for i, s in enumerate(samples)], 0.5, 2)
    assert len(second.output_shards) == 1
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["part-000001-0000.tar"]


def test_failure_midway_leaves_no_partial_file_and_no_manifest(tmp_path):
    out = tmp_path / "out"

    def broken_samples():
        for sample in make_samples(3):
            yield sample, 0.0, None
        raise OSError("connection reset while reading the shard")

    with pytest.raises(OSError, match="connection reset"):
        write_nsfw(str(out), 0, "p", ["a"], broken_samples(), 0.5, 2)
    assert read_manifest(str(out), 0) is None
    assert not list(out.rglob("*.tmp"))
    for path in out.rglob("*.tar"):  # completed shards are whole tars
        assert len(read_tar(path)) == 6


def test_summary_and_histogram(tmp_path):
    out = str(tmp_path / "out")
    r0 = write_nsfw(out, 0, "p0", ["a"], zip(make_samples(4), [0.05, 0.55, 0.95, 0.51], [None] * 4), 0.5, 10)
    r1 = write_nsfw(out, 1, "p1", ["b"], zip(make_samples(2, "b"), [0.02, float("nan")], [None, "bad"]), 0.5, 10)
    summary = RunSummary.from_partitions([r0, r1], 0.5, {"clip": "ViT-L-14"}, out)
    url = summary.write()
    with open(url) as fh:
        data = json.load(fh)
    assert (data["samples"], data["passed"], data["filtered"], data["errors"]) == (6, 2, 3, 1)
    assert data["histogram"][0] == 1 and data["histogram"][1] == 1 and data["histogram"][10] == 1 and data["histogram"][11] == 1 and data["histogram"][19] == 1
    assert "← threshold" in summary.histogram_markdown().splitlines()[12]


def test_outputs_on_s3(s3_bucket):
    import s3fs

    out = f"s3://{s3_bucket}/run"
    result = write_nsfw(out, 0, "p", ["a"], [(s, 0.1, None) for s in make_samples(5)], 0.5, 2)
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert sorted(fs.ls(f"{s3_bucket}/run/shards")) == sorted(u[len("s3://"):] for u in result.output_shards)
    assert read_manifest(out, 0) == result
    with fs.open(result.scores_file) as fh:
        assert pd.read_parquet(fh)["passed"].all()


def user_files(root) -> dict[str, bytes]:
    """Files a user keeps in an output folder: none of them is the project's to delete."""
    files = {
        "notes.tmp": b"my notes",
        ".x.tmp": b"hidden",
        "shards/part-abcdef.tar": b"not ours",
        "shards/part-999999.tar": b"not ours either",
        "shards/.notes.tmp": b"hidden notes",
        "shards/.part-000000-0000.tar.tmp": b"no uuid: not a temp file of ours",
        "scores/extra.parquet": b"someone's table",
        "elsewhere/.part-000000.parquet.0123456789abcdef0123456789abcdef.tmp": b"not next to our names",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_cleanup_touches_only_the_files_this_project_writes(tmp_path):
    from tasks.io.write import remove_leftover_temp_files

    out = tmp_path / "out[1]*?"  # glob characters in the path disable nothing
    kept = user_files(out)
    killed = ["shards/.part-000000-0001.tar.0123456789abcdef0123456789abcdef.tmp", ".summary.json.fedcba9876543210fedcba9876543210.tmp",
              "scores/.part-000003.parquet.00000000000000000000000000000000.tmp"]
    for name in killed:
        (out / name).write_bytes(b"partial")
    samples = make_samples(6)
    first = write_nsfw(str(out), 0, "p", ["a"], [(s, 0.0, None) for s in samples], 0.5, 2)
    assert len(first.output_shards) == 3
    second = write_nsfw(str(out), 0, "p", ["a"], [(s, 0.9, None) for s in samples], 0.5, 2, earlier=first)
    assert second.output_shards == []
    removed = remove_leftover_temp_files(str(out))
    assert sorted(removed) == sorted(str(out / name) for name in killed)
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == set(kept) | {"scores/part-000000.parquet", "_manifests/part-000000.json"}
    assert all((out / name).read_bytes() == data for name, data in kept.items())


def test_rerun_removes_tars_of_a_killed_attempt_without_a_manifest(tmp_path):
    out = str(tmp_path / "out")
    samples = make_samples(6)
    completed = write_nsfw(out, 2, "p", ["a"], [(s, 0.0, None) for s in samples[:4]], 0.5, 2)
    assert len(completed.output_shards) == 2
    # a killed attempt wrote five tars in sequence and died before its manifest
    with FilteredShardWriter(out, 2, images_per_tar=1) as writer:
        for sample in samples[:5]:
            writer.add(sample)
    assert read_manifest(out, 2) == completed
    third = write_nsfw(out, 2, "p", ["a"], [(s, 0.0 if i == 0 else 0.9, None) for i, s in enumerate(samples)], 0.5, 2,
                                     earlier=completed)
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["part-000002-0000.tar"]
    assert read_tar(third.output_shards[0]) == [(f"{samples[0].key}.{ext}", data) for ext, data in samples[0].members.items()]


def test_a_manifest_of_the_wrong_shape_is_no_manifest(tmp_path):
    out = tmp_path / "out"
    result = write_nsfw(str(out), 0, "p", ["a"], [(s, 0.0, None) for s in make_samples(2)], 0.5, 2)
    manifest = out / "_manifests" / "part-000000.json"
    good = json.loads(manifest.read_text())
    for bad in ({**good, "output_shards": "shards/part-000000-0000.tar"}, {**good, "samples": "2"}, {**good, "extra": 1}, [good], "[" * 100000):
        manifest.write_text(bad if isinstance(bad, str) else json.dumps(bad))
        assert read_manifest(str(out), 0) is None
    manifest.write_text(json.dumps(good))
    assert read_manifest(str(out), 0) == result


def test_tars_the_previous_manifest_names_past_a_gap_are_removed(tmp_path):
    out = str(tmp_path / "out")
    samples = make_samples(4)
    first = write_nsfw(out, 0, "p", ["a"], [(s, 0.0, None) for s in samples], 0.5, 1)
    (tmp_path / "out" / "shards" / "part-000000-0001.tar").unlink()  # a hole the sequence stops at
    write_nsfw(out, 0, "p", ["a"], [(s, 0.0 if i == 0 else 0.9, None) for i, s in enumerate(samples)], 0.5, 1, earlier=first)
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["part-000000-0000.tar"]


def test_a_sample_with_images_nobody_scored_never_passes(tmp_path):
    # One image per sample is scored; a passing sample's other image members would reach the filtered dataset
    # unscored, so such a sample keeps its score and its row but stays out, with the reason in `error`.
    samples = [
        FakeSample("one", "in/a.tar", {"jpg": b"a", "txt": b"caption", "json": b"{}"}),
        FakeSample("two", "in/a.tar", {"left.jpg": b"l", "right.jpg": b"r"}),
        FakeSample("mask", "in/a.tar", {"jpg": b"j", "seg.PNG": b"m"}),
        FakeSample("odd", "in/a.tar", {"jpg": b"j", "heic": b"h"}),
        FakeSample("high", "in/a.tar", {"jpg": b"j", "png": b"p"}),
    ]
    scores = [0.1, 0.1, 0.2, 0.3, 0.9]
    result = write_nsfw(str(tmp_path / "out"), 0, "pid", ["in/a.tar"], zip(samples, scores, [None] * 5), 0.5, 10)
    frame = pq.read_table(result.scores_file).to_pydict()
    assert frame["passed"] == [True, False, False, False, False]
    assert frame["nsfw_score"] == pytest.approx(scores)
    assert frame["error"][0] is None and frame["error"][4] is None  # filtered by its score: no other reason needed
    assert frame["error"][1] == "2 image members; only 'left.jpg' was scored, so the sample is kept out of the filtered dataset (unscored: 'right.jpg')"
    assert frame["error"][2].endswith("(unscored: 'seg.PNG')") and frame["error"][3].endswith("(unscored: 'heic')")
    assert [name for url in result.output_shards for name, _ in read_tar(url)] == ["one.jpg", "one.txt", "one.json"]
    assert (result.passed, result.filtered, result.errors) == (1, 1, 3)
