"""How tasks meet Prefect: the embedding task's cache (the embedding store's identity) and storage retries.

The cache key of a partition is the hash of its store entries' URLs (store root, model/weights/
preprocessing identity, each shard's content fingerprint), so Prefect shows the task as Cached exactly
when the store would hit. Task results (the entry URLs) live beside the store, under
`{cache_path}/_prefect_results`, so any machine that shares the store shares the cache.

Those records are data, never code: anyone who can write the shared store can write them, so nothing
read back there is unpickled or handed to a serializer it names. A record is JSON holding a list of entry
URLs (`EntryUrlsSerializer`); `EntryUrlsStorage` reads a record only when it has exactly the shape this
module writes, names this module's serializer, and its URLs hash to the record's own cache key, and then
gives Prefect a record rebuilt from those checked values. Anything else is a miss: the task runs again
(finding its entries in the store, so without CLIP) and overwrites the record.

`shard_reembedder` gives the filter stage a way to embed a shard again when only it can tell that the
store entry is unusable (rows that fail validation behind a Prefect cache hit, or keys that are not the
shard's, seen while streaming the shard), holding a GPU slot like the embedding task.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable, ClassVar

import anyio.to_thread
import prefect
from prefect.filesystems import WritableFileSystem
from prefect.serializers import Serializer
from pydantic import Field, PrivateAttr

from flows.gpu_limits import hold_gpu
from tasks.io.atomic import write_bytes_atomic
from tasks.io.locations import Location
from tasks.models.embed import embed_shard, load_clip_embedder
from tasks.errors import StorageUnavailable, UserError
from tasks.filter.plan import EmbedStage

RESULTS_FOLDER = "_prefect_results"
ENTRY_URLS_SERIALIZER_TYPE = "nsfw-curator-entry-urls"
CACHE_KEY_PREFIX = "embed-"
_CACHE_KEY = re.compile(r"embed-([0-9a-f]{64})")
_MAX_RECORD_BYTES = 16 << 20  # a partition of 10,000 shards with long URLs stays far below
_MAX_URL_CHARS = 4096


class UntrustedRecordError(ValueError):
    """A cache record that is not exactly what this module writes; Prefect treats it as a miss."""


def embedding_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """The hash of the partition's entry URLs, built from the fingerprints the flow computed (no storage request)."""
    stage: EmbedStage = parameters["stage"]
    shard_urls = parameters["partition"].shard_urls
    fingerprints = parameters["read"].lookup.shard_fingerprints
    entry_urls = [stage.store.entry_url(stage.embedding_identity, url, fp) for url, fp in zip(shard_urls, fingerprints, strict=True)]
    return CACHE_KEY_PREFIX + hashlib.sha256("\n".join(entry_urls).encode()).hexdigest()


def shard_reembedder(stage: EmbedStage) -> Callable[[str], str]:
    """`reembed(shard_url)`: embed the shard again and rewrite its store entry (returns the entry URL)."""

    def reembed(shard_url: str) -> str:
        with hold_gpu(stage.num_gpus_per_worker) as device:
            embedder = load_clip_embedder(stage.clip_weights, device, stage.model_inference_batch_size, forward=stage.forward_pass)
            return embed_shard(stage.shard(shard_url), embedder, stage.store, stage.decode, stage.task_batch_size)

    return reembed


# ---------------------------------------------------------------------------------------------------
# Data-only cache records


def _reject_constant(name: str) -> float:
    raise UntrustedRecordError(f"JSON constant {name} is not allowed")


