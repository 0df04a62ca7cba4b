"""The embedding store: one Parquet file per shard per embedding identity, under `cache_path`.

Layout (readable by pandas, pyarrow or a dedup flow without this module):

    {cache_path}/{identity}/{shard_name}-{shard_fingerprint}.parquet

`identity` is `tasks.models.clip_resolve.clip_identity(...)`, `{model_name}-{32 hex}`: a hash of the model config,
the checkpoint's SHA-256, open_clip's preprocessing and the decode settings. `shard_fingerprint` names the
shard's content (see `shard_fingerprint`). Columns: `key` (string; null for shard-level damage), `shard`
(string, the shard URL of the run that wrote the entry), `embedding` (fixed-size list of float32, length =
embedding dimension, L2-normalised; null where the sample could not be embedded), `error` (null or why), and in
entries written since images are hashed the four `HASH_COLUMNS`: `md5` and `sha1` (string, lowercase hex of the
image member's bytes; null without an image member), `pdq` (fixed_size_binary(32)) and `pdq_quality` (int16,
0-100; both null where no pixels were decoded) -- see `ImageHashes` in tasks/io/samples.py. An entry without them
is still a valid entry (`entry_hashes` is None for it; tasks/hashes/image_pass.py adds them). The footer's
key-value metadata `nsfw_curator` (JSON) repeats what the identity covers.

Writes are atomic (`tasks.io.atomic`): a temp file + `os.replace` on local disk; on object stores the
object appears whole or not at all (one PUT, or a multipart upload completed at close). Concurrent writers of one entry leave one complete file (the last).

Entries are untrusted when read (anyone who can write the store can write them). An entry is used only
when all of these hold, and is otherwise a miss with a `CorruptEntryWarning` (the next embedding of that
shard overwrites it):
- it parses, passes its Parquet page checksums, and its footer names the identity and shard fingerprint
  it is filed under, and its row count;
- its embedding dimension is the one the caller's CLIP model gives (`embedding_dim`, never taken from
  the entry);
- a row has an `error` exactly when its embedding is null, and a null `key` only with an error;
- every embedding is finite with an L2 norm within `NORM_TOLERANCE` of 1;
- its keys are the shard's keys in order, when the caller knows them (`expected_keys`; the filter stage
  checks them while streaming the shard again).
- the hash columns, when there are any, are all four with their types; `md5` is 32 and `sha1` 40 lowercase hex
  digits, null together; `pdq_quality` is 0-100 and null exactly where `pdq` is; a PDQ only beside an MD5, and
  none of them in a row without a key.
- when `NSFW_CURATOR_STORE_KEY` is set, its footer carries an HMAC-SHA256 under that key of the identity,
  the shard fingerprint, the keys, the errors and the embeddings, and the hash columns when it has them
  (`entry_signature`; an entry without them signs as before they existed): an unsigned entry, or
  one signed with another key or changed after signing, is a miss. The key is read from the environment at
  each use and never stored, logged or written.
Without a key, an entry that passes all of this but holds other vectors than the model's (say, each row's
sign flipped) is not detected.

Credentials are never passed here explicitly: fsspec/s3fs find them in the environment, `~/.aws`, the
fsspec config, or the store's `Location` built by the plan (e.g. from a Prefect block). This module never
shows storage options and strips `user:password@` from any URL it prints.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from tasks.io.atomic import write_bytes_atomic
from tasks.io.locations import Location, LocationLike, as_location, object_size, redacted, safe_name
from tasks.io.samples import ImageHashes
from tasks.errors import UserError
from tasks.store.retired_errors import first_retired_error

METADATA_KEY = b"nsfw_curator"
ENTRY_FORMAT_VERSION = 1
ENTRY_SUFFIX = ".parquet"
SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_HASH_CHUNK_BYTES = 8 << 20
_FOOTER_BLOCK_BYTES = 1 << 16
# How far an embedding's L2 norm may be from 1: float32 normalisation is within 1e-6, vectors normalised
# in float16 within about 2e-3; a scaled or zeroed row is far outside.
NORM_TOLERANCE = 1e-2
NON_FINITE_REASON = "embedding has non-finite values (NaN or inf); not scored"
NOT_UNIT_REASON = "embedding is not L2-normalised (the model gave a zero or degenerate vector); not scored"
STORE_KEY_VARIABLE = "NSFW_CURATOR_STORE_KEY"
ENTRY_COLUMNS = ("key", "shard", "embedding", "error")
# The image hashes of each row, named as `ImageHashes` fields (see the module docstring): all four or none.
HASH_COLUMN_TYPES = {"md5": pa.string(), "sha1": pa.string(), "pdq": pa.binary(32), "pdq_quality": pa.int16()}
HASH_COLUMNS = tuple(HASH_COLUMN_TYPES)
_HEX_DIGITS = {"md5": 32, "sha1": 40}
_MAX_PDQ_QUALITY = 100


class CorruptEntryWarning(UserWarning):
    """An embedding store entry could not be read or failed validation; it counts as a miss and will be rewritten."""


def _filesystem(location: Location) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(location.url, **location.storage_options)  # this module's own sentence below
    except (ImportError, ValueError) as error:
        raise UserError(f"cannot open {location} ({error}); install the fsspec backend for its protocol or fix the URL.") from None


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return set(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else {fs.protocol}


def _storage_error(error: Exception, url: str, what: str) -> UserError:
    """One sentence for an access problem (credentials, permissions, missing bucket)."""
    reason = type(error).__name__ if not str(error) else str(error).splitlines()[0][:200]
    return UserError(
        f"cannot {what} {redacted(url)} ({reason}); check that it exists and that credentials are set "
        f"(environment, ~/.aws or fsspec config, or the flow's storage block)."
    )


def _is_access_error(error: BaseException) -> bool:
    if isinstance(error, PermissionError):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"NoCredentialsError", "PartialCredentialsError", "ClientError", "EndpointConnectionError", "NoSuchBucket"})


# ---------------------------------------------------------------------------------------------------
# Shard fingerprints


_local_digest_lock = threading.Lock()
_local_digest_memo: dict[tuple, str] = {}


def _local_md5(path: str) -> str:
    """MD5 of a local file, memoised in-process by (path, size, mtime_ns, ctime_ns, inode)."""
    stat = os.stat(path)
    memo_key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    with _local_digest_lock:
        if memo_key in _local_digest_memo:
            return _local_digest_memo[memo_key]
    digest = _stream_md5(open(path, "rb"))
    with _local_digest_lock:
        _local_digest_memo[memo_key] = digest
    return digest


def _stream_md5(handle) -> str:
    hasher = hashlib.md5(usedforsecurity=False)
    with handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def shard_fingerprint(shard: LocationLike) -> str:
    """A file-name-safe name for the shard's bytes; equal bytes give an equal name wherever the shard is read.

    - local disk and any backend without a content checksum (http, sftp, ...): `md5-{hex}`, the MD5 of the
      bytes, read once per process (memoised by path, size, mtime, ctime and inode). Fooled only by an
      MD5 collision made on purpose.
    - S3: `etag-{etag}-{size}`, from one HEAD request. S3 gives every write of different bytes a new ETag
      (the MD5 for plain single-part uploads), so it is fooled only by a store that does not do this;
      re-uploading the same bytes with another part size is a false *miss*, never a false hit.
    - GCS: `gcs-md5-{md5}` or `gcs-crc32c-{crc}-{size}` (composite objects have only a CRC32C).
    """
    return shard_fingerprint_and_size(shard)[0]


def shard_fingerprint_and_size(shard: LocationLike) -> tuple[str, int | None]:
    """`shard_fingerprint` and the shard's size in bytes (None where the backend does not say), from one look.

    On object stores that look is always one request for the object as it is now (HEAD on S3), never a
    listing's memory of it: the name must describe the bytes that are read next, and a run makes the same
    requests whichever thread, and so whichever cached client, asks.
    """
    shard = as_location(shard)
    shard_url = shard.url
    fs, path = _filesystem(shard)
    protocols = _protocols(fs)
    try:
        if isinstance(fs, LocalFileSystem):
            return f"md5-{_local_md5(path)}", os.stat(path).st_size
        if protocols & {"s3", "s3a", "gs", "gcs"}:
            fs.invalidate_cache(path)
            info = fs.info(path)
            size = object_size(info)
            if protocols & {"s3", "s3a"}:
                etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
                if etag:
                    return safe_name(f"etag-{etag}-{info.get('size')}"), size
            else:
                if info.get("md5Hash"):
                    return safe_name(f"gcs-md5-{_b64_to_hex(info['md5Hash'])}"), size
                if info.get("crc32c"):
                    return safe_name(f"gcs-crc32c-{_b64_to_hex(info['crc32c'])}-{info.get('size')}"), size
        return f"md5-{_stream_md5(fs.open(path, 'rb'))}", None
    except FileNotFoundError:
        raise UserError(f"shard {redacted(shard_url)} does not exist; check file_paths.") from None
    except Exception as error:
        if _is_access_error(error):
            raise _storage_error(error, shard_url, "read shard") from None
        raise


def _b64_to_hex(value: str) -> str:
    import base64

    return base64.b64decode(value).hex()


def shard_name(shard_url: str) -> str:
    """The shard's file name without its tar suffix, made file-name-safe (`.../00012.tar` -> `00012`)."""
    name = PurePosixPath(redacted(shard_url).split("?", 1)[0].rstrip("/")).name
    for suffix in SHARD_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return safe_name(name)


