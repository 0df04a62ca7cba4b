"""The out-of-core dedup path: the same groups and survivors as the in-memory search, on threads and Ray, on
local disk and S3, and a re-run after a kill -9 in the middle of the bucket search."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import s3fs
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

from flows.dedup import image_dedup
from tasks.dedup.buckets import assign_unit, read_bucket, train_centroids, unit_offsets
from tasks.dedup.out_of_core import WORK_FOLDER, entry_sizes, plan_layout
from tasks.errors import UserError
from tasks.store.entries import EmbeddingStore, shard_fingerprint
from tests.support.dedup_data import PlantedDuplicates, planted_duplicates, write_planted_store

pytestmark = pytest.mark.usefixtures("prefect_api")
IDENTITY = "synthetic-64"
THRESHOLD = 0.99
# Tiny buckets, so the planted groups spread over many of them.
BUCKET_ROWS = 1500
OUTPUTS = ("duplicates", "kept", "skipped")


def dataset(rows: int = 4000, seed: int = 3) -> PlantedDuplicates:
    # long chains drift far from where they start, so their members fall in different clusters and buckets
    data = planted_duplicates(rows, 64, rows_per_shard=400, duplicate_fraction=0.3, group_sizes=(2, 3, 4, 16, 24), chain_fraction=0.5, seed=seed)
    background = np.flatnonzero(data.group < 0)
    data.embeddings[background[[7, 300, 900]]] = np.nan  # never compared: skipped
    data.embeddings[background[99]] = 0.0
    return data


def run(shards: str, cache: str, output: str, **overrides):
    parameters = dict(file_paths=shards, output_path=output, similarity_threshold=THRESHOLD, cache_path=cache, embedding_identity=IDENTITY)
    return image_dedup(**{**parameters, **overrides})


def outputs(fs_root: str, storage_options: dict | None = None) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(f"{fs_root}/{name}.parquet", storage_options=storage_options) for name in OUTPUTS}


def assert_same(first: dict[str, pd.DataFrame], second: dict[str, pd.DataFrame]) -> None:
    for name in OUTPUTS:
        pd.testing.assert_frame_equal(first[name], second[name], check_exact=True)


@pytest.fixture()
def local_data(tmp_path):
    data = dataset()
    store = EmbeddingStore(str(tmp_path / "cache"))
    urls = write_planted_store(data, str(tmp_path / "in"), store, IDENTITY)
    return tmp_path, data, store, urls


def layout_of(root: Path, store: EmbeddingStore, urls: list[str]):
    fingerprints = [shard_fingerprint(url) for url in urls]
    sizes = entry_sizes(store, IDENTITY, urls, fingerprints)
    return plan_layout(str(root / "layout-check"), IDENTITY, urls, fingerprints, sizes, similarity_threshold=THRESHOLD, bucket_rows=BUCKET_ROWS)


def test_out_of_core_gives_the_in_memory_groups_and_survivors_on_threads_and_ray(local_data):
    root, data, store, urls = local_data
    shards, cache = str(root / "in"), str(root / "cache")
    in_memory = run(shards, cache, str(root / "exact"), method="exact")
    expected = outputs(str(root / "exact"))
    assert in_memory["groups"] == len(data.planted_groups()) > 100  # every planted group, nothing else
    assert len(expected["skipped"]) == 4

    # the planted groups really span buckets: many have no bucket holding all their members
    layout = layout_of(root, store, urls)
    assert layout.num_buckets >= 5
    train_centroids(store, layout)
    for unit in range(len(layout.units)):
        assign_unit(store, layout, unit)
    offsets = unit_offsets(layout)
    buckets_of: dict[int, set[int]] = {}
    for bucket in range(layout.num_buckets):
        for position in read_bucket(layout, bucket, offsets).positions:
            buckets_of.setdefault(int(position), set()).add(bucket)
    compared = pd.concat([expected["kept"], expected["duplicates"][["key", "shard"]]]).sort_values(["shard", "key"], ignore_index=True)
    position_of = {(shard, key): index for index, (shard, key) in enumerate(zip(compared["shard"], compared["key"]))}
    spanning = [group for group in data.planted_groups()
                if not set.intersection(*(buckets_of[position_of[(f"{root / 'in'}/{shard}", key)]] for shard, key in group))]
    assert len(spanning) >= 10

    out_of_core = run(shards, cache, str(root / "threads"), method="out-of-core", bucket_rows=BUCKET_ROWS)
    assert_same(outputs(str(root / "threads")), expected)
    assert out_of_core == {**in_memory, "summary": str(root / "threads" / "summary.json")}
    summary = json.loads((root / "threads" / "summary.json").read_text())
    assert summary["stats"]["method"] == "out-of-core" and summary["files"]["kept"] == str(root / "threads" / "kept.parquet")
    # pairs screened within the float16 margin of the threshold were decided on the store's float32 rows
    assert summary["stats"]["verified"] > 0
    assert not (root / "threads" / WORK_FOLDER).exists()  # bucket files go once the outputs are written

    # auto: in memory while the data fits, out-of-core beyond
    run(shards, cache, str(root / "auto"), method="auto", in_memory_max_rows=len(data.key) - 1, bucket_rows=BUCKET_ROWS)
    assert json.loads((root / "auto" / "summary.json").read_text())["stats"]["method"] == "out-of-core"
    assert_same(outputs(str(root / "auto")), expected)
    run(shards, cache, str(root / "auto"), method="auto", in_memory_max_rows=len(data.key))
    assert json.loads((root / "auto" / "summary.json").read_text())["stats"]["method"] == "exact"

    run(shards, cache, str(root / "ray"), method="out-of-core", bucket_rows=BUCKET_ROWS, task_runner="ray")
    assert_same(outputs(str(root / "ray")), expected)


def test_out_of_core_on_s3_writes_the_deduplicated_copy(tmp_path, s3_bucket):
    data = dataset(2400, seed=5)
    store = EmbeddingStore(f"s3://{s3_bucket}/cache")
    write_planted_store(data, f"s3://{s3_bucket}/in", store, IDENTITY)
    shards, cache = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/cache"
    run(shards, cache, f"s3://{s3_bucket}/exact", method="exact")
    run(shards, cache, f"s3://{s3_bucket}/ooc", method="out-of-core", bucket_rows=1000, write_dataset=True, images_per_tar=1000)
    expected = outputs(f"s3://{s3_bucket}/exact")
    assert_same(outputs(f"s3://{s3_bucket}/ooc"), expected)
    fs = s3fs.S3FileSystem()
    assert not fs.exists(f"{s3_bucket}/ooc/{WORK_FOLDER}")
    copied = set()
    for path in fs.glob(f"{s3_bucket}/ooc/shards/*.tar"):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
            copied |= {name.rsplit(".", 1)[0] for name in tar.getnames()}
    assert copied == set(expected["kept"]["key"])


_KILLED_RUN = """
import json, sys
from flows.dedup import image_dedup
image_dedup(**json.loads(sys.argv[1]))
"""


def _search_bucket_runs(flow_run_id) -> int:
    async def count() -> int:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="search-bucket")),
            )
            return len(runs)

    import asyncio

    return asyncio.run(count())


def test_a_kill_in_the_middle_of_the_bucket_search_then_a_rerun_redoes_only_unfinished_buckets(local_data, prefect_api):
    root, data, store, urls = local_data
    shards, cache = str(root / "in"), str(root / "cache")
    run(shards, cache, str(root / "exact"), method="exact")
    layout = layout_of(root, store, urls)
    links = root / "killed" / WORK_FOLDER / "links"
    parameters = dict(file_paths=shards, output_path=str(root / "killed"), similarity_threshold=THRESHOLD, cache_path=cache,
                      embedding_identity=IDENTITY, method="out-of-core", bucket_rows=BUCKET_ROWS)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, json.dumps(parameters)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    done: list[str] = []
    while time.monotonic() < deadline and process.poll() is None:
        done = sorted(path.name for path in links.glob("bucket-*.parquet")) if links.exists() else []
        if done:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    done = sorted(path.name for path in links.glob("bucket-*.parquet"))
    assert 0 < len(done) < layout.num_buckets  # killed in the middle of the bucket search
    assert not (root / "killed" / "duplicates.parquet").exists()

    state = image_dedup(**parameters, return_state=True)
    assert state.is_completed()
    assert _search_bucket_runs(state.state_details.flow_run_id) == layout.num_buckets - len(done)
    assert_same(outputs(str(root / "killed")), outputs(str(root / "exact")))


def test_damaged_bucket_files_are_refused_in_one_sentence(local_data):
    root, _, store, urls = local_data
    layout = layout_of(root, store, urls)
    train_centroids(store, layout)
    assign_unit(store, layout, 0)
    unit_file = Path(layout.unit_url(0))
    unit_file.write_bytes(unit_file.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"the bucket file .*unit-000000\.parquet is damaged \(.*\); delete it and run again"):
        read_bucket(layout, 0, np.zeros(len(layout.units) + 1, dtype=np.int64))
