"""Weights from object storage: CLIP and the NSFW head as s3:// URLs, fetched once per machine, always verified.

Real moto S3 behind a counting proxy, the real filter flow, a tiny CLIP checkpoint and the real LAION head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tasks.errors import UserError
from tasks.io.locations import Location
from tests.test_flow_filter import build_dataset, read_scores, run_filter, tar_members

ACCESS_KEY = "AKIDWEIGHTSTEST"
SECRET = "Weights-Secret-51c2e8"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def weights_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "weights-cache"
    monkeypatch.setenv("NSFW_CURATOR_WEIGHTS_CACHE", str(cache))
    return cache


@pytest.fixture()
def uploaded(s3_bucket, tiny_clip_768, laion_dir) -> dict:
    """The tiny CLIP checkpoint and the LAION ViT-L/14 head in the bucket, and their local originals."""
    import s3fs

    config_path, checkpoint_path = tiny_clip_768
    head_path = laion_dir / "vit_l_14.safetensors"
    fs = s3fs.S3FileSystem()
    fs.put_file(str(checkpoint_path), f"{s3_bucket}/weights/{checkpoint_path.name}")
    fs.put_file(str(head_path), f"{s3_bucket}/weights/{head_path.name}")
    s3fs.S3FileSystem.clear_instance_cache()
    return {
        "config": config_path,
        "checkpoint": checkpoint_path,
        "head": head_path,
        "clip_url": f"s3://{s3_bucket}/weights/{checkpoint_path.name}",
        "head_url": f"s3://{s3_bucket}/weights/{head_path.name}",
        "bucket": s3_bucket,
    }


@contextlib.contextmanager
def counted_requests(s3_endpoint: str, monkeypatch):
    """Every S3 request (method, path) made meanwhile, by this process and the processes it starts."""
    import s3fs

    from tests.support.faulty_s3 import FaultyS3Proxy

    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(method: str, path: str) -> None:
        with lock:
            seen.append((method, path))

    with FaultyS3Proxy(s3_endpoint, record) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield seen
        finally:
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
            s3fs.S3FileSystem.clear_instance_cache()


def weight_gets(seen: list[tuple[str, str]]) -> list[str]:
    return [path for method, path in seen if method == "GET" and "/weights/" in path]


def cached_files(cache: Path) -> dict[str, tuple[int, int]]:
    """The weight files in the cache (name -> inode, mtime): nothing but `{sha256}{suffix}` at the top."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in cache.iterdir() if path.is_file()}


def test_filter_flow_with_weights_from_s3_equals_local_paths_and_downloads_once(tmp_path, s3_endpoint, uploaded, weights_cache, monkeypatch, laion_dir):
    from tasks.dedup.io import find_embedding_identity
    from tasks.filter.plan import cached_nsfw_head
    from tasks.models.embed import unload_clip_models
    from tasks.store.entries import EmbeddingStore

    dataset = build_dataset(tmp_path, good_shards=1, per_shard=2)
    tiny_clip = (uploaded["config"], uploaded["checkpoint"])
    run_filter(dataset, tiny_clip, laion_dir, tmp_path, output_path=str(tmp_path / "out-local"), cache_path=str(tmp_path / "cache-local"))
    with counted_requests(s3_endpoint, monkeypatch) as seen:
        run_filter(dataset, tiny_clip, laion_dir, tmp_path, output_path=str(tmp_path / "out-s3"), cache_path=str(tmp_path / "cache-s3"),
                   clip_pretrained=uploaded["clip_url"], nsfw_weights=uploaded["head_url"])
        first_gets = weight_gets(seen)
        # The same outputs as with local paths: scores, filtered shards, and the same embedding identity and model record.
        local, remote = read_scores(tmp_path / "out-local"), read_scores(tmp_path / "out-s3")
        for column in ("shard", "key", "nsfw_score", "passed", "error"):
            assert local[column] == remote[column], column
        assert [Path(u).name if u else u for u in local["output_shard"]] == [Path(u).name if u else u for u in remote["output_shard"]]
        local_shards = sorted((tmp_path / "out-local" / "shards").glob("*.tar"))
        assert local_shards and [tar_members(p) for p in local_shards] == [tar_members(p) for p in sorted((tmp_path / "out-s3" / "shards").glob("*.tar"))]
        local_models = json.loads((tmp_path / "out-local" / "summary.json").read_text())["models"]
        assert json.loads((tmp_path / "out-s3" / "summary.json").read_text())["models"] == local_models
        # One file per weight in the cache, named by its SHA-256; each was downloaded (read) once.
        expected = {f"{sha256_of(uploaded['checkpoint'])}.safetensors", f"{sha256_of(uploaded['head'])}.safetensors"}
        files = cached_files(weights_cache)
        assert set(files) == expected
        assert {path.split("?")[0].rsplit("/", 1)[-1] for path in first_gets} == {uploaded["checkpoint"].name, uploaded["head"].name}

        # A second run (a fresh store, so CLIP is built again) asks the storage about the weights but reads nothing.
        unload_clip_models()
        cached_nsfw_head.cache_clear()
        seen.clear()
        run_filter(dataset, tiny_clip, laion_dir, tmp_path, output_path=str(tmp_path / "out-s3-again"), cache_path=str(tmp_path / "cache-s3-again"),
                   clip_pretrained=uploaded["clip_url"], nsfw_weights=uploaded["head_url"])
        assert weight_gets(seen) == []
        assert read_scores(tmp_path / "out-s3-again")["nsfw_score"] == local["nsfw_score"]
        assert cached_files(weights_cache) == files  # not rewritten
        # The dedup flow finds the same identity from the URL.
        store = EmbeddingStore(str(tmp_path / "cache-s3"))
        assert find_embedding_identity(store, [], str(uploaded["config"]), uploaded["clip_url"], None) == local_models["embedding_identity"]
        assert weight_gets(seen) == []