# ---------------------------------------------------------------------------------------------------
# Tables


def embedding_table(
    keys: Sequence[str | None],
    shard_url: str,
    embeddings: np.ndarray,
    errors: Sequence[str | None],
    hashes: Sequence[ImageHashes | None] | None = None,
) -> pa.Table:
    """An entry's table from keys, a float32 [N, D] matrix and per-row errors (rows with an error get a null embedding),
    with the `HASH_COLUMNS` when `hashes` (each row's, None where it has none) are given.

    A row without an error whose embedding is not finite or not unit-length gets that as its error, so
    every table made here passes the read-side validation.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    assert embeddings.ndim == 2, f"embeddings must be [N, D], got shape {embeddings.shape}"
    assert len(keys) == len(errors) == embeddings.shape[0], "keys, errors and embeddings differ in length"
    finite = np.isfinite(embeddings).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        unit = np.abs(np.linalg.norm(embeddings.astype(np.float64), axis=1) - 1.0) <= NORM_TOLERANCE
    errors = [
        error if error is not None else NON_FINITE_REASON if not finite[row] else NOT_UNIT_REASON if not unit[row] else None
        for row, error in enumerate(errors)
    ]
    failed = np.array([error is not None for error in errors], dtype=bool)
    embedding_column = pa.FixedSizeListArray.from_arrays(
        pa.array(embeddings.reshape(-1)), embeddings.shape[1], mask=pa.array(failed, type=pa.bool_())
    )
    table = pa.table(
        {
            "key": pa.array(list(keys), type=pa.string()),
            "shard": pa.array([redacted(shard_url)] * len(keys), type=pa.string()),
            "embedding": embedding_column,
            "error": pa.array(list(errors), type=pa.string()),
        }
    )
    return table if hashes is None else with_hash_columns(table, hashes)


def with_hash_columns(table: pa.Table, hashes: Sequence[ImageHashes | None]) -> pa.Table:
    """The entry table with its `HASH_COLUMNS` set from each row's hashes (None where it has none), replacing any."""
    assert len(hashes) == table.num_rows, "one ImageHashes (or None) per row"
    keys = table.column("key").to_pylist()
    assert all(row_hashes is None for key, row_hashes in zip(keys, hashes) if key is None), "a row without a key has no hashes"
    columns = {name: [None if row is None else getattr(row, name) for row in hashes] for name in HASH_COLUMNS}
    table = table.drop_columns([name for name in HASH_COLUMNS if name in table.column_names])
    for name, values in columns.items():
        table = table.append_column(pa.field(name, HASH_COLUMN_TYPES[name]), pa.array(values, type=HASH_COLUMN_TYPES[name]))
    return table


