"""End-to-end: the nsfw-filter flow on real tars, a tiny random CLIP, the real LAION ViT-L/14 head, a real Prefect API."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.nsfw_filter import nsfw_filter
from tasks.errors import UserError
from tests.support.tars import BAD_CASE_EXPECTED, bad_case_members, member_offsets, shard_of_good_samples, tar_bytes, write_tar

pytestmark = pytest.mark.usefixtures("prefect_api")


@dataclass
class Dataset:
    input_dir: Path
    keys: dict[str, list[str | None]]  # shard URL -> keys in order (None: the unreadable rest of a damaged tar)
    samples: dict[str, list[tuple[str, dict[str, bytes]]]]  # shard URL -> (key, {member name: bytes}) in order
    bad_shard_name: str  # the shard holding every bad case


def group_samples(tar: tarfile.TarFile) -> list[tuple[str, dict[str, bytes]]]:
    """WebDataset's rule, written plainly: consecutive members whose names agree up to the first dot of the file name."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    for member in tar.getmembers():
        directory, _, base = member.name.rpartition("/")
        key = (directory + "/" if directory else "") + base.split(".", 1)[0]
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        if member.isfile():
            samples[-1][1][member.name] = tar.extractfile(member).read()
    return samples


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def build_dataset(root: Path, good_shards: int = 3, per_shard: int = 5) -> Dataset:
    input_dir = root / "in"
    keys: dict[str, list[str | None]] = {}
    samples: dict[str, list[tuple[str, dict[str, bytes]]]] = {}
    for s in range(good_shards):
        shard_keys = [f"{s:03d}/{j:04d}" for j in range(per_shard)]
        path = write_tar(input_dir / f"part-{s:06d}.tar", shard_of_good_samples(shard_keys, size=(96, 72)))
        keys[str(path)] = shard_keys
    bad = write_tar(input_dir / f"part-{good_shards:06d}.tar", bad_case_members())
    keys[str(bad)] = [key for key, _ in BAD_CASE_EXPECTED]
    whole = tar_bytes(shard_of_good_samples([f"t/{i:04d}" for i in range(6)], size=(64, 48)))
    truncated = input_dir / f"part-{good_shards + 1:06d}.tar"
    truncated.write_bytes(whole[: member_offsets(whole)["t/0003.jpg"][1] + 100])
    keys[str(truncated)] = ["t/0000", "t/0001", "t/0002", None]
    for url in keys:
        with tarfile.open(url) if url != str(truncated) else tarfile.open(fileobj=io.BytesIO(whole)) as tar:
            samples[url] = group_samples(tar)
    return Dataset(input_dir, keys, samples, bad.name)


def read_scores(output_path: Path) -> dict[str, list]:
    tables = [pq.read_table(p) for p in sorted((output_path / "scores").glob("*.parquet"))]
    rows: dict[str, list] = {name: [] for name in tables[0].schema.names}
    for table in tables:
        for name, values in table.to_pydict().items():
            rows[name].extend(values)
    return rows


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_filter(dataset: Dataset, tiny_clip, laion_dir, root: Path, **overrides) -> dict:
    config_path, checkpoint_path = tiny_clip
    parameters = dict(
        file_paths=str(dataset.input_dir),
        output_path=str(root / "out"),
        files_per_partition=2,
        task_batch_size=4,
        clip_model=str(config_path),
        clip_pretrained=str(checkpoint_path),
        nsfw_weights=str(laion_dir / "vit_l_14.safetensors"),
        cache_path=str(root / "cache"),
        images_per_tar=3,
        model_dir=str(root / "models"),
    )
    parameters.update(overrides)
    return nsfw_filter(**parameters)


