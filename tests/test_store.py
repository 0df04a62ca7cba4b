"""The embedding store: layout, hits and misses, corrupt entries, concurrent writers, S3 through moto."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.io.locations import Location, redacted
from tasks.errors import UserError
from tasks.store.entries import (
    NON_FINITE_REASON,
    NOT_UNIT_REASON,
    CorruptEntryWarning,
    EmbeddingStore,
    embedding_matrix,
    embedding_table,
    partition_embedding_identity,
    shard_fingerprint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
IDENTITY = "tiny-clip-0123456789abcdef0123456789abcdef"
DIM = 16


def unit_rows(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def sample_table(shard_url: str, n: int = 5, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    embeddings = unit_rows(n, seed)
    keys = [f"{i:05d}" for i in range(n - 1)] + [None]
    errors = [None] * (n - 2) + ["cannot identify image file", "tar is truncated"]
    return embedding_table(keys, shard_url, embeddings, errors), embeddings


def write_shard(path: Path, payload: bytes = b"shard bytes") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return str(path)


def test_write_then_read_roundtrip_layout_and_columns(tmp_path):
    shard = write_shard(tmp_path / "data" / "00007.tar")
    store = EmbeddingStore(tmp_path / "cache")
    table, embeddings = sample_table(shard)
    url = store.write(IDENTITY, shard, table, metadata={"model_name": "tiny-clip"})

    md5 = hashlib.md5(Path(shard).read_bytes()).hexdigest()
    assert url == f"{tmp_path}/cache/{IDENTITY}/00007-md5-{md5}.parquet"
    assert url == store.entry_url(IDENTITY, shard)
    assert store.has(IDENTITY, shard)

    # Readable by plain pyarrow/pandas, with the documented columns and types.
    raw = pq.read_table(url)
    assert raw.column_names == ["key", "shard", "embedding", "error"]
    assert pa.types.is_fixed_size_list(raw.schema.field("embedding").type)
    assert raw.schema.field("embedding").type.list_size == DIM
    assert pa.types.is_float32(raw.schema.field("embedding").type.value_type)
    record = json.loads(raw.schema.metadata[b"nsfw_curator"])
    assert record["identity"] == IDENTITY and record["rows"] == 5 and record["model_name"] == "tiny-clip"

    frame = store.read(IDENTITY, shard)
    assert isinstance(frame, pd.DataFrame)
    assert frame["key"].tolist()[:4] == ["00000", "00001", "00002", "00003"] and pd.isna(frame["key"].iloc[4])
    assert frame["error"].isna().tolist() == [True, True, True, False, False]
    assert frame["error"].tolist()[3:] == ["cannot identify image file", "tar is truncated"]
    assert frame["embedding"].iloc[3] is None and frame["embedding"].iloc[4] is None
    assert set(frame["shard"]) == {shard}
    matrix = embedding_matrix(frame)
    np.testing.assert_array_equal(matrix[:3], embeddings[:3])
    assert np.isnan(matrix[3:]).all()
    np.testing.assert_array_equal(embedding_matrix(store.read_table(IDENTITY, shard)), matrix)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_miss_on_changed_content_identity_or_store(tmp_path):
    shard = write_shard(tmp_path / "a.tar", b"first version")
    store = EmbeddingStore(tmp_path / "cache")
    assert store.read(IDENTITY, shard) is None and not store.has(IDENTITY, shard)
    store.write(IDENTITY, shard, sample_table(shard)[0])
    assert store.read(IDENTITY, shard) is not None

    other_identity = IDENTITY.replace("0123", "9999", 1)
    assert store.read(other_identity, shard) is None and not store.has(other_identity, shard)
    assert EmbeddingStore(tmp_path / "other-cache").read(IDENTITY, shard) is None

    write_shard(tmp_path / "a.tar", b"second version")
    assert store.read(IDENTITY, shard) is None and not store.has(IDENTITY, shard)
    # The same bytes again: the old entry is valid again.
    write_shard(tmp_path / "a.tar", b"first version")
    assert store.read(IDENTITY, shard) is not None


def test_same_bytes_elsewhere_hit_and_report_the_asked_shard(tmp_path):
    first = write_shard(tmp_path / "x" / "00001.tar", b"same")
    moved = write_shard(tmp_path / "y" / "00001.tar", b"same")
    store = EmbeddingStore(tmp_path / "cache")
    store.write(IDENTITY, first, sample_table(first)[0])
    frame = store.read(IDENTITY, moved)
    assert frame is not None and set(frame["shard"]) == {moved}
    assert shard_fingerprint(first) == shard_fingerprint(f"file://{moved}")


def test_shard_fingerprint_is_the_content_md5_and_follows_rewrites(tmp_path):
    shard = write_shard(tmp_path / "s.tar", b"abc" * 1000)
    assert shard_fingerprint(shard) == f"md5-{hashlib.md5(b'abc' * 1000).hexdigest()}"
    write_shard(tmp_path / "s.tar", b"abd" * 1000)  # same size, new content
    assert shard_fingerprint(shard) == f"md5-{hashlib.md5(b'abd' * 1000).hexdigest()}"
    with pytest.raises(UserError, match="does not exist; check file_paths"):
        shard_fingerprint(str(tmp_path / "missing.tar"))


@pytest.mark.parametrize(
    "damage",
    ["truncate", "flip_data_byte", "garbage", "empty", "wrong_identity"],
)
def test_unreadable_entry_is_a_miss_with_a_warning_and_is_rewritten(tmp_path, damage):
    shard = write_shard(tmp_path / "a.tar")
    store = EmbeddingStore(tmp_path / "cache")
    table, _ = sample_table(shard, n=50)
    url = store.write(IDENTITY, shard, table)
    data = Path(url).read_bytes()
    if damage == "truncate":
        Path(url).write_bytes(data[: len(data) // 2])
    elif damage == "flip_data_byte":
        # A byte inside the embedding column's data page: only the page checksum notices.
        offset = data.index(np.float32(table.column("embedding")[10].values[3].as_py()).tobytes())
        Path(url).write_bytes(data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1 :])
    elif damage == "garbage":
        Path(url).write_bytes(b"not parquet at all" * 10)
    elif damage == "empty":
        Path(url).write_bytes(b"")
    elif damage == "wrong_identity":
        other = EmbeddingStore(tmp_path / "elsewhere").write("other-identity", shard, table)
        Path(url).write_bytes(Path(other).read_bytes())

    with pytest.warns(CorruptEntryWarning, match="unreadable .*counting it as a miss"):
        assert store.read(IDENTITY, shard) is None
    if damage != "flip_data_byte":  # the footer of a flipped-page file is intact; only a full read sees it
        with pytest.warns(CorruptEntryWarning):
            assert not store.has(IDENTITY, shard)

    assert store.write(IDENTITY, shard, table) == url
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = store.read(IDENTITY, shard)
    assert frame is not None and len(frame) == 50


def rewrite_entry(url: str, keys: list, embeddings: np.ndarray, errors: list, record_update: dict | None = None, mask=None) -> None:
    """Write an entry the way someone with write access to the store could: any rows, a consistent footer."""
    record = json.loads(pq.read_schema(url).metadata[b"nsfw_curator"])
    record.update(rows=len(keys), embedding_dim=embeddings.shape[1], **(record_update or {}))
    mask = np.array([error is not None for error in errors]) if mask is None else mask
    column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(np.float32).reshape(-1)), embeddings.shape[1], mask=pa.array(mask))
    table = pa.table(
        {"key": pa.array(keys, pa.string()), "shard": pa.array([url] * len(keys), pa.string()), "embedding": column, "error": pa.array(errors, pa.string())}
    )
    pq.write_table(table.replace_schema_metadata({b"nsfw_curator": json.dumps(record)}), url, write_page_checksum=True)


POISONED = {
    # name: (how the entry is rewritten, what the warning says)
    "nan_rows": (lambda k, e, r: (k, np.where(np.arange(len(k))[:, None] == 1, np.nan, e), r), "non-finite embedding without an error"),
    "scaled_by_minus_30": (lambda k, e, r: (k, e * -30, r), "L2 norm 30, not 1"),
    "dropped_row": (lambda k, e, r: (k[:1] + k[2:], np.delete(e, 1, axis=0), r[:1] + r[2:]), "row 1 has key '00002', the shard has '00001'"),
    "other_dimension_forged_metadata": (lambda k, e, r: (k, unit_rows(len(k), 9, dim=2 * DIM), r), f"embedding dimension {2 * DIM}, the model gives {DIM}"),
    "keys_not_the_shards": (lambda k, e, r: ([k[1], k[0], *k[2:]], e, r), "row 0 has key '00001', the shard has '00000'"),
    "embedding_on_an_error_row": (lambda k, e, r: (k, np.nan_to_num(e, nan=0.25), r), "both an embedding and an error"),
    "error_row_without_key": (lambda k, e, r: (k[:-1] + [None], e, r[:-1] + [None]), "no key"),
}


@pytest.mark.parametrize("poison", list(POISONED))
def test_poisoned_entry_is_a_miss_with_a_warning_and_is_rewritten(tmp_path, poison):
    shard = write_shard(tmp_path / "a.tar")
    store = EmbeddingStore(tmp_path / "cache")
    table, _ = sample_table(shard, n=6)
    url = store.write(IDENTITY, shard, table)
    shard_keys = table.column("key").to_pylist()  # what streaming the shard gives
    keys, embeddings, errors = shard_keys, embedding_matrix(table), table.column("error").to_pylist()
    rewrite, reason = POISONED[poison]
    keys, embeddings, errors = rewrite(list(keys), embeddings, list(errors))
    mask = np.zeros(len(keys), bool) if poison == "embedding_on_an_error_row" else None
    rewrite_entry(url, keys, embeddings, errors, mask=mask)

    with pytest.warns(CorruptEntryWarning, match=f"invalid .*{re.escape(reason)}.*counting it as a miss"):
        assert store.read_table(IDENTITY, shard, embedding_dim=DIM, expected_keys=shard_keys) is None
    assert store.write(IDENTITY, shard, table) == url
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.read_table(IDENTITY, shard, embedding_dim=DIM, expected_keys=shard_keys) is not None


def test_forged_dimension_is_a_miss_from_the_footer_too(tmp_path):
    shard = write_shard(tmp_path / "a.tar")
    store = EmbeddingStore(tmp_path / "cache")
    table, _ = sample_table(shard, n=4)
    url = store.write(IDENTITY, shard, table)
    rewrite_entry(url, table.column("key").to_pylist(), unit_rows(4, 3, dim=512), table.column("error").to_pylist())
    assert store.has(IDENTITY, shard)  # the footer agrees with itself ...
    with pytest.warns(CorruptEntryWarning, match=f"dimension 512, the model gives {DIM}"):
        assert not store.has(IDENTITY, shard, embedding_dim=DIM)  # ... but not with the model


def test_float16_normalised_entries_pass(tmp_path):
    shard = write_shard(tmp_path / "a.tar")
    store = EmbeddingStore(tmp_path / "cache")
    rows = unit_rows(64, 5, dim=768).astype(np.float16)
    rows = (rows / np.linalg.norm(rows.astype(np.float16), axis=1, keepdims=True).astype(np.float16)).astype(np.float32)
    assert np.abs(np.linalg.norm(rows, axis=1) - 1).max() > 1e-5  # really off by float16 rounding
    keys = [f"{i:03d}" for i in range(64)]
    store.write(IDENTITY, shard, embedding_table(keys, shard, rows, [None] * 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = store.read_table(IDENTITY, shard, embedding_dim=768, expected_keys=keys)
    assert table is not None and table.column("error").null_count == 64


def test_model_outputs_that_are_not_unit_vectors_become_error_rows():
    rows = unit_rows(3, 1)
    rows[1] = np.nan
    rows[2] = 0.0
    table = embedding_table(["a", "b", "c"], "x.tar", rows, [None, None, None])
    assert table.column("error").to_pylist() == [None, NON_FINITE_REASON, NOT_UNIT_REASON]
    assert table.column("embedding").is_valid().to_pylist() == [True, False, False]


def test_with_a_store_key_only_entries_signed_with_it_are_used(tmp_path, monkeypatch):
    shard = write_shard(tmp_path / "a.tar")
    store = EmbeddingStore(tmp_path / "cache")
    table, _ = sample_table(shard, n=6)
    keys = table.column("key").to_pylist()
    monkeypatch.delenv("NSFW_CURATOR_STORE_KEY", raising=False)
    url = store.write(IDENTITY, shard, table)  # written before the team set a key: unsigned
    assert "signature" not in json.loads(pq.read_schema(url).metadata[b"nsfw_curator"])

    monkeypatch.setenv("NSFW_CURATOR_STORE_KEY", "team secret")
    with pytest.warns(CorruptEntryWarning, match="not signed, and NSFW_CURATOR_STORE_KEY is set"):
        assert not store.has(IDENTITY, shard)
    with pytest.warns(CorruptEntryWarning, match="not signed"):
        assert store.read_table(IDENTITY, shard) is None
    store.write(IDENTITY, shard, table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.has(IDENTITY, shard) and store.read_table(IDENTITY, shard, embedding_dim=DIM, expected_keys=keys) is not None
    signed = Path(url).read_bytes()
    assert b"team secret" not in signed

    # Well-formed rows the other checks cannot tell from the model's, under the signature that was there.
    signature = json.loads(pq.read_schema(url).metadata[b"nsfw_curator"])["signature"]
    rewrite_entry(url, keys, -embedding_matrix(table), table.column("error").to_pylist(), record_update={"signature": signature})
    with pytest.warns(CorruptEntryWarning, match="signature does not match"):
        assert store.read_table(IDENTITY, shard) is None
    # Signed with another key: another team's (or anyone's) write.
    monkeypatch.setenv("NSFW_CURATOR_STORE_KEY", "someone else")
    store.write(IDENTITY, shard, table)
    monkeypatch.setenv("NSFW_CURATOR_STORE_KEY", "team secret")
    with pytest.warns(CorruptEntryWarning, match="signature does not match"):
        assert store.read_table(IDENTITY, shard) is None
    # Without a key nothing is checked: signed entries read like any other.
    Path(url).write_bytes(signed)
    monkeypatch.delenv("NSFW_CURATOR_STORE_KEY")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.read_table(IDENTITY, shard) is not None


WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from tasks.store.entries import EmbeddingStore, embedding_table
    cache, shard, seed, rounds, reads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    store = EmbeddingStore(cache)
    n = 4000
    rows = np.zeros((n, 64), dtype=np.float32)
    rows[:, seed] = 1.0  # unit rows pointing at the writer's own axis: which writer made the file
    for round in range(rounds):
        while int(open(reads).read()) <= round:  # round r starts after the reader's (r+1)-th read: reads and writes interleave
            time.sleep(0.002)
        store.write("race-identity", shard, embedding_table([str(i) for i in range(n)], shard, rows, [None] * n))
    """
)


