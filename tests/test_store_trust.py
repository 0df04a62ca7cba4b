"""A writable shared store is not a way to run code: planted cache records and poisoned entries are misses.

Prefect's cache records for the embedding task live under `{cache_path}/_prefect_results`, where anyone
who can write the store can write. Every form of record Prefect itself would turn into code (a pickle named
in the record's metadata, compressed pickles, the JSON serializer's `__class__` decoding, the old record
format, a bare pickle) is planted at the exact path Prefect reads; the marker file its payload would
create must never appear, and the run must complete with the same outputs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.serializers import PickleSerializer
from pydantic import BaseModel, model_validator

from flows.prefect_cache import (
    ENTRY_URLS_SERIALIZER_TYPE,
    RESULTS_FOLDER,
    EntryUrlsSerializer,
    EntryUrlsStorage,
    UntrustedRecordError,
    checked_record,
)
from tasks.store import CorruptEntryWarning
from tests.test_flow_filter import build_dataset, flow_run_task_states, read_scores, run_filter

pytestmark = pytest.mark.usefixtures("prefect_api")


class _CreatesFile:
    """Unpickling this opens (creates) `path`: a stand-in for any code an attacker would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class TouchOnValidate(BaseModel):
    """Validating this model creates `path`: what Prefect's JSON `__class__` decoding would run."""

    path: str

    @model_validator(mode="after")
    def touch(self) -> "TouchOnValidate":
        Path(self.path).touch()
        return self


def _pickle_b64(marker: Path) -> str:
    return base64.encodebytes(pickle.dumps(_CreatesFile(marker))).decode()


def _record(key: str, serializer: dict, result: str) -> bytes:
    metadata = {"storage_key": key, "expiration": None, "serializer": serializer, "prefect_version": "3.9.0", "storage_block_id": None}
    return json.dumps({"metadata": metadata, "result": result}).encode()


@dataclass(frozen=True)
class Planted:
    name: str
    build: Callable[[str, Path], bytes]
    prefect_runs_it: bool  # Prefect's own storage and default serializer turn it into code


PLANTED = [
    Planted("pickle-in-metadata", lambda key, m: _record(key, {"type": "pickle", "picklelib": "cloudpickle"}, _pickle_b64(m)), True),
    Planted("stdlib-pickle", lambda key, m: _record(key, {"type": "pickle", "picklelib": "pickle"}, _pickle_b64(m)), True),
    Planted(
        "compressed-pickle",
        lambda key, m: _record(key, {"type": "compressed/pickle"}, base64.encodebytes(lzma.compress(_pickle_b64(m).encode())).decode()),
        True,
    ),
    Planted(
        "json-class-decoding",
        lambda key, m: _record(key, {"type": "json"}, json.dumps({"__class__": f"{__name__}.TouchOnValidate", "data": {"path": str(m)}})),
        True,
    ),
    Planted(
        "old-record-format",
        lambda key, m: json.dumps({"data": _pickle_b64(m), "serializer": {"type": "pickle"}, "prefect_version": "2.20.0"}).encode(),
        True,
    ),
    Planted("bare-pickle", lambda key, m: _pickle_b64(m).encode(), True),
    # Our serializer's name with a pickle inside, or with settings it does not have: still never unpickled.
    Planted("our-type-with-pickle", lambda key, m: _record(key, {"type": ENTRY_URLS_SERIALIZER_TYPE}, _pickle_b64(m)), False),
    Planted(
        "our-type-with-settings",
        lambda key, m: _record(key, {"type": ENTRY_URLS_SERIALIZER_TYPE, "picklelib": "pickle"}, _pickle_b64(m)),
        False,
    ),
]


def cache_key(urls: list[str]) -> str:
    return "embed-" + hashlib.sha256("\n".join(urls).encode()).hexdigest()


@pytest.mark.parametrize("planted", PLANTED, ids=[p.name for p in PLANTED])
def test_planted_record_is_a_miss_and_never_runs(tmp_path, planted):
    marker = tmp_path / "pwned"
    key = cache_key([f"/store/{planted.name}.parquet"])
    content = planted.build(key, marker)
    if planted.prefect_runs_it:
        # The control: Prefect's own storage and default serializer do run this record's payload.
        (tmp_path / "control").mkdir()
        (tmp_path / "control" / key).write_bytes(content)
        control = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path / "control")), serializer=PickleSerializer())
        try:
            control.read(key)
        except Exception:  # noqa: BLE001 - only the side effect matters here
            pass
        assert marker.exists(), f"{planted.name} is not a form Prefect would run"
        marker.unlink()

    (tmp_path / "records").mkdir()
    (tmp_path / "records" / key).write_bytes(content)
    block = EntryUrlsStorage(basepath=str(tmp_path / "records"))
    store = ResultStore(result_storage=block, serializer=EntryUrlsSerializer())
    assert not store.exists(key)
    with pytest.raises(UntrustedRecordError):
        store.read(key)
    with pytest.raises(UntrustedRecordError):
        EntryUrlsSerializer().loads(content)
    assert not marker.exists()