def has_hash_columns(table_or_schema: pa.Table | pa.Schema) -> bool:
    """Whether an entry holds image hashes (the hash columns, all four; `_validate` refuses some without the others)."""
    names = table_or_schema.names if isinstance(table_or_schema, pa.Schema) else table_or_schema.column_names
    return all(name in names for name in HASH_COLUMNS)


@dataclass(frozen=True, repr=False)
class EntryHashes:
    """A validated entry's image hashes, one row per entry row (its `repr` shows no hash)."""

    md5: list[str | None]  # lowercase hex; None without an image member
    sha1: list[str | None]
    pdq: np.ndarray  # uint8 [N, 32], bit 255 first; zeros where `has_pdq` is False
    has_pdq: np.ndarray  # bool [N]: the row's pixels were decoded and hashed
    pdq_quality: np.ndarray  # int16 [N], 0-100; -1 where `has_pdq` is False

    def __repr__(self) -> str:
        return f"EntryHashes({len(self.md5)} rows, {int(self.has_pdq.sum())} with PDQ)"


def entry_hashes(table: pa.Table) -> EntryHashes | None:
    """The image hashes of an entry read by `EmbeddingStore.read_table`, or None for an entry written before images were hashed."""
    if not has_hash_columns(table):
        return None
    pdq_column = table.column("pdq").combine_chunks()
    rows = len(pdq_column)
    has_pdq = pdq_column.is_valid().to_numpy(zero_copy_only=False)
    # a fixed-size binary array is one buffer of 32 bytes per slot, null slots included
    values = np.frombuffer(pdq_column.buffers()[1], dtype=np.uint8) if rows else np.zeros(0, np.uint8)
    start = pdq_column.offset * 32
    pdq = values[start : start + rows * 32].reshape(rows, 32).copy()
    pdq[~has_pdq] = 0
    quality = table.column("pdq_quality").combine_chunks().fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int16)
    return EntryHashes(table.column("md5").to_pylist(), table.column("sha1").to_pylist(), pdq, has_pdq, quality)