def check_outputs(dataset: Dataset, output_path: Path, threshold: float) -> dict[str, list]:
    scores = read_scores(output_path)
    # every input key appears exactly once, in input order, with its shard
    expected = [(url, key) for url, keys in dataset.keys.items() for key in keys]
    assert list(zip(scores["shard"], scores["key"])) == expected
    assert pq.read_schema(next((output_path / "scores").glob("*.parquet"))).field("nsfw_score").type == "float"
    by_key = {}
    for row in zip(scores["shard"], scores["key"], scores["nsfw_score"], scores["passed"], scores["error"], scores["output_shard"]):
        shard, key, nsfw_score, passed, error, output_shard = row
        if error is None:
            assert nsfw_score is not None and 0.0 <= nsfw_score <= 1.0
            assert passed == (nsfw_score < threshold)
        elif nsfw_score is not None:  # scored, but it carries images nobody scored
            assert passed is False and nsfw_score < threshold and "was scored, so the sample is kept out of the filtered dataset" in error
        else:
            assert passed is False
        assert (output_shard is not None) == passed
        by_key[(shard, key)] = row
    # bad samples carry their error
    bad_url = next(url for url in dataset.keys if url.endswith("/" + dataset.bad_shard_name))
    for key, fragment in BAD_CASE_EXPECTED:
        if fragment is not None:
            rows = [r for (s, k), r in by_key.items() if s == bad_url and k == key]
            assert any(fragment in (r[4] or "") for r in rows), (key, rows)
    # samples with several image members never pass: only one of their images was scored
    for key in ("multi", "two", "emptyseg"):
        assert by_key[(bad_url, key)][3] is False, by_key[(bad_url, key)]
    damaged = [r for (s, k), r in by_key.items() if k is None]
    assert len(damaged) == 1 and "damaged" in damaged[0][4]
    # the output shards hold exactly the passed samples, members byte for byte
    written: dict[str, bytes] = {}
    for shard_path in sorted((output_path / "shards").glob("*.tar")):
        for name, data in tar_members(shard_path).items():
            assert name not in written, f"{name} written twice"
            written[name] = data
    expected_members: dict[str, bytes] = {}
    for url, samples in dataset.samples.items():
        for (key, members), passed in zip(samples, [by_key_passed for (s, _), by_key_passed in zip(zip(scores["shard"], scores["key"]), scores["passed"]) if s == url]):
            if passed:
                expected_members.update(members)
    assert written == expected_members
    return scores