def run_concurrent_writers(cache: str, shard: str, rounds: int = 6) -> list[int]:
    """Two processes rewrite one entry while this one reads it; returns which writer each read saw (0: the first file)."""
    store = EmbeddingStore(cache)
    n = 4000
    first = np.zeros((n, 64), dtype=np.float32)
    first[:, 0] = 1.0
    store.write("race-identity", shard, embedding_table([str(i) for i in range(n)], shard, first, [None] * n))
    reads = Path(tempfile.mkdtemp(prefix="reads-")) / "count"
    reads.write_text("0")
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, cache, shard, str(seed), str(rounds), str(reads)], cwd=REPO_ROOT)
        for seed in (1, 2)
    ]
    seen: list[int] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a partial file would warn: fail instead
            while any(w.poll() is None for w in writers):
                table = store.read_table("race-identity", shard)
                assert table is not None and table.num_rows == n
                writer = embedding_matrix(table).argmax(axis=1)
                assert len(set(writer.tolist())) == 1  # one writer's complete file, never a mix
                seen.append(int(writer[0]))
                next_count = reads.with_suffix(".next")
                next_count.write_text(str(len(seen)))
                os.replace(next_count, reads)
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert [w.wait() for w in writers] == [0, 0]
    assert len(seen) >= rounds  # every write round waited for a read, so the reader really read while they wrote
    assert set(seen) <= {0, 1, 2}
    final = store.read_table("race-identity", shard)
    assert final is not None and final.num_rows == n
    assert set(embedding_matrix(final).argmax(axis=1).tolist()) in ({1}, {2})
    return seen


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    shard = write_shard(tmp_path / "race.tar")
    run_concurrent_writers(str(tmp_path / "cache"), shard)
    entries = list((tmp_path / "cache").rglob("*"))
    assert [p.name for p in entries if p.is_file()] == [Path(EmbeddingStore(tmp_path / "cache").entry_url("race-identity", shard)).name]