def embedding_matrix(table: pa.Table | pd.DataFrame) -> np.ndarray:
    """The `embedding` column as float32 [N, D]; rows without an embedding are NaN."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    column = table.column("embedding").combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
    else:
        lengths = column.value_lengths().drop_null().to_numpy(zero_copy_only=False)
        dim = int(lengths[0]) if len(lengths) else 0
        column = column.cast(pa.list_(pa.float32(), dim))
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    # Null rows of a fixed-size list still own D child slots, so flattening keeps rows aligned.
    matrix = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=True).reshape(len(column), dim)
    matrix[~valid] = np.nan
    return matrix


def _validate(table_schema: pa.Schema, num_rows: int, expected: dict, embedding_dim: int | None = None) -> str | None:
    """Why an entry's schema/metadata do not match what its name and the caller's model promise, or None when they do."""
    metadata = table_schema.metadata or {}
    if METADATA_KEY not in metadata:
        return "no nsfw_curator metadata"
    try:
        record = json.loads(metadata[METADATA_KEY])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "metadata is not JSON"
    for name in ("identity", "shard_fingerprint"):
        if record.get(name) != expected[name]:
            return f"{name} is {record.get(name)!r}, expected {expected[name]!r}"
    if record.get("rows") != num_rows:
        return f"{num_rows} rows, metadata says {record.get('rows')}"
    missing = {"key", "shard", "embedding", "error"} - set(table_schema.names)
    if missing:
        return f"columns {sorted(missing)} are missing"
    embedding_type = table_schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(embedding_type) and pa.types.is_float32(embedding_type.value_type)):
        return f"embedding column has type {embedding_type}"
    if record.get("embedding_dim") not in (None, embedding_type.list_size):
        return f"embedding dimension {embedding_type.list_size}, metadata says {record.get('embedding_dim')}"
    if embedding_dim is not None and embedding_type.list_size != embedding_dim:
        return f"embedding dimension {embedding_type.list_size}, the model gives {embedding_dim}"
    if _store_key() is not None and not isinstance(record.get("signature"), str):
        return f"not signed, and {STORE_KEY_VARIABLE} is set"
    for name in ("key", "shard", "error"):
        if not pa.types.is_string(table_schema.field(name).type):
            return f"{name} column has type {table_schema.field(name).type}"
    present = [name for name in HASH_COLUMNS if name in table_schema.names]
    if present and len(present) != len(HASH_COLUMNS):
        return f"hash columns {sorted(set(HASH_COLUMNS) - set(present))} are missing beside {present}"
    for name in present:
        if table_schema.field(name).type != HASH_COLUMN_TYPES[name]:
            return f"{name} column has type {table_schema.field(name).type}, not {HASH_COLUMN_TYPES[name]}"
    return None


def _validate_rows(table: pa.Table) -> str | None:
    """Why an entry's rows cannot be used (errors vs null embeddings, finiteness, unit norms), or None."""
    embedding = table.column("embedding").combine_chunks()
    has_embedding = embedding.is_valid().to_numpy(zero_copy_only=False)
    has_error = table.column("error").combine_chunks().is_valid().to_numpy(zero_copy_only=False)
    has_key = table.column("key").combine_chunks().is_valid().to_numpy(zero_copy_only=False)
    mismatched = np.flatnonzero(has_embedding == has_error)
    if len(mismatched):
        return f"row {int(mismatched[0])} has {'both an embedding and an error' if has_error[mismatched[0]] else 'neither an embedding nor an error'}"
    keyless = np.flatnonzero(~has_key & ~has_error)
    if len(keyless):
        return f"row {int(keyless[0])} has no key and no error"
    if first_retired_error(table.column("error").drop_null().to_pylist()) is not None:
        # Stale, not corrupt: embedded again once, and the new entry scores that sample (tasks/store/retired_errors.py).
        return "a sample was refused by a check this version no longer makes (a banner's aspect ratio)"
    rows = embedding_matrix(table)[has_embedding].astype(np.float64)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        return f"row {int(np.flatnonzero(has_embedding)[np.argmin(finite)])} has a non-finite embedding without an error"
    off = np.abs(np.linalg.norm(rows, axis=1) - 1.0)
    if len(off) and off.max() > NORM_TOLERANCE:
        worst = int(np.argmax(off))
        return f"row {int(np.flatnonzero(has_embedding)[worst])} has L2 norm {np.linalg.norm(rows[worst]):.4g}, not 1"
    return _hash_rows_problem(table, has_key) if has_hash_columns(table) else None