def test_filter_end_to_end(tmp_path, tiny_clip_768, laion_dir):
    dataset = build_dataset(tmp_path)
    before = tree(tmp_path)
    result = run_filter(dataset, tiny_clip_768, laion_dir, tmp_path)
    scores = check_outputs(dataset, tmp_path / "out", 0.5)
    # a threshold that splits the scored samples, so both sides are exercised
    scored = sorted(s for s in scores["nsfw_score"] if s is not None)
    threshold = float(np.float32((scored[len(scored) // 2 - 1] + scored[len(scored) // 2]) / 2))
    state = run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, score_threshold=threshold, return_state=True)
    result = state.result()
    scores = check_outputs(dataset, tmp_path / "out", threshold)
    assert 0 < sum(scores["passed"]) < len(scored)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["samples"] == len(scores["key"]) == result["samples"]
    assert summary["passed"] == sum(scores["passed"])
    assert summary["errors"] == sum(e is not None for e in scores["error"])
    assert summary["filtered"] == summary["samples"] - summary["passed"] - summary["errors"]
    assert sum(summary["histogram"]) == len(scored)
    assert summary["models"]["clip_model"] == "tiny-clip"
    # the UI shows the counts as a table, the histogram, and links to the outputs
    artifacts = read_artifacts(state.state_details.flow_run_id)
    counts = {row["what"]: row["count"] for row in json.loads(artifacts["nsfw-filter-counts"].data)}
    assert counts["samples"] == summary["samples"] and counts["passed"] == summary["passed"]
    assert counts["not scored (errors)"] == summary["errors"]
    histogram = artifacts["nsfw-filter-histogram"].data
    assert "← threshold" in histogram and sum(int(line.split("|")[2]) for line in histogram.splitlines()[4:]) == len(scored)
    # local outputs are named as text: a file:// link is dead on the UI's http page
    assert f"`{tmp_path / 'out' / 'summary.json'}`" in artifacts["nsfw-filter-summary"].data
    assert f"`{tmp_path / 'out'}`" in artifacts["nsfw-filter-outputs"].data
    assert not [key for key, artifact in artifacts.items() if "file://" in str(artifact.data)]
    # nothing is written outside output_path and cache_path
    new = {p for p in tree(tmp_path) - before if not p.startswith(("out", "cache"))}
    assert new == set()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    # a shard's content changes under the same name: the re-run notices and redoes that partition
    shard0 = dataset.input_dir / "part-000000.tar"
    new_keys = [f"new/{j:04d}" for j in range(3)]
    write_tar(shard0, shard_of_good_samples(new_keys, size=(96, 72)))
    dataset.keys[str(shard0)] = new_keys
    with tarfile.open(shard0) as tar:
        dataset.samples[str(shard0)] = group_samples(tar)
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, score_threshold=threshold)
    check_outputs(dataset, tmp_path / "out", threshold)


def read_artifacts(flow_run_id) -> dict:
    from prefect import get_client
    from prefect.client.schemas.objects import Artifact

    with get_client(sync_client=True) as client:
        response = client.request("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 100})
    return {artifact.key: artifact for artifact in Artifact.model_validate_list(response.json())}


def flow_run_task_runs(flow_run_id) -> list:
    """The flow run's task runs in start order, once the API has recorded a final state for each (events land late)."""
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200
            )
            if all(run.state is not None and run.state.is_final() for run in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def flow_run_task_states(flow_run_id) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for run in flow_run_task_runs(flow_run_id):
        states.setdefault(run.name.split("-", 1)[0], []).append(run.state.name)  # embed-p00012-shard-000012 -> embed
    return states


def flow_run_task_run_counts(flow_run_id) -> list[int]:
    return [run.run_count for run in flow_run_task_runs(flow_run_id)]


def test_rerun_is_cached_and_never_loads_clip(tmp_path, laion_dir):
    from tests.support.tiny_clip import make_tiny_clip

    tiny_clip = make_tiny_clip(tmp_path / "clip", embed_dim=768)
    dataset = build_dataset(tmp_path, good_shards=2)
    first_state = run_filter(dataset, tiny_clip, laion_dir, tmp_path, return_state=True)
    first_outputs = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    # Keep the checkpoint's size and mtime (its fingerprint is cached by those) but ruin its bytes:
    # building CLIP from it would fail, so a green re-run proves CLIP was never loaded.
    checkpoint = tiny_clip[1]
    stat = checkpoint.stat()
    checkpoint.write_bytes(b"\0" * stat.st_size)
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second_state = run_filter(dataset, tiny_clip, laion_dir, tmp_path, return_state=True)
    assert second_state.is_completed()
    first_tasks = flow_run_task_states(first_state.state_details.flow_run_id)
    second_tasks = flow_run_task_states(second_state.state_details.flow_run_id)
    assert first_tasks["embed"] == ["Completed"] * 2
    assert second_tasks["embed"] == ["Cached"] * 2
    second_outputs = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    assert second_outputs == first_outputs  # idempotent: same files, same bytes


def test_bad_parameters_fail_fast_with_one_sentence(tmp_path, tiny_clip_768, laion_dir):
    dataset = build_dataset(tmp_path, good_shards=1)
    with pytest.raises(UserError, match=r"score_threshold input should be less than or equal to 1 \(got 1.5\)"):
        run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, score_threshold=1.5)
    with pytest.raises(UserError, match=r"num_gpus_per_worker input should be greater than 0"):
        run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, num_gpus_per_worker=0)
    with pytest.raises(UserError, match=r"expects 512-d embeddings from CLIP ViT-B-32"):
        run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, nsfw_weights=str(laion_dir / "vit_b_32.safetensors"))
    with pytest.raises(UserError, match=r"output_path .* holds input shards"):
        run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, output_path=str(dataset.input_dir))
    with pytest.raises(UserError, match=r"CLIP weights ViT-L-14 \(openai\) were not found.*models fetch"):
        run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, clip_model="ViT-L-14", clip_pretrained="openai")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_cli_runs_the_flow_and_reports_failure(tmp_path, tiny_clip_768, laion_dir):
    dataset = build_dataset(tmp_path, good_shards=1)
    config_path, checkpoint_path = tiny_clip_768
    command = [sys.executable, "-m", "flows.cli", "filter", "--file-paths", str(dataset.input_dir), "--output-path", str(tmp_path / "out"),
               "--clip-model", str(config_path), "--clip-pretrained", str(checkpoint_path), "--nsfw-weights", str(laion_dir / "vit_l_14.safetensors"),
               "--cache-path", str(tmp_path / "cache"), "--files-per-partition", "3", "--images-per-tar", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout[done.stdout.index("{"):])["samples"] == sum(len(k) for k in dataset.keys.values())
    failed = subprocess.run(command + ["--score-threshold", "-0.1"], capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2
    assert failed.stderr.strip() == "nsfw-curator: error: invalid parameters: score_threshold input should be greater than or equal to 0 (got -0.1)."


def upload_dir(fs, local: Path, remote: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{remote}/{path.relative_to(local).as_posix()}")


def test_filter_on_s3_absorbs_transient_failures(tmp_path, s3_bucket, s3_endpoint, tiny_clip_768, laion_dir, monkeypatch):
    import s3fs

    from tests.support.faulty_s3 import FaultyS3Proxy

    dataset = build_dataset(tmp_path)
    fs = s3fs.S3FileSystem()
    upload_dir(fs, dataset.input_dir, f"{s3_bucket}/in")
    remote_dataset = Dataset(
        dataset.input_dir,
        {f"s3://{s3_bucket}/in/{Path(url).name}": keys for url, keys in dataset.keys.items()},
        {f"s3://{s3_bucket}/in/{Path(url).name}": samples for url, samples in dataset.samples.items()},
        dataset.bad_shard_name,
    )
    counts: dict[str, int] = {}

    def rule(method: str, path: str):
        # Every shard's first reads get 503 (one shard's more often than the S3 client's 2 attempts set below, so
        # a task-level retry is needed); the first writes of outputs and store entries get 500; one read of a store
        # entry is cut off half way.
        for name, fault, times in (("/in/part-000001.tar", 503, 3), ("/in/part-", 503, 1), ("/out/scores/", 500, 3), ("/cache/", 500, 1)):
            if name in path and method == ("GET" if name == "/in/part-" else "PUT"):
                shard = path.split("?")[0]
                counts[shard] = counts.get(shard, 0) + 1
                return fault if counts[shard] <= times else None
        if "/cache/tiny-clip" in path and method == "GET" and counts.setdefault("reset", 0) < 1:
            counts["reset"] += 1
            return "reset"
        return None

    with FaultyS3Proxy(s3_endpoint, rule) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        s3fs.S3FileSystem.clear_instance_cache()
        state = run_filter(remote_dataset, tiny_clip_768, laion_dir, tmp_path, file_paths=f"s3://{s3_bucket}/in",
                           output_path=f"s3://{s3_bucket}/out", cache_path=f"s3://{s3_bucket}/cache", return_state=True)
    s3fs.S3FileSystem.clear_instance_cache()
    assert state.is_completed()
    assert len(proxy.injected) >= 15, proxy.injected
    assert max(flow_run_task_run_counts(state.state_details.flow_run_id)) >= 2  # a task-level retry absorbed the rest
    local_out = tmp_path / "downloaded"
    fs.get(f"{s3_bucket}/out", str(local_out), recursive=True)
    check_outputs(remote_dataset, local_out, 0.5)
    assert fs.ls(f"{s3_bucket}/cache")  # the store lives in the bucket
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_kill_9_midway_then_rerun_completes_without_duplicates(tmp_path, tiny_clip_768, laion_dir, prefect_api):
    import signal
    import time

    dataset = build_dataset(tmp_path, good_shards=10, per_shard=6)
    config_path, checkpoint_path = tiny_clip_768
    command = [sys.executable, "-m", "flows.cli", "filter", "--file-paths", str(dataset.input_dir), "--output-path", str(tmp_path / "out"),
               "--clip-model", str(config_path), "--clip-pretrained", str(checkpoint_path), "--nsfw-weights", str(laion_dir / "vit_l_14.safetensors"),
               "--cache-path", str(tmp_path / "cache"), "--images-per-tar", "2", "--task-batch-size", "2", "--max-workers", "1"]
    process = subprocess.Popen(command, env={**os.environ, "PREFECT_API_URL": prefect_api}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    manifests = tmp_path / "out" / "_manifests"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(manifests.glob("*.json"))) < 2 and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before_kill = len(list(manifests.glob("*.json")))
    assert 2 <= done_before_kill < 6, "the run should have been killed midway"
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, files_per_partition=1, task_batch_size=2, images_per_tar=2)
    check_outputs(dataset, tmp_path / "out", 0.5)  # complete, every key once, no member written twice
    assert len(list(manifests.glob("*.json"))) == 12
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_gpu_sharing_bound_with_threads_and_ray(tmp_path, tiny_clip_768, laion_dir, monkeypatch):
    from tasks.models.gpu import GPU_JOURNAL_ENV, SIMULATED_GPUS_ENV, max_overlap

    dataset = build_dataset(tmp_path, good_shards=4)  # 6 shards
    monkeypatch.setenv(SIMULATED_GPUS_ENV, "1")
    threads_journal, ray_journal = tmp_path / "threads.journal", tmp_path / "ray.journal"

    # threads: f = 0.5 lets exactly two embedding tasks share the one GPU although six could run
    monkeypatch.setenv(GPU_JOURNAL_ENV, str(threads_journal))
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, files_per_partition=1, num_gpus_per_worker=0.5, max_workers=6,
               output_path=str(tmp_path / "out-threads"), cache_path=str(tmp_path / "cache-threads"))
    uses = threads_journal.read_text().splitlines()
    assert len(uses) == 6 and max_overlap(uses) == {0: 2}

    # Ray (a local Ray started for the run): f = 1 holds the whole GPU, so embedding tasks run one at a time
    # even though Ray has two CPUs for them; outputs equal the threads run's.
    monkeypatch.setenv(GPU_JOURNAL_ENV, str(ray_journal))
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, files_per_partition=1, num_gpus_per_worker=1.0, task_runner="ray",
               output_path=str(tmp_path / "out-ray"), cache_path=str(tmp_path / "cache-ray"))
    uses = ray_journal.read_text().splitlines()
    assert len(uses) == 6 and max_overlap(uses) == {0: 1}
    assert str(os.getpid()) not in {line.split()[3] for line in uses}  # held by Ray worker processes, not this one
    threads_scores, ray_scores = read_scores(tmp_path / "out-threads"), read_scores(tmp_path / "out-ray")
    assert threads_scores["key"] == ray_scores["key"] and threads_scores["passed"] == ray_scores["passed"]
    np.testing.assert_allclose(np.array(threads_scores["nsfw_score"], dtype=float), np.array(ray_scores["nsfw_score"], dtype=float), atol=1e-6)
    for threads_tar in sorted((tmp_path / "out-threads" / "shards").glob("*.tar")):
        assert threads_tar.read_bytes() == (tmp_path / "out-ray" / "shards" / threads_tar.name).read_bytes()


