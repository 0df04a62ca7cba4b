"""What the nsfw-filter flow guarantees, each shown so that breaking it fails a test.

Real tars, a tiny random-weight open_clip model, the real LAION ViT-L/14 head, a real Prefect API and, for
credentials, moto's S3 server. Every check compares against an independent reference (open_clip's own
pipeline, the file system's inodes, the objects in the bucket, the API's records), never the code under test.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from safetensors.numpy import load_file, save_file

from tasks.models.nsfw import load_nsfw_head
from tests.support.tars import shard_of_good_samples, write_tar
from tests.support.tiny_clip import open_clip_reference
from tests.test_flow_filter import (
    Dataset,
    build_dataset,
    check_outputs,
    flow_run_task_run_counts,
    flow_run_task_states,
    read_artifacts,
    read_scores,
    run_filter,
    upload_dir,
)

pytestmark = pytest.mark.usefixtures("prefect_api")

# Float32 batching in CLIP and the head moves a score by about 2e-6 of its value (random-weight CLIP
# scores sit near 1e-4, so the tolerance is relative); a key scored on another key's image is off by far more
# (checked in the test, so the tolerance cannot hide a swap).
SCORE_RTOL = 1e-4


def decoded(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def test_each_key_is_scored_by_the_head_on_its_own_image(tmp_path, tiny_clip_768, laion_dir):
    dataset = build_dataset(tmp_path, good_shards=3, per_shard=5)
    # 5 shards in 3 partitions; batches that cut across samples and shards
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, files_per_partition=2, task_batch_size=3, model_inference_batch_size=4)
    scores = read_scores(tmp_path / "out")
    score_of = {(shard, key): (nsfw_score, error) for shard, key, nsfw_score, error in zip(scores["shard"], scores["key"], scores["nsfw_score"], scores["error"])}
    # every sample whose only image member is a plain JPEG (the good shards and the readable part of the truncated one)
    checked: list[tuple[str, str]] = []
    images: list[Image.Image] = []
    for shard, samples in dataset.samples.items():
        if Path(shard).name == dataset.bad_shard_name:
            continue
        for key, members in samples:
            if (shard, key) not in score_of:
                continue  # past the damage of the truncated shard
            checked.append((shard, key))
            images.append(decoded(members[f"{key}.jpg"]))
    assert len(checked) == 3 * 5 + 3
    assert all(score_of[item][1] is None for item in checked), [score_of[item] for item in checked]
    expected = load_nsfw_head(str(laion_dir / "vit_l_14.safetensors")).score(open_clip_reference(*tiny_clip_768, images)).nsfw_score
    actual = np.array([score_of[item][0] for item in checked], dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=SCORE_RTOL, atol=0)
    # neighbouring samples score differently enough that any mix-up of keys would exceed the tolerance
    for first, second in zip(checked, checked[1:]):
        if first[0] == second[0]:
            assert abs(score_of[first][0] / score_of[second][0] - 1) > 10 * SCORE_RTOL, (first, second)


def file_stats(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under root, by relative path."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def of_partition(stats: dict[str, tuple[int, int]], index: int) -> dict[str, tuple[int, int]]:
    stem = f"part-{index:06d}"
    return {path: stat for path, stat in stats.items() if Path(path).name.startswith((stem + ".", stem + "-"))}


def changed_head(laion_dir: Path, path: Path) -> Path:
    """The LAION head with its output bias moved a little: another head file, scores shifted slightly."""
    tensors = load_file(str(laion_dir / "vit_l_14.safetensors"))
    bias = sorted(name for name in tensors if name.endswith("bias"))[-1]
    tensors[bias] = tensors[bias] + np.float32(0.25)
    save_file(tensors, str(path))
    return path


def test_resume_keeps_finished_partitions_and_removes_what_earlier_attempts_left(tmp_path, tiny_clip_768, laion_dir):
    dataset = build_dataset(tmp_path, good_shards=3, per_shard=5)  # 5 shards: 3 good, 1 of bad cases, 1 truncated
    extra = write_tar(dataset.input_dir / "part-000005.tar", shard_of_good_samples([f"x/{j:04d}" for j in range(4)], size=(96, 72)))
    out = tmp_path / "out"
    settings = dict(files_per_partition=1, images_per_tar=2, score_threshold=1.0)
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, **settings)
    assert of_partition(file_stats(out), 5), "the extra shard should have its own partition"

    # The dataset loses its last shard, and an earlier attempt (one sample per tar) was killed while writing
    # partition 1: no manifest, a temp file beside its outputs, and finished tars beyond those the next attempt writes.
    extra.unlink()
    (out / "_manifests" / "part-000001.json").unlink()
    planted = [out / "shards" / f".part-000001-0000.tar.{uuid.uuid4().hex}.tmp", out / "scores" / f".part-000001.parquet.{uuid.uuid4().hex}.tmp"]
    for path in planted:
        path.write_bytes(b"half-written")
    leftover_tars = [out / "shards" / f"part-000001-{n:04d}.tar" for n in (3, 4)]  # 5 samples at 2 per tar: 0000-0002 are rewritten
    for path in leftover_tars:
        path.write_bytes((out / "shards" / "part-000001-0000.tar").read_bytes())
    before = file_stats(out)
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, **settings)
    after = file_stats(out)

    for index in (0, 2, 3, 4):  # finished partitions are kept as they were: same files, same inodes, same mtimes
        assert of_partition(before, index) and of_partition(after, index) == of_partition(before, index), index
    assert of_partition(after, 1) and [path for path in of_partition(after, 1) if after[path] == before.get(path)] == []  # redone
    assert not of_partition(after, 5)  # the partition of the shard that left the dataset is gone
    assert not [path for path in planted + leftover_tars if path.exists()]
    check_outputs(dataset, out, 1.0)
    assert json.loads((out / "summary.json").read_text())["partitions"] == 5

    # Changing what a partition's outputs depend on redoes every partition: images_per_tar, then the head.
    for change in (dict(images_per_tar=3), dict(images_per_tar=3, nsfw_weights=str(changed_head(laion_dir, tmp_path / "head.safetensors")))):
        before = file_stats(out)
        run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, **{**settings, **change})
        after = file_stats(out)
        for index in range(5):
            assert of_partition(after, index) and all(after[path] != before.get(path) for path in of_partition(after, index)), (change, index)
        check_outputs(dataset, out, 1.0)
    manifest = json.loads((out / "_manifests" / "part-000000.json").read_text())
    assert [Path(url).name for url in manifest["output_shards"]] == ["part-000000-0000.tar", "part-000000-0001.tar"]  # 5 samples, 3 per tar


def test_deleted_store_entry_is_recomputed_although_prefect_remembers_it(tmp_path, tiny_clip_768, laion_dir):
    dataset = build_dataset(tmp_path, good_shards=2)  # 4 shards, one partition each
    first = run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, files_per_partition=1, return_state=True)
    assert flow_run_task_states(first.state_details.flow_run_id)["embed"] == ["Completed"] * 4
    first_scores = read_scores(tmp_path / "out")
    entries = sorted((tmp_path / "cache").rglob("part-000001-*.parquet"))
    assert len(entries) == 1
    entries[0].unlink()
    (tmp_path / "out" / "_manifests" / "part-000001.json").unlink()  # so the filter stage reads the store again

    second = run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, files_per_partition=1, return_state=True)
    assert second.is_completed()
    assert sorted(flow_run_task_states(second.state_details.flow_run_id)["embed"]) == ["Cached"] * 3 + ["Completed"]
    assert [p.name for p in (tmp_path / "cache").rglob("part-000001-*.parquet")] == [entries[0].name]
    check_outputs(dataset, tmp_path / "out", 0.5)
    second_scores = read_scores(tmp_path / "out")
    assert second_scores["key"] == first_scores["key"]
    np.testing.assert_allclose(np.array(second_scores["nsfw_score"], dtype=float), np.array(first_scores["nsfw_score"], dtype=float), atol=1e-6)


def flow_run_logs(flow_run_id) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return [log.message for log in logs]


def test_secret_block_credentials_reach_no_output_record_artifact_or_log(tmp_path, s3_bucket, s3_endpoint, tiny_clip_768, laion_dir, monkeypatch):
    import s3fs
    from prefect.blocks.system import Secret

    dataset = build_dataset(tmp_path, good_shards=1)
    upload_dir(s3fs.S3FileSystem(), dataset.input_dir, f"{s3_bucket}/in")
    access_key, secret_key = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"s3cr3t-{uuid.uuid4().hex}"
    block_name = f"storage-{uuid.uuid4().hex[:8]}"
    Secret(value={"key": access_key, "secret": secret_key, "client_kwargs": {"endpoint_url": s3_endpoint}}).save(block_name)
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)  # the block is the only source of credentials and endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    remote = Dataset(dataset.input_dir, {f"s3://{s3_bucket}/in/{Path(url).name}": keys for url, keys in dataset.keys.items()},
                     {f"s3://{s3_bucket}/in/{Path(url).name}": samples for url, samples in dataset.samples.items()}, dataset.bad_shard_name)
    state = run_filter(remote, tiny_clip_768, laion_dir, tmp_path, file_paths=f"s3://{s3_bucket}/in", output_path=f"s3://{s3_bucket}/out",
                       cache_path=f"s3://{s3_bucket}/cache", storage_options_secret=block_name, review_samples=4, return_state=True)
    assert state.is_completed()

    fs = s3fs.S3FileSystem(key=access_key, secret=secret_key, client_kwargs={"endpoint_url": s3_endpoint})
    written = [path for path in fs.find(s3_bucket) if not path.startswith(f"{s3_bucket}/in/")]
    folders = {path.split("/")[1] for path in written}
    assert {"out", "cache"} <= folders
    assert any("/_manifests/" in p for p in written) and any("/review/" in p for p in written)
    fs.get(f"{s3_bucket}/out", str(tmp_path / "downloaded"), recursive=True)
    check_outputs(remote, tmp_path / "downloaded", 0.5)
    for path in written:  # outputs, manifests, summary, review sheet, store entries, Prefect's cache records
        data = fs.cat_file(path)
        assert secret_key.encode() not in data and access_key.encode() not in data, path
    records = [json.dumps(artifact.model_dump(mode="json")) for artifact in read_artifacts(state.state_details.flow_run_id).values()]
    logs = flow_run_logs(state.state_details.flow_run_id)
    assert records and logs
    for text in records + logs:
        assert secret_key not in text and access_key not in text, text
    s3fs.S3FileSystem.clear_instance_cache()


def flow_run_cli(tmp_path: Path, dataset: Dataset, tiny_clip, laion_dir: Path, prefect_api: str, *options: str) -> subprocess.CompletedProcess:
    config_path, checkpoint_path = tiny_clip
    command = [sys.executable, "-m", "flows.cli", "filter", "--file-paths", str(dataset.input_dir), "--output-path", str(tmp_path / "out"),
               "--clip-model", str(config_path), "--clip-pretrained", str(checkpoint_path), "--nsfw-weights", str(laion_dir / "vit_l_14.safetensors"),
               "--cache-path", str(tmp_path / "cache"), *options]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "PREFECT_API_URL": prefect_api})


def test_missing_secret_block_exits_2_with_one_sentence(tmp_path, tiny_clip_768, laion_dir, prefect_api):
    dataset = build_dataset(tmp_path, good_shards=1)
    done = flow_run_cli(tmp_path, dataset, tiny_clip_768, laion_dir, prefect_api, "--storage-options-secret", "no-such-block")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == (
        "nsfw-curator: error: Prefect Secret block 'no-such-block' was not found; create it with the storage options as JSON."
    )
    assert not (tmp_path / "out").exists()


def test_user_error_inside_a_task_is_not_retried_and_the_cli_exits_1(tmp_path, tiny_clip_768, laion_dir, prefect_api, s3_endpoint):
    from prefect import get_client

    dataset = build_dataset(tmp_path, good_shards=1)
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"  # the run is planned; the first store write finds the bucket missing
    # a later --cache-path overrides flow_run_cli's
    done = flow_run_cli(tmp_path, dataset, tiny_clip_768, laion_dir, prefect_api, "--cache-path", f"s3://{bucket}/cache", "--files-per-partition", "3")
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("nsfw-curator: the run failed:") and bucket in last_line, last_line
    with get_client(sync_client=True) as client:
        runs = [run for run in client.read_flow_runs(limit=200) if run.parameters.get("cache_path") == f"s3://{bucket}/cache"]
    assert len(runs) == 1 and runs[0].state.is_failed()
    counts = flow_run_task_run_counts(runs[0].id)
    assert counts and all(count == 1 for count in counts), counts  # a UserError is final: no retry


@pytest.fixture()
def full_disk(tmp_path):
    """A 16 KiB tmpfs: the first store entry does not fit."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the full-disk check needs root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_cache_disk_fails_the_run_at_once_with_one_sentence(tmp_path, tiny_clip_768, laion_dir, prefect_api, full_disk):
    from prefect import get_client

    dataset = build_dataset(tmp_path, good_shards=1)
    cache = full_disk / "cache"
    done = flow_run_cli(tmp_path, dataset, tiny_clip_768, laion_dir, prefect_api, "--cache-path", str(cache), "--files-per-partition", "3")
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"nsfw-curator: the run failed: UserError: No space left to write {cache}/"), last_line
    assert not [p for p in full_disk.rglob("*") if p.is_file()]  # no half-written entry or temp file stays behind
    with get_client(sync_client=True) as client:
        runs = [run for run in client.read_flow_runs(limit=200) if run.parameters.get("cache_path") == str(cache)]
    assert len(runs) == 1 and runs[0].state.is_failed()
    # Listing, reading, then the embedding task that hit the full disk: each ran once, none retried (not a hiccup).
    assert flow_run_task_run_counts(runs[0].id) == [1, 1, 1]