def _hash_rows_problem(table: pa.Table, has_key: np.ndarray) -> str | None:
    """Why an entry's hash columns cannot be used, or None; never shows a hash (only row numbers)."""

    def first(rows: np.ndarray) -> int | None:
        found = np.flatnonzero(rows)
        return int(found[0]) if len(found) else None

    valid = {name: table.column(name).combine_chunks().is_valid().to_numpy(zero_copy_only=False) for name in HASH_COLUMNS}
    for name, digits in _HEX_DIGITS.items():
        # RE2's `$` is the end of the text (a trailing newline does not match)
        matches = pc.match_substring_regex(table.column(name).combine_chunks(), f"^[0-9a-f]{{{digits}}}$")
        if (row := first(~matches.fill_null(True).to_numpy(zero_copy_only=False))) is not None:
            return f"row {row}'s {name} is not {digits} lowercase hex digits"
    quality = table.column("pdq_quality").combine_chunks().fill_null(0).to_numpy(zero_copy_only=False)
    checks = [
        (valid["md5"] != valid["sha1"], "has one of md5 and sha1 without the other"),
        (valid["pdq"] != valid["pdq_quality"], "has one of pdq and pdq_quality without the other"),
        (valid["pdq"] & ~valid["md5"], "has a pdq without an md5"),
        ((quality < 0) | (quality > _MAX_PDQ_QUALITY), f"has a pdq_quality outside 0..{_MAX_PDQ_QUALITY}"),
        (~has_key & valid["md5"], "has hashes but no key"),
    ]
    for rows, problem in checks:
        if (row := first(rows)) is not None:
            return f"row {row} {problem}"
    return None