def _strict_json(blob: bytes | str) -> Any:
    """Plain JSON (no object hooks, no NaN); deep nesting or bad UTF-8 is an UntrustedRecordError."""
    try:
        return json.loads(blob, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise UntrustedRecordError(f"not plain JSON ({type(error).__name__})") from None


def parse_entry_urls(blob: bytes | str) -> list[str]:
    """A JSON list of entry URLs, checked: strings of printable characters, nothing else."""
    urls = _strict_json(blob)
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise UntrustedRecordError("result is not a list of strings")
    for url in urls:
        if not url or len(url) > _MAX_URL_CHARS or not url.isprintable():
            raise UntrustedRecordError("result holds an empty, overlong or non-printable URL")
    return urls


def entry_urls_match_key(urls: list[str], key: str) -> bool:
    """True when `key` is the cache key of exactly these entry URLs (see `partition_embedding_identity`)."""
    match = _CACHE_KEY.fullmatch(key)
    return bool(match) and hashlib.sha256("\n".join(urls).encode()).hexdigest() == match.group(1)


class EntryUrlsSerializer(Serializer):
    """The embedding task's result, a list of entry URLs, as plain JSON (read back checked, never as objects)."""

    type: str = Field(default=ENTRY_URLS_SERIALIZER_TYPE, frozen=True)

    def dumps(self, obj: list[str]) -> bytes:
        assert isinstance(obj, list) and all(isinstance(url, str) for url in obj), "the embedding task returns entry URLs"
        return json.dumps(obj).encode()

    def loads(self, blob: bytes) -> list[str]:
        return parse_entry_urls(blob)


_RECORD_FIELDS = {"metadata", "result"}
_METADATA_FIELDS = {"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"}


def checked_record(content: bytes, key: str, storage_block_id: str | None) -> bytes:
    """The record Prefect may read for `key`, rebuilt from checked values; UntrustedRecordError otherwise.

    Prefect reads the serializer from the stored record itself (a `pickle` there would be unpickled), so
    the record must name ours with no settings, hold a list of URLs whose hash is `key`, and nothing else.
    """
    if len(content) > _MAX_RECORD_BYTES:
        raise UntrustedRecordError("record is too large")
    if not _CACHE_KEY.fullmatch(key):
        raise UntrustedRecordError("not an embedding cache key")
    record = _strict_json(content)
    if not isinstance(record, dict) or set(record) != _RECORD_FIELDS:
        raise UntrustedRecordError("record fields differ")
    metadata, result = record["metadata"], record["result"]
    if not isinstance(metadata, dict) or not set(metadata) <= _METADATA_FIELDS:
        raise UntrustedRecordError("metadata fields differ")
    if metadata.get("serializer") != {"type": ENTRY_URLS_SERIALIZER_TYPE}:
        raise UntrustedRecordError("record names another serializer")
    if metadata.get("expiration") is not None or metadata.get("storage_key") != key:
        raise UntrustedRecordError("record has an expiration or another storage key")
    if not isinstance(result, str):
        raise UntrustedRecordError("result is not a JSON string")
    urls = parse_entry_urls(result)
    if not entry_urls_match_key(urls, key):
        raise UntrustedRecordError("entry URLs do not hash to the record's key")
    rebuilt = {
        "metadata": {
            "storage_key": key,
            "expiration": None,
            "serializer": {"type": ENTRY_URLS_SERIALIZER_TYPE},
            "prefect_version": prefect.__version__,
            # Our own block, never one the record names: Prefect may later re-read the result through it.
            "storage_block_id": storage_block_id,
        },
        "result": json.dumps(urls),
    }
    return json.dumps(rebuilt).encode()


class EntryUrlsStorage(WritableFileSystem):
    """Result storage for the embedding task under `basepath` (a local folder or any fsspec URL).

    Reads return only checked, rebuilt records (`checked_record`); anything else raises, which Prefect's
    cache lookup takes as a miss. The saved block holds only `basepath`; storage options (credentials from
    the run's secret block) stay in this process's copy and travel only with the task, never to the server.
    """

    _block_type_name: ClassVar[str] = "nsfw-curator embedding records"
    _block_type_slug: ClassVar[str] = "nsfw-curator-embedding-records"

    basepath: str = Field(description="Folder or URL the embedding task's cache records live under.")
    _location: Location | None = PrivateAttr(default=None)  # `basepath` with the run's storage options

    def _url(self, key: str) -> str:
        if not _CACHE_KEY.fullmatch(key):
            raise UntrustedRecordError("not an embedding cache key")
        return f"{self.basepath.rstrip('/')}/{key}"

    def _at(self, url: str) -> Location:
        return self._location.at(url) if self._location is not None else Location(url)

    def _read_checked(self, key: str) -> bytes:
        fs, path = self._at(self._url(key)).filesystem()
        with fs.open(path, "rb") as handle:
            content = handle.read(_MAX_RECORD_BYTES + 1)
        block_id = getattr(self, "_block_document_id", None)
        return checked_record(content, key, str(block_id) if block_id is not None else None)

    def _write(self, key: str, content: bytes) -> str:
        url = self._url(key)
        write_bytes_atomic(self._at(url), content)
        return key

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        return self._read_checked(path)

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self._read_checked, path)

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        return self._write(path, content)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self._write, path, content)


def embedding_result_storage(stage: EmbedStage) -> WritableFileSystem:
    """A saved `EntryUrlsStorage` block at `{cache_path}/_prefect_results` (Prefect wants result storage saved).

    The saved block holds only the URL; the store's location (with the run's storage options) is set on this
    copy after saving.
    """
    results = stage.store.location / RESULTS_FOLDER
    root = results.url
    block = EntryUrlsStorage(basepath=root)
    name = "nsfw-curator-records-" + hashlib.sha256(root.encode()).hexdigest()[:16]
    block.save(name, overwrite=True)
    block._location = results
    return block


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry storage hiccups; a UserError (missing weights, bad input) is final and fails fast, except
    StorageUnavailable (a listing that could not reach its storage), which may pass."""
    try:
        state.result()
    except StorageUnavailable:
        return True
    except UserError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


# Task options for steps that touch storage: transient errors retry with backoff, user errors fail fast.
STORAGE_RETRIES: dict[str, Any] = dict(
    retries=3,
    # One delay, not a backoff list: the UI shows a task run's retry delay only when it is a number.
    retry_delay_seconds=5,
    retry_jitter_factor=0.5,  # each retry waits about 5 s (at most 7.5 s), spread so retries do not arrive together
    retry_condition_fn=retry_unless_user_error,
)

# The embedding task's cache options: persisted results in the data-only format above.
EMBEDDING_CACHE: dict[str, Any] = dict(
    cache_key_fn=embedding_cache_key,
    persist_result=True,
    result_serializer=EntryUrlsSerializer(),
)