SECOND_PROCESS = """
import json, sys, torch
from tasks.io.locations import Location
from tasks.filter.plan import load_planned_head
from tasks.models.clip_resolve import resolve_clip
from tasks.models.embed import build_clip_model
config, clip_url, head_url = sys.argv[1:]
weights = resolve_clip(config, clip_url)
build_clip_model(weights, torch.device("cpu"))
head, head_sha256 = load_planned_head(Location(head_url))
print(json.dumps({"clip": weights.weights_fingerprint, "head": head_sha256, "path": weights.checkpoint_path}))
"""


def test_a_second_process_downloads_nothing_and_a_tampered_copy_is_never_used(s3_endpoint, uploaded, weights_cache, monkeypatch, caplog):
    from tasks.filter.plan import load_planned_head
    from tasks.models.clip_resolve import resolve_clip

    weights = resolve_clip(str(uploaded["config"]), uploaded["clip_url"])
    load_planned_head(Location(uploaded["head_url"]))
    clip_sha256, head_sha256 = sha256_of(uploaded["checkpoint"]), sha256_of(uploaded["head"])
    assert weights.weights_fingerprint == clip_sha256 and weights.checkpoint_url == uploaded["clip_url"]
    files = cached_files(weights_cache)
    with counted_requests(s3_endpoint, monkeypatch) as seen:
        child = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(uploaded["config"]), uploaded["clip_url"], uploaded["head_url"]],
                               capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert child.returncode == 0, child.stderr[-3000:]
        assert json.loads(child.stdout.splitlines()[-1]) == {"clip": clip_sha256, "head": head_sha256, "path": weights.checkpoint_path}
        assert weight_gets(seen) == [] and any(method == "HEAD" for method, _ in seen)
        assert cached_files(weights_cache) == files

        # Bytes changed in place (same size, mtime put back): the copy is hashed again, removed and fetched again.
        cached = Path(weights.checkpoint_path)
        before = cached.stat()
        os.chmod(cached, 0o644)
        with cached.open("r+b") as handle:
            handle.seek(before.st_size // 2)
            original = handle.read(64)
            handle.seek(before.st_size // 2)
            handle.write(bytes(255 - b for b in original))
        os.utime(cached, ns=(before.st_atime_ns, before.st_mtime_ns))
        seen.clear()
        again = resolve_clip(str(uploaded["config"]), uploaded["clip_url"])
        assert again.weights_fingerprint == clip_sha256 and sha256_of(Path(again.checkpoint_path)) == clip_sha256
        assert weight_gets(seen)  # fetched again rather than used
        assert "does not hold the bytes its name says" in caplog.text
        assert set(cached_files(weights_cache)) == set(files)


def test_object_changed_after_planning_fails_on_the_worker_in_one_sentence(tmp_path, s3_bucket, uploaded, weights_cache, monkeypatch):
    import s3fs
    import torch

    from tasks.filter.plan import load_planned_head
    from tasks.models.clip_resolve import resolve_clip
    from tasks.models.embed import build_clip_model
    from tasks.models.remote_weights import local_weights
    from tests.support.tiny_clip import make_tiny_clip

    # Planned with credentials in the URLs: they leave the URLs and appear in no message.
    secret_clip_url = uploaded["clip_url"].replace("s3://", f"s3://{ACCESS_KEY}:{SECRET}@")
    weights = resolve_clip(str(uploaded["config"]), secret_clip_url)
    assert weights.checkpoint_url == uploaded["clip_url"] and SECRET not in repr(weights)
    _, head_sha256 = load_planned_head(Location(uploaded["head_url"]))
    # Both objects change under the same URLs, then a task runs on a machine without a copy.
    _, other_checkpoint = make_tiny_clip(tmp_path / "other", embed_dim=768, seed=1)
    fs = s3fs.S3FileSystem()
    fs.put_file(str(other_checkpoint), uploaded["clip_url"])
    fs.pipe_file(uploaded["head_url"], uploaded["head"].read_bytes()[:-8] + b"\0" * 8)
    s3fs.S3FileSystem.clear_instance_cache()
    other_machine = tmp_path / "other-machine-cache"
    monkeypatch.setenv("NSFW_CURATOR_WEIGHTS_CACHE", str(other_machine))
    with pytest.raises(UserError) as raised:
        build_clip_model(weights, torch.device("cpu"))
    message = str(raised.value)
    assert message.startswith(f"weights {uploaded['clip_url']} changed since the run was planned") and message.count(". ") == 0
    assert SECRET not in message and ACCESS_KEY not in message
    with pytest.raises(UserError, match="changed since the run was planned"):
        local_weights(uploaded["head_url"], head_sha256)
    # Nothing that failed the check was kept.
    assert cached_files(other_machine) == {} and not list((other_machine / "tmp").iterdir())
    # The planning machine's verified copy still serves this run.
    monkeypatch.setenv("NSFW_CURATOR_WEIGHTS_CACHE", str(weights_cache))
    build_clip_model(weights, torch.device("cpu"))


def test_concurrent_tasks_on_one_machine_download_once(s3_endpoint, uploaded, weights_cache, monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tasks.models.remote_weights import local_weights

    clip_sha256 = sha256_of(uploaded["checkpoint"])
    with counted_requests(s3_endpoint, monkeypatch) as seen:
        monkeypatch.setenv("NSFW_CURATOR_WEIGHTS_CACHE", str(tmp_path / "alone"))
        local_weights(uploaded["clip_url"], clip_sha256)
        one_download = len(weight_gets(seen))
        seen.clear()
        monkeypatch.setenv("NSFW_CURATOR_WEIGHTS_CACHE", str(weights_cache))
        with ThreadPoolExecutor(4) as pool:
            paths = list(pool.map(lambda _: local_weights(uploaded["clip_url"], clip_sha256), range(4)))
    assert one_download >= 1 and len(weight_gets(seen)) == one_download
    assert len(set(paths)) == 1 and sha256_of(paths[0]) == clip_sha256
    assert list(cached_files(weights_cache)) == [f"{clip_sha256}.safetensors"]


def test_bad_weight_urls_are_one_sentence(uploaded, weights_cache):
    from tasks.models.clip_resolve import resolve_clip
    from tasks.models.remote_weights import resolve_weights

    missing = f"s3://{uploaded['bucket']}/weights/missing.safetensors"
    with pytest.raises(UserError, match=r"^weights s3://\S+/missing.safetensors do not exist; check the URL\.$"):
        resolve_clip(str(uploaded["config"]), missing)
    with pytest.raises(UserError, match=r"is not a \.safetensors, \.bin, \.pt or \.pth file"):
        resolve_clip(str(uploaded["config"]), f"s3://{uploaded['bucket']}/weights/notes.txt")
    with pytest.raises(UserError, match="is a folder"):
        resolve_weights(f"s3://{uploaded['bucket']}/weights")
    assert not weights_cache.exists() or cached_files(weights_cache) == {}