def _store_key() -> bytes | None:
    """The team's signing key from the environment, or None (entries are then neither signed nor checked)."""
    value = os.environ.get(STORE_KEY_VARIABLE)
    return value.encode() if value else None


def entry_signature(key: bytes, identity: str, shard_fingerprint: str, table: pa.Table) -> str:
    """HMAC-SHA256 under `key` of what an entry says: identity, shard fingerprint, keys, errors, embeddings, and its
    hash columns when it has them (an entry without them signs exactly as before they existed)."""
    matrix = embedding_matrix(table)  # null rows become NaN, whatever bytes they hold
    header = json.dumps([identity, shard_fingerprint, table.column("key").to_pylist(), table.column("error").to_pylist(), list(matrix.shape)])
    digest = hashlib.sha256(header.encode())
    digest.update(np.ascontiguousarray(matrix, dtype="<f4").tobytes())
    if has_hash_columns(table):
        pdq = [None if value is None else value.hex() for value in table.column("pdq").to_pylist()]
        hashes = [table.column("md5").to_pylist(), table.column("sha1").to_pylist(), pdq, table.column("pdq_quality").to_pylist()]
        digest.update(b"\x00image-hashes-v1\x00" + json.dumps(hashes).encode())
    return "hmac-sha256:" + hmac.new(key, digest.digest(), hashlib.sha256).hexdigest()


def _signature_problem(table: pa.Table, identity: str, shard_fingerprint: str) -> str | None:
    """Why the entry is not signed with this team's key (when one is set), or None."""
    key = _store_key()
    if key is None:
        return None
    signature = json.loads(table.schema.metadata[METADATA_KEY]).get("signature")
    if not isinstance(signature, str):
        return f"not signed, and {STORE_KEY_VARIABLE} is set"
    if not hmac.compare_digest(signature, entry_signature(key, identity, shard_fingerprint, table)):
        return f"its signature does not match {STORE_KEY_VARIABLE} (signed with another key, or changed after signing)"
    return None


def keys_mismatch(entry_keys: Sequence[str | None], shard_keys: Sequence[str | None]) -> str | None:
    """Where an entry's keys stop being the shard's keys (in order), or None when they are the same."""
    for row, (entry_key, shard_key) in enumerate(zip(entry_keys, shard_keys)):
        if entry_key != shard_key:
            return f"row {row} has key {entry_key!r}, the shard has {shard_key!r}"
    if len(entry_keys) != len(shard_keys):
        return f"{len(entry_keys)} rows, the shard has {len(shard_keys)} samples"
    return None


# ---------------------------------------------------------------------------------------------------
# The store