def test_records_are_plain_json_bound_to_their_key(tmp_path):
    block = EntryUrlsStorage(basepath=str(tmp_path / RESULTS_FOLDER))
    block.save("test-records-roundtrip", overwrite=True)
    urls = [str(tmp_path / "cache" / "m-1" / "a-md5-1.parquet"), str(tmp_path / "cache" / "m-1" / "b-md5-2.parquet")]
    key = cache_key(urls)
    ResultStore(result_storage=block, serializer=EntryUrlsSerializer()).write(urls, key=key)

    stored = json.loads((tmp_path / RESULTS_FOLDER / key).read_bytes())
    assert stored["metadata"]["serializer"] == {"type": ENTRY_URLS_SERIALIZER_TYPE}
    assert json.loads(stored["result"]) == urls
    reader = ResultStore(result_storage=block, serializer=EntryUrlsSerializer())
    assert reader.exists(key) and reader.read(key).result == urls

    # A well-formed record under another partition's key (or with one URL changed) is a miss.
    other_key = cache_key(urls[:1])
    (tmp_path / RESULTS_FOLDER / other_key).write_bytes((tmp_path / RESULTS_FOLDER / key).read_bytes())
    assert not reader.exists(other_key)
    forged = dict(stored, result=json.dumps([urls[0], urls[0]]))
    (tmp_path / RESULTS_FOLDER / key).write_text(json.dumps(forged))
    assert not ResultStore(result_storage=block, serializer=EntryUrlsSerializer()).exists(key)
    # The rebuilt record names our block, never one the stored record names.
    stored["metadata"]["storage_block_id"] = "00000000-0000-0000-0000-000000000001"
    rebuilt = json.loads(checked_record(json.dumps(stored).encode(), key, str(block._block_document_id)))
    assert rebuilt["metadata"]["storage_block_id"] == str(block._block_document_id)


def test_planted_records_on_s3_are_misses(s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    block = EntryUrlsStorage(basepath=f"s3://{s3_bucket}/cache/{RESULTS_FOLDER}")
    block.save("test-records-s3", overwrite=True)
    urls = [f"s3://{s3_bucket}/cache/m-1/a-etag-1.parquet"]
    key = cache_key(urls)
    ResultStore(result_storage=block, serializer=EntryUrlsSerializer()).write(urls, key=key)
    assert ResultStore(result_storage=block, serializer=EntryUrlsSerializer()).read(key).result == urls

    marker = tmp_path / "pwned"
    fs.pipe_file(f"{s3_bucket}/cache/{RESULTS_FOLDER}/{key}", PLANTED[0].build(key, marker))
    store = ResultStore(result_storage=block, serializer=EntryUrlsSerializer())
    assert not store.exists(key)
    with pytest.raises(UntrustedRecordError):
        store.read(key)
    assert not marker.exists()


def test_flow_with_planted_records_recomputes_and_never_runs_them(tmp_path, tiny_clip_768, laion_dir):
    dataset = build_dataset(tmp_path, good_shards=len(PLANTED) - 2, per_shard=3)
    first = run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, files_per_partition=1, return_state=True)
    assert first.is_completed()
    first_scores = read_scores(tmp_path / "out")
    records = sorted((tmp_path / "cache" / RESULTS_FOLDER).iterdir())
    assert len(records) == len(PLANTED)  # one record per partition, named by its cache key

    marker = tmp_path / "pwned"
    for record, planted in zip(records, PLANTED):
        record.write_bytes(planted.build(record.name, marker))
    second = run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, files_per_partition=1, return_state=True)

    assert not marker.exists()
    assert second.is_completed()
    # Every planted record was a miss: the tasks ran (from the store, so fast) instead of loading the record.
    assert flow_run_task_states(second.state_details.flow_run_id)["embed-partition"] == ["Completed"] * len(PLANTED)
    assert read_scores(tmp_path / "out") == first_scores
    for record in records:  # rewritten in the data-only format
        checked_record(record.read_bytes(), record.name, None)
    third = run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, files_per_partition=1, return_state=True)
    assert flow_run_task_states(third.state_details.flow_run_id)["embed-partition"] == ["Cached"] * len(PLANTED)