def test_partition_identity_follows_shards_identity_and_store(tmp_path):
    shards = [write_shard(tmp_path / f"{i}.tar", f"shard {i}".encode()) for i in range(3)]
    store = EmbeddingStore(tmp_path / "cache")
    key = partition_embedding_identity(shards, IDENTITY, store)
    assert key == partition_embedding_identity(list(shards), IDENTITY, EmbeddingStore(str(tmp_path / "cache") + "/"))
    assert key != partition_embedding_identity(shards, IDENTITY + "0", store)
    assert key != partition_embedding_identity(shards, IDENTITY, EmbeddingStore(tmp_path / "cache2"))
    assert key != partition_embedding_identity(shards[:2], IDENTITY, store)
    write_shard(tmp_path / "1.tar", b"changed")
    assert key != partition_embedding_identity(shards, IDENTITY, store)


def test_credentials_never_shown():
    store = EmbeddingStore(Location("s3://bucket/prefix", {"key": "AKIASECRET", "secret": "hunter2"}))
    assert "AKIASECRET" not in repr(store) and "hunter2" not in repr(store)
    assert redacted("s3://user:hunter2@bucket/x.tar") == "s3://bucket/x.tar"
    assert redacted("https://user:pw@host/a.tar") == "https://host/a.tar"
    assert redacted("s3://user:p@ss@bucket/x@y.tar") == "s3://bucket/x@y.tar"  # an unencoded @ in the secret