class EmbeddingStore:
    """Entries under a location (a local directory or any fsspec URL such as `s3://bucket/prefix`)."""

    def __init__(self, location: LocationLike) -> None:
        location = as_location(location)
        cache_path = location.url
        if "://" not in cache_path:
            cache_path = os.path.abspath(os.path.expanduser(cache_path))
        self.location = location.at(cache_path.rstrip("/"))
        self._fs, self._root = _filesystem(self.location)

    @property
    def cache_path(self) -> str:
        """The store's clean URL (entries' URLs start with it)."""
        return self.location.url

    def __repr__(self) -> str:
        return f"EmbeddingStore({self.cache_path!r})"  # a Location's URL holds no credentials

    def __reduce__(self):
        return (EmbeddingStore, (self.location,))

    def _fingerprint(self, shard_url: str, fingerprint: str | None) -> str:
        return fingerprint if fingerprint is not None else shard_fingerprint(self.location.at(shard_url))

    def _relative(self, identity: str, shard_url: str, fingerprint: str) -> str:
        # Checked, not asserted: an identity may come from a user (image-dedup --embedding-identity), and a path
        # step in it would leave the store; asserts vanish under `python -O`.
        if safe_name(identity) != identity:
            raise UserError(f"embedding identity {identity!r} is not a store folder name (letters, digits, '.', '_' and '-'); pass the identity summary.json names.")
        if safe_name(fingerprint) != fingerprint:
            raise ValueError(f"shard fingerprint {fingerprint!r} is not file-name-safe")
        return f"{identity}/{shard_name(shard_url)}-{fingerprint}{ENTRY_SUFFIX}"

    def entry_url(self, identity: str, shard_url: str, shard_fingerprint: str | None = None) -> str:
        """Where the entry for this shard and identity lives (computes the shard fingerprint if not given).

        Pass `shard_fingerprint` when the shards are reached with other storage options than the store.
        """
        return f"{self.cache_path}/{self._relative(identity, shard_url, self._fingerprint(shard_url, shard_fingerprint))}"

    def _path(self, identity: str, shard_url: str, fingerprint: str) -> str:
        return f"{self._root.rstrip('/')}/{self._relative(identity, shard_url, fingerprint)}"

    def _warn_corrupt(self, url: str, reason: str) -> None:
        warnings.warn(
            f"embedding store entry {redacted(url)} is unreadable or invalid ({reason}); counting it as a miss, it will be rewritten.",
            CorruptEntryWarning,
            stacklevel=3,
        )

    def warn_unusable(self, identity: str, shard_url: str, shard_fingerprint: str, reason: str) -> None:
        """Report an entry a caller found unusable (say, its keys are not the shard's): a miss, to be rewritten."""
        self._warn_corrupt(self.entry_url(identity, shard_url, shard_fingerprint), reason)

    def has(self, identity: str, shard_url: str, shard_fingerprint: str | None = None, embedding_dim: int | None = None) -> bool:
        """True when a complete entry exists, judged from its footer alone (cheap on S3); `read_table` checks the rows."""
        fingerprint = self._fingerprint(shard_url, shard_fingerprint)
        path = self._path(identity, shard_url, fingerprint)
        expected = {"identity": identity, "shard_fingerprint": fingerprint}
        try:
            with self._fs.open(path, "rb", block_size=_FOOTER_BLOCK_BYTES) as handle:
                parquet_file = pq.ParquetFile(handle)
                reason = _validate(parquet_file.schema_arrow, parquet_file.metadata.num_rows, expected, embedding_dim)
        except FileNotFoundError:
            return False
        except Exception as error:
            if _is_access_error(error):
                raise _storage_error(error, self.entry_url(identity, shard_url, fingerprint), "read the embedding store at") from None
            reason = f"{type(error).__name__}: {error}"
        if reason is not None:
            self._warn_corrupt(self.entry_url(identity, shard_url, fingerprint), reason)
            return False
        return True

    def read_table(
        self,
        identity: str,
        shard_url: str,
        shard_fingerprint: str | None = None,
        embedding_dim: int | None = None,
        expected_keys: Sequence[str | None] | None = None,
    ) -> pa.Table | None:
        """The validated entry as a pyarrow Table, or None on a miss (with a CorruptEntryWarning if it exists but is not usable).

        `embedding_dim` is the caller's model's dimension; `expected_keys` the shard's keys in order, when known.
        """
        fingerprint = self._fingerprint(shard_url, shard_fingerprint)
        path = self._path(identity, shard_url, fingerprint)
        url = self.entry_url(identity, shard_url, fingerprint)
        try:
            data = self._fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as error:
            if _is_access_error(error):
                raise _storage_error(error, url, "read the embedding store at") from None
            raise
        try:
            # Page checksums (written by `write`) catch flipped bytes that would still decode.
            table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
            table.validate(full=True)
        except (pa.ArrowException, OSError, ValueError) as error:
            self._warn_corrupt(url, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            return None
        reason = _validate(table.schema, table.num_rows, {"identity": identity, "shard_fingerprint": fingerprint}, embedding_dim)
        if reason is None:
            reason = _validate_rows(table)
        if reason is None:
            reason = _signature_problem(table, identity, fingerprint)
        if reason is None and expected_keys is not None:
            reason = keys_mismatch(table.column("key").to_pylist(), expected_keys)
        if reason is not None:
            self._warn_corrupt(url, reason)
            return None
        # Same bytes may live at another URL: report the shard the caller asked about.
        return table.set_column(table.schema.get_field_index("shard"), "shard", pa.array([redacted(shard_url)] * table.num_rows, pa.string()))

    def read(
        self, identity: str, shard_url: str, shard_fingerprint: str | None = None, embedding_dim: int | None = None
    ) -> pd.DataFrame | None:
        """The validated entry as a DataFrame (`embedding` holds float32 arrays or None), or None on a miss."""
        table = self.read_table(identity, shard_url, shard_fingerprint, embedding_dim)
        return None if table is None else table.to_pandas()

    def write(
        self,
        identity: str,
        shard_url: str,
        table: pa.Table | pd.DataFrame,
        shard_fingerprint: str | None = None,
        metadata: dict | None = None,
    ) -> str:
        """Write the entry atomically (replacing any existing one) and return its URL.

        `table` has the columns `key`, `shard`, `embedding` (fixed-size list of float32) and `error`, and the
        `HASH_COLUMNS` when it holds image hashes (see `embedding_table`); `metadata` (JSON-serialisable) is stored in the footer beside the identity.
        """
        fingerprint = self._fingerprint(shard_url, shard_fingerprint)
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        embedding_type = table.schema.field("embedding").type
        assert pa.types.is_fixed_size_list(embedding_type), f"embedding column must be a fixed-size list, got {embedding_type}"
        record = {name: value for name, value in (metadata or {}).items() if name != "signature"}
        record.update(
            format=ENTRY_FORMAT_VERSION,
            identity=identity,
            shard_url=redacted(shard_url),
            shard_fingerprint=fingerprint,
            rows=table.num_rows,
            embedding_dim=embedding_type.list_size,
        )
        present = [name for name in HASH_COLUMNS if name in table.column_names]
        assert present in ([], list(HASH_COLUMNS)), f"an entry holds all of {HASH_COLUMNS} or none, not {present}"
        for name in present:
            assert table.schema.field(name).type == HASH_COLUMN_TYPES[name], f"{name} column must be {HASH_COLUMN_TYPES[name]}"
        table = table.select(list(ENTRY_COLUMNS) + (list(HASH_COLUMNS) if has_hash_columns(table) else []))
        if (key := _store_key()) is not None:
            record["signature"] = entry_signature(key, identity, fingerprint, table)
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(record, sort_keys=True)})
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, write_page_checksum=True)
        url = self.entry_url(identity, shard_url, fingerprint)
        try:
            write_bytes_atomic(self.location.at(url), buffer.getvalue().to_pybytes())
        except Exception as error:
            # On an object store a FileNotFoundError on write means the bucket is missing.
            if _is_access_error(error) or isinstance(error, FileNotFoundError):
                raise _storage_error(error, url, "write the embedding store at") from None
            raise
        return url


def partition_embedding_identity(shard_urls: Iterable[str], identity: str, store: EmbeddingStore, shards: LocationLike | None = None) -> str:
    """A cache key for a partition: the hash of its entries' URLs (store root, identity, each shard's content).

    Made for a Prefect cache policy (`cache_key_fn=lambda ctx, p: partition_embedding_identity(...)`):
    the same shards, model, weights, preprocessing and store give the same key, anything else another.
    """
    reach = as_location(shards) if shards is not None else store.location
    entry_urls = [store.entry_url(identity, url, shard_fingerprint(reach.at(url))) for url in shard_urls]
    return hashlib.sha256("\n".join(entry_urls).encode()).hexdigest()
