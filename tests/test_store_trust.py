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
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
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
from tasks.store.entries import CorruptEntryWarning, EmbeddingStore, embedding_matrix, embedding_table
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


def settled_task_states(flow_run_id, name: str) -> list[str]:
    """The API's task-run state names for `name`, once it has recorded every final state (it learns them from events)."""
    for _ in range(300):
        states = flow_run_task_states(flow_run_id)[name]
        if not {"Pending", "Running", "Scheduled"} & set(states):
            return states
        time.sleep(0.1)
    return states


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
    assert settled_task_states(second.state_details.flow_run_id, "embed") == ["Completed"] * len(PLANTED)
    assert read_scores(tmp_path / "out") == first_scores
    for record in records:  # rewritten in the data-only format
        checked_record(record.read_bytes(), record.name, None)
    third = run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, files_per_partition=1, return_state=True)
    assert settled_task_states(third.state_details.flow_run_id, "embed") == ["Cached"] * len(PLANTED)


def test_flow_with_poisoned_entries_rescores_from_fresh_embeddings(tmp_path, tiny_clip_768, laion_dir):
    from tests.test_store import rewrite_entry, unit_rows

    dataset = build_dataset(tmp_path, good_shards=3, per_shard=4)
    assert run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, return_state=True).is_completed()
    first_scores = read_scores(tmp_path / "out")
    entries = {name: next((tmp_path / "cache").glob(f"*/{name}-*.parquet")) for name in ("part-000000", "part-000001", "part-000002")}
    genuine = {name: pq.read_table(path) for name, path in entries.items()}

    def poison(name: str, change) -> None:
        table = genuine[name]
        keys, embeddings, errors = change(table.column("key").to_pylist(), embedding_matrix(table), table.column("error").to_pylist())
        rewrite_entry(str(entries[name]), keys, embeddings, errors)

    # Scores would flip silently (scaled by -30), the filter stage would fail on the keys (a row dropped), and
    # every run would blame the model (another dimension under forged metadata).
    poison("part-000000", lambda k, e, r: (k, e * -30, r))
    poison("part-000001", lambda k, e, r: (k[:1] + k[2:], np.delete(e, 1, axis=0), r[:1] + r[2:]))
    poison("part-000002", lambda k, e, r: (k, unit_rows(len(k), 4, dim=512), r))
    poisoned = {name: path.read_bytes() for name, path in entries.items()}
    # Scores must change from a whole new set of outputs, not from the manifests of the first run.
    for path in (tmp_path / "out" / "_manifests").iterdir():
        path.unlink()

    with pytest.warns(CorruptEntryWarning) as caught:
        second = run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, return_state=True)
    assert second.is_completed()
    reasons = " | ".join(str(w.message) for w in caught if w.category is CorruptEntryWarning)
    for name, reason in (("part-000000", "L2 norm 30, not 1"), ("part-000001", "has key"), ("part-000002", "dimension 512, the model gives 768")):
        assert re.search(f"{name}-[^|]*{reason}", reasons), reasons
    second_scores = read_scores(tmp_path / "out")
    # The same rows and decisions; scores equal up to float32 rounding (CPU re-embedding may round differently).
    assert {name: values for name, values in second_scores.items() if name != "nsfw_score"} == {
        name: values for name, values in first_scores.items() if name != "nsfw_score"
    }
    np.testing.assert_allclose(np.array(second_scores["nsfw_score"], float), np.array(first_scores["nsfw_score"], float), rtol=1e-4, atol=1e-6)
    for name, path in entries.items():  # rewritten: the genuine rows again
        assert path.read_bytes() != poisoned[name]
        rewritten = pq.read_table(path)
        assert rewritten.column("key").to_pylist() == genuine[name].column("key").to_pylist()
        np.testing.assert_allclose(embedding_matrix(rewritten), embedding_matrix(genuine[name]), atol=1e-5)


