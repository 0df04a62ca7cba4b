"""The out-of-core dedup path: the same groups and survivors as the in-memory search, on threads and Ray, on
local disk and S3, and a re-run after a kill -9 in the middle of the bucket search."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

from flows.dedup import image_dedup
from tasks.dedup.bucket_search import search_bucket
from tasks.dedup.buckets import assign_unit, read_bucket, train_centroids, unit_offsets
from tasks.dedup.out_of_core import WORK_FOLDER, RefusedLinksWarning, entry_sizes, plan_layout
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


def layout_of(root: Path, store: EmbeddingStore, urls: list[str], work_url: str | None = None):
    fingerprints = [shard_fingerprint(url) for url in urls]
    sizes = entry_sizes(store, IDENTITY, urls, fingerprints)
    return plan_layout(work_url or str(root / "layout-check"), IDENTITY, urls, fingerprints, sizes, similarity_threshold=THRESHOLD, bucket_rows=BUCKET_ROWS)


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


def _prepare_work(output: Path, store: EmbeddingStore, urls: list[str]) -> None:
    """The bucket files the flow would write under `output` (centroids, units, links), written here so a test can change them."""
    layout = layout_of(output, store, urls, work_url=str(output / WORK_FOLDER))
    train_centroids(store, layout)
    for unit in range(len(layout.units)):
        assign_unit(store, layout, unit)
    for bucket in range(layout.num_buckets):
        search_bucket(layout, bucket)


def _rewrite(path: Path, table: pa.Table) -> None:
    """Replace a work file by `table`, its layout record kept, as a writer sharing the output could."""
    pq.write_table(table, path)
    assert pq.read_schema(path).metadata == table.schema.metadata


def _copied_samples(output: Path) -> dict[str, list[tuple[str, bytes]]]:
    copied = {}
    for path in sorted((output / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            copied[path.name] = [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]
    return copied


def _compared(data: PlantedDuplicates) -> np.ndarray:
    return np.isfinite(data.embeddings).all(axis=1) & np.any(data.embeddings != 0, axis=1)


def _positions(data: PlantedDuplicates, root: Path) -> dict[tuple[str, str], int]:
    """Canonical position of every compared row: valid rows in (shard URL, key) order."""
    valid = _compared(data)
    compared = sorted((f"{root / 'in'}/{shard}", key) for shard, key in zip(data.shard[valid], data.key[valid]))
    return {identifier: position for position, identifier in enumerate(compared)}


def test_a_forged_link_or_swapped_keys_in_the_work_files_change_no_output(local_data):
    root, data, store, urls = local_data
    shards, cache = str(root / "in"), str(root / "cache")
    settings = dict(method="out-of-core", bucket_rows=BUCKET_ROWS, write_dataset=True, images_per_tar=500)
    run(shards, cache, str(root / "clean"), **settings)
    expected, expected_copy = outputs(str(root / "clean")), _copied_samples(root / "clean")
    assert len(expected["duplicates"]) > 100

    _prepare_work(root / "forged", store, urls)
    shutil.copytree(root / "forged" / WORK_FOLDER, root / "swapped" / WORK_FOLDER)

    # forged link rows: two unrelated rows, and members of two different planted groups
    position_of = _positions(data, root)
    background = np.flatnonzero((data.group < 0) & _compared(data))
    first_group, second_group = (np.flatnonzero(data.group == group)[0] for group in (0, 1))
    forged_rows = [(background[10], background[11]), (first_group, second_group)]
    for first, second in forged_rows:
        assert float(data.embeddings[first] @ data.embeddings[second]) < THRESHOLD  # not near-duplicates
    forged = [sorted(position_of[(f"{root / 'in'}/{data.shard[row]}", data.key[row])] for row in pair) for pair in forged_rows]
    links_file = root / "forged" / WORK_FOLDER / "links" / "bucket-000000.parquet"
    links = pq.read_table(links_file)
    extra = pa.table({"position": pa.array([pair[1] for pair in forged], pa.int64()), "link": pa.array([pair[0] for pair in forged], pa.int64()),
                      "kind": pa.array([0] * len(forged), pa.int8())}).cast(links.schema)
    _rewrite(links_file, pa.concat_tables([links, extra]))

    # swapped keys: a duplicate's row and a kept row of the first unit trade places
    keys_file = root / "swapped" / WORK_FOLDER / "units" / "keys-000000.parquet"
    keys = pq.read_table(keys_file)
    names = keys.column("key").to_pylist()
    removed = set(expected["duplicates"]["key"]) | set(expected["duplicates"]["duplicate_of"])
    compared = keys.column("reason").to_numpy() == 0
    duplicate_row = next(row for row, key in enumerate(names) if key in set(expected["duplicates"]["key"]))
    kept_row = next(row for row, key in enumerate(names) if compared[row] and key not in removed)
    order = np.arange(keys.num_rows)
    order[[duplicate_row, kept_row]] = order[[kept_row, duplicate_row]]
    _rewrite(keys_file, keys.take(pa.array(order)))

    for name in ("forged", "swapped"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = run(shards, cache, str(root / name), return_state=True, **settings)
        assert state.is_completed()
        assert _search_bucket_runs(state.state_details.flow_run_id) == 0  # the changed files were read, not redone
        assert_same(outputs(str(root / name)), expected)
        assert _copied_samples(root / name) == expected_copy
        refused = [str(warning.message) for warning in caught if issubclass(warning.category, RefusedLinksWarning)]
        # the two forged rows are named in one warning; the keys files are not read at all
        assert [message.startswith("2 of ") for message in refused] == ([True] if name == "forged" else []), refused