# --- S3 through moto's server -------------------------------------------------------------------


def test_store_on_s3(s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    shard = f"s3://{s3_bucket}/shards/00003.tar"
    fs.pipe_file(shard, b"tar bytes on s3")
    fingerprint = shard_fingerprint(shard)
    assert fingerprint.startswith("etag-")

    store = EmbeddingStore(f"s3://{s3_bucket}/cache")
    assert store.read(IDENTITY, shard) is None and not store.has(IDENTITY, shard)
    table, embeddings = sample_table(shard)
    url = store.write(IDENTITY, shard, table)
    assert url == f"s3://{s3_bucket}/cache/{IDENTITY}/00003-{fingerprint}.parquet"
    assert fs.exists(url) and store.has(IDENTITY, shard)
    np.testing.assert_array_equal(embedding_matrix(store.read(IDENTITY, shard))[:3], embeddings[:3])
    # pandas reads the store directly, credentials from the environment.
    assert len(pd.read_parquet(url)) == 5

    # A second store object (as another process would make) hits; new shard content misses.
    assert EmbeddingStore(f"s3://{s3_bucket}/cache/").read(IDENTITY, shard) is not None
    fs.pipe_file(shard, b"tar bytes on s3, rewritten")
    assert shard_fingerprint(shard) != fingerprint
    assert store.read(IDENTITY, shard) is None

    # A truncated object is a miss with a warning, then rewritten.
    fs.pipe_file(url, fs.cat_file(url)[:100])
    with pytest.warns(CorruptEntryWarning):
        assert store.read(IDENTITY, shard, fingerprint) is None
    store.write(IDENTITY, shard, table, shard_fingerprint=fingerprint)
    assert store.read(IDENTITY, shard, fingerprint) is not None


def test_concurrent_writers_on_s3(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    shard = f"s3://{s3_bucket}/race.tar"
    fs.pipe_file(shard, b"race")
    run_concurrent_writers(f"s3://{s3_bucket}/cache", shard, rounds=4)
    assert [p.rsplit("/", 1)[1] for p in fs.find(f"{s3_bucket}/cache")] == [
        EmbeddingStore(f"s3://{s3_bucket}/cache").entry_url("race-identity", shard).rsplit("/", 1)[1]
    ]


def test_missing_bucket_is_one_clear_sentence(s3_endpoint, tmp_path):
    shard = write_shard(tmp_path / "a.tar")
    store = EmbeddingStore("s3://no-such-bucket-for-tests/cache")
    table, _ = sample_table(shard)
    with pytest.raises(UserError, match="no-such-bucket-for-tests.*credentials"):
        store.write(IDENTITY, shard, table)


def test_an_entry_holding_a_retired_aspect_ratio_refusal_is_stale_and_others_stay_hits(tmp_path):
    """Earlier versions refused banners past 100:1 and stored that error; such an entry is embedded again, once."""
    shard = write_shard(tmp_path / "data" / "00001.tar")
    fresh_shard = write_shard(tmp_path / "data" / "00002.tar", b"other bytes")
    store = EmbeddingStore(tmp_path / "cache")
    embeddings = unit_rows(3)
    refused = "image 'banner.png' is 4000x20 pixels, one side over 100 times the other (the limit for resizing it)"
    store.write(IDENTITY, shard, embedding_table(["a", "banner", "c"], shard, embeddings, [None, refused, None]))
    store.write(IDENTITY, fresh_shard, embedding_table(["a", "b", "c"], fresh_shard, embeddings, [None, "image 'b.jpg' is truncated", None]))
    # The footer is sound (has() is footer-only); whoever reads the rows finds it stale and embeds the shard again.
    with pytest.warns(UserWarning, match="refused by a check this version no longer makes"):
        assert store.read(IDENTITY, shard) is None
    assert store.read(IDENTITY, fresh_shard) is not None