def test_filter_stage_embeds_again_when_an_entrys_keys_are_not_the_shards(tmp_path, laion_dir):
    from tasks.filter.stage import _scored_shard, shard_scores
    from tasks.models.nsfw import load_nsfw_head
    from tasks.signals.plan import SignalPlan
    from tasks.signals.scoring import SignalScorer
    from tests.support.tars import shard_of_good_samples, write_tar
    from tests.test_store import unit_rows

    keys = [f"k{i:03d}" for i in range(6)]
    shard = str(write_tar(tmp_path / "s.tar", shard_of_good_samples(keys, size=(32, 24))))
    store = EmbeddingStore(tmp_path / "cache")
    identity = "tiny-clip-00000000000000000000000000000000"
    rows = unit_rows(6, 1, dim=768)
    genuine = embedding_table(keys, shard, rows, [None] * 6)
    head = load_nsfw_head(str(laion_dir / "vit_l_14.safetensors"), device="cpu")
    plan = SignalPlan()

    def score_entry(table):
        return shard_scores(table, head, SignalScorer(plan, 768), plan.policy, 4)

    embedded = []

    def reembed(url: str) -> None:  # what embedding the shard writes: its genuine rows
        embedded.append(url)
        store.write(identity, url, genuine)

    store.write(identity, shard, genuine)
    expected = [(sample.key, row.scores["nsfw_score"]) for sample, row in _scored_shard(shard, identity, store, score_entry, 768, reembed)]
    assert [key for key, _ in expected] == keys and not embedded

    forged = {
        "a row dropped": embedding_table(keys[:2] + keys[3:], shard, np.delete(rows, 2, axis=0), [None] * 5),
        "a row added": embedding_table(keys + ["k999"], shard, unit_rows(7, 1, dim=768), [None] * 7),
        "keys swapped": embedding_table([keys[1], keys[0], *keys[2:]], shard, rows, [None] * 6),
    }
    for table in forged.values():
        store.write(identity, shard, table)
        with pytest.warns(CorruptEntryWarning, match="has key|the shard has 6 samples"):
            got = [(sample.key, row.scores["nsfw_score"]) for sample, row in _scored_shard(shard, identity, store, score_entry, 768, reembed)]
        assert got == expected and embedded.pop() == shard
        assert store.read_table(identity, shard, embedding_dim=768, expected_keys=keys) is not None  # rewritten

    # Without a way to embed again, or when embedding again does not give the shard's keys (the shard
    # changed during the run), the partition fails with that reason.
    store.write(identity, shard, forged["keys swapped"])
    with pytest.raises(RuntimeError, match="changed during the run"):
        list(_scored_shard(shard, identity, store, score_entry, 768, None))
    with pytest.raises(RuntimeError, match="changed during the run"), pytest.warns(CorruptEntryWarning):
        list(_scored_shard(shard, identity, store, score_entry, 768, lambda url: store.write(identity, url, forged["a row dropped"])))


def test_flow_with_a_store_key_rejects_well_formed_forgeries(tmp_path, tiny_clip_768, laion_dir, monkeypatch):
    from tests.test_store import rewrite_entry

    monkeypatch.setenv("NSFW_CURATOR_STORE_KEY", "team secret")
    dataset = build_dataset(tmp_path, good_shards=1, per_shard=4)
    assert run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, return_state=True).is_completed()
    first_scores = read_scores(tmp_path / "out")
    entry = next((tmp_path / "cache").glob("*/part-000000-*.parquet"))
    genuine = pq.read_table(entry)
    signature = json.loads(genuine.schema.metadata[b"nsfw_curator"])["signature"]
    # Every row's sign flipped: unit-length, finite, the right keys; only the signature tells.
    rewrite_entry(str(entry), genuine.column("key").to_pylist(), -embedding_matrix(genuine), genuine.column("error").to_pylist(),
                  record_update={"signature": signature})
    for path in (tmp_path / "out" / "_manifests").iterdir():
        path.unlink()

    with pytest.warns(CorruptEntryWarning, match="signature does not match"):
        assert run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, return_state=True).is_completed()
    second_scores = read_scores(tmp_path / "out")
    assert second_scores["passed"] == first_scores["passed"]
    np.testing.assert_allclose(np.array(second_scores["nsfw_score"], float), np.array(first_scores["nsfw_score"], float), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(embedding_matrix(pq.read_table(entry)), embedding_matrix(genuine), atol=1e-5)