def test_gpu_decode_mode_keeps_every_row_and_the_exact_modes_verdicts(tmp_path, tiny_clip_768, laion_dir):
    """decode_mode="gpu" through the flow (on the CPU here, the same code): every input key once, errors as the exact
    mode words them, scores within the cosine the device's resize moves embeddings by; its entries say what the device decoded."""
    dataset = build_dataset(tmp_path, good_shards=2, per_shard=4)
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path / "exact", cache_path=str(tmp_path / "cache"))
    exact = check_outputs(dataset, tmp_path / "exact" / "out", 0.5)
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path / "gpu", cache_path=str(tmp_path / "cache"), decode_mode="gpu")
    gpu = check_outputs(dataset, tmp_path / "gpu" / "out", 0.5)
    assert gpu["key"] == exact["key"] and gpu["error"] == exact["error"]
    scored = [(a, b) for a, b in zip(exact["nsfw_score"], gpu["nsfw_score"]) if a is not None]
    assert len(scored) > 20 and max(abs(a - b) for a, b in scored) < 0.02
    records = [json.loads(pq.read_schema(path).metadata[b"nsfw_curator"]) for path in (tmp_path / "cache").rglob("*.parquet")]
    on_device = [record["device_decode"] for record in records if "device_decode" in record]
    assert len(on_device) == len(dataset.keys) and sum(counts["on_device"] for counts in on_device) > 0
