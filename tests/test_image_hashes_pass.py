"""Image hashes from the embedding pass: each sample's MD5, SHA-1 and PDQ kept in its store entry, validated and signed.

The shard holds ordinary images, one EXIF-rotated, a corrupt and a truncated JPEG, an unsupported format, a
sample without an image, a 4 x 4 image and a damaged end; the expected hashes are hashlib's of each member's
bytes and `pdq_hash` of Pillow's own RGB decode of it.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.hashes.image_hashes import pdq_hash
from tasks.hashes.image_pass import hash_shard, with_hashes
from tasks.io.decode import DecodeOptions
from tasks.io.locations import as_location
from tasks.io.samples import ImageHashes
from tasks.models.bounded_transform import pixel_step
from tasks.models.clip_resolve import clip_identity, resolve_clip
from tasks.models.embed import embed_shard, feed_model_batches, load_clip_embedder
from tasks.store.entries import (
    HASH_COLUMNS,
    CorruptEntryWarning,
    EmbeddingStore,
    embedding_matrix,
    entry_hashes,
    entry_signature,
)
from tests.support.tars import Member, drawn_image, encode, jpeg_with_orientation, member_offsets, tar_bytes
from tests.support.tiny_clip import make_tiny_clip
from tests.support.transforms import KillingTransform

EXACT = DecodeOptions(reduced_jpeg_size=None)
KEY_VARIABLE = "NSFW_CURATOR_STORE_KEY"
_truncated_source = encode(drawn_image(120, 90, seed=5), "JPEG", quality=90)
MEMBERS = [
    Member("a.jpg", encode(drawn_image(96, 64, seed=1), "JPEG", quality=90)),
    Member("a.txt", b"a caption"),
    Member("b.png", encode(drawn_image(80, 80, seed=2), "PNG")),
    Member("rotated.jpg", jpeg_with_orientation(drawn_image(90, 60, seed=3), 6)),
    Member("corrupt.jpg", b"\xff\xd8\xff" + bytes(range(256)) * 8),  # refused when its header is read
    Member("truncated.jpg", _truncated_source[: len(_truncated_source) // 2]),  # refused when its pixels are decoded
    Member("heic.heic", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64),
    Member("textonly.txt", b"no picture"),
    Member("tiny.png", encode(drawn_image(4, 4, seed=4), "PNG")),  # under PDQ's 5 px: the zero hash of quality 0
    Member("lost.jpg", _truncated_source),  # the tar ends inside it
]
WITHOUT_PIXELS = {"corrupt", "truncated", "heic"}


def expected_hashes() -> dict[str, ImageHashes | None]:
    """What each sample's hashes must be: hashlib's of the member bytes, PDQ of Pillow's RGB decode of the pixels as
    stored (no EXIF orientation applied: how ThreatExchange's hashers, and so the lists, read a file)."""
    expected: dict[str, ImageHashes | None] = {"textonly": None}
    for member in MEMBERS:
        key, extension = member.name.split(".", 1)
        if extension == "txt" or key == "lost":
            continue
        pdq, quality = None, None
        if key not in WITHOUT_PIXELS:
            pixels = np.asarray(Image.open(io.BytesIO(member.data)).convert("RGB"))
            pdq, quality = pdq_hash(pixels)
        expected[key] = ImageHashes(hashlib.md5(member.data).hexdigest(), hashlib.sha1(member.data).hexdigest(), pdq, quality)
    return expected


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    data = tar_bytes(MEMBERS)
    path = tmp_path_factory.mktemp("shards") / "00001.tar"
    path.write_bytes(data[: member_offsets(data)["lost.jpg"][1] + 100])
    return str(path)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    config, checkpoint = make_tiny_clip(tmp_path_factory.mktemp("clip"), embed_dim=64)
    return load_clip_embedder(resolve_clip(str(config), str(checkpoint)), "cpu", batch_size=3)


def embedded(tmp_path, embedder, shard: str, threads: int = 1) -> tuple[EmbeddingStore, str, pa.Table]:
    """The shard embedded into a fresh store (threads=1 decodes in a thread, 2 in worker processes): store, identity, entry."""
    store = EmbeddingStore(tmp_path / "cache")
    embed_shard(shard, embedder, store, EXACT, task_batch_size=4, threads=threads)
    identity = clip_identity(embedder.weights, EXACT.identity())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = store.read_table(identity, shard, embedding_dim=64)
    assert table is not None
    return store, identity, table


@pytest.fixture(scope="module")
def entry(tmp_path_factory, embedder, shard):
    return embedded(tmp_path_factory.mktemp("entry"), embedder, shard)


def stored_hashes(table: pa.Table) -> list[tuple[str | None, ImageHashes | None]]:
    found = entry_hashes(table)
    assert found is not None
    rows = []
    for row, key in enumerate(table.column("key").to_pylist()):
        if found.md5[row] is None:
            assert found.sha1[row] is None and not found.has_pdq[row]
            rows.append((key, None))
            continue
        pdq = found.pdq[row].tobytes() if found.has_pdq[row] else None
        rows.append((key, ImageHashes(found.md5[row], found.sha1[row], pdq, int(found.pdq_quality[row]) if found.has_pdq[row] else None)))
    return rows


@pytest.mark.parametrize("threads", [1, 2], ids=["threads", "processes"])
def test_the_embedding_pass_keeps_each_samples_md5_sha1_and_pdq_in_its_entry(tmp_path, embedder, shard, entry, threads):
    store, identity, table = entry if threads == 1 else embedded(tmp_path, embedder, shard, threads)
    expected = expected_hashes()
    rows = stored_hashes(table)
    assert [key for key, _ in rows] == ["a", "b", "rotated", "corrupt", "truncated", "heic", "textonly", "tiny", None]
    for key, hashes in rows[:-1]:
        assert hashes == expected[key], key
    assert rows[-1] == (None, None)  # the damaged end of the tar has no hashes
    errors = dict(zip(table.column("key").to_pylist(), table.column("error").to_pylist()))
    assert all(errors[key] for key in WITHOUT_PIXELS) and errors["a"] is None and errors["tiny"] is None
    assert dict(rows)["tiny"].pdq == bytes(32) and dict(rows)["tiny"].pdq_quality == 0
    assert dict(rows)["a"].pdq_quality > 0
    raw = pq.read_schema(store.entry_url(identity, shard))
    assert [(name, str(raw.field(name).type)) for name in HASH_COLUMNS] == [
        ("md5", "string"), ("sha1", "string"), ("pdq", "fixed_size_binary[32]"), ("pdq_quality", "int16")]


def test_a_sample_whose_decoder_died_keeps_the_hashes_of_its_bytes(embedder, shard):
    # a.jpg is 96 x 64: its worker process is killed before it sends anything back
    batches = list(feed_model_batches([shard], KillingTransform(pixel_step(embedder.transform), (96, 64)), 3, EXACT, task_batch_size=4, threads=2))
    rows = [(key, error, hashes) for batch in batches for (key, error), hashes in zip(batch.rows, batch.hashes)]
    expected = expected_hashes()
    killed = [row for row in rows if row[0] == "a"][0]
    assert "died while decoding image" in killed[1]
    assert killed[2] == ImageHashes(expected["a"].md5, expected["a"].sha1, None, None)
    assert [hashes for key, _, hashes in rows if key == "b"] == [expected["b"]]  # the others as before


def test_the_hashes_are_never_shown():
    hashes = ImageHashes("0" * 32, "1" * 40, b"\x07" * 32, 90)
    shown = repr(hashes) + str(hashes)
    assert "0" * 32 not in shown and "1" * 40 not in shown and "07" * 8 not in shown and "quality 90" in shown


def rewritten(table: pa.Table, url: str, change) -> None:
    """The entry file rewritten as someone with write access to the store could: `change(table)`, the footer kept."""
    metadata = pq.read_schema(url).metadata
    pq.write_table(change(table).replace_schema_metadata(metadata), url, write_page_checksum=True)


def _set(name: str, row: int, value):
    def change(table: pa.Table) -> pa.Table:
        values = table.column(name).to_pylist()
        values[row] = value
        return table.set_column(table.schema.get_field_index(name), table.schema.field(name), pa.array(values, table.schema.field(name).type))

    return change


def _retyped(name: str, new_type: pa.DataType):
    def change(table: pa.Table) -> pa.Table:
        return table.set_column(table.schema.get_field_index(name), pa.field(name, new_type), table.column(name).cast(new_type))

    return change


# rows of the entry: 0 a, 1 b, 2 rotated, 3 corrupt (no PDQ), 4 truncated, 5 heic, 6 textonly (no hashes), 7 tiny, 8 damage (no key)
TAMPERED = {
    "md5_upper_case": (lambda t: _set("md5", 0, t.column("md5")[0].as_py().upper())(t), "row 0's md5 is not 32 lowercase hex digits"),
    "md5_short": (lambda t: _set("md5", 1, t.column("md5")[1].as_py()[:31])(t), "row 1's md5 is not 32 lowercase hex digits"),
    "sha1_with_a_newline": (lambda t: _set("sha1", 2, t.column("sha1")[2].as_py()[:39] + "\n")(t), "row 2's sha1 is not 40 lowercase hex"),
    "sha1_not_hex": (lambda t: _set("sha1", 0, "g" * 40)(t), "row 0's sha1 is not 40 lowercase hex"),
    "md5_without_sha1": (_set("sha1", 3, None), "row 3 has one of md5 and sha1 without the other"),
    "pdq_without_quality": (_set("pdq_quality", 0, None), "row 0 has one of pdq and pdq_quality without the other"),
    "quality_without_pdq": (_set("pdq_quality", 3, 50), "row 3 has one of pdq and pdq_quality without the other"),
    "quality_over_100": (_set("pdq_quality", 1, 101), "row 1 has a pdq_quality outside 0..100"),
    "quality_negative": (_set("pdq_quality", 7, -1), "row 7 has a pdq_quality outside 0..100"),
    "pdq_without_md5": (lambda t: _set("sha1", 6, None)(_set("md5", 6, None)(_set("pdq_quality", 6, 60)(_set("pdq", 6, b"\x01" * 32)(t)))),
                        "row 6 has a pdq without an md5"),
    "hashes_without_key": (lambda t: _set("sha1", 8, "a" * 40)(_set("md5", 8, "b" * 32)(t)), "row 8 has hashes but no key"),
    "a_column_missing": (lambda t: t.drop_columns(["pdq_quality"]), "hash columns ['pdq_quality'] are missing"),
    "pdq_of_any_length": (_retyped("pdq", pa.binary()), "pdq column has type binary, not fixed_size_binary[32]"),
    "quality_as_int64": (_retyped("pdq_quality", pa.int64()), "pdq_quality column has type int64, not int16"),
}


@pytest.mark.parametrize("tampering", list(TAMPERED))
def test_an_entry_with_a_tampered_hash_column_is_a_miss_with_a_warning(tmp_path, entry, shard, tampering):
    _, identity, table = entry
    store = EmbeddingStore(tmp_path / "cache")
    url = store.write(identity, shard, table)
    change, reason = TAMPERED[tampering]
    rewritten(pq.read_table(url), url, change)

    with pytest.warns(CorruptEntryWarning, match=f"invalid .*{re.escape(reason)}.*counting it as a miss") as caught:
        assert store.read_table(identity, shard, embedding_dim=64) is None
    shown = " ".join(str(warning.message) for warning in caught)
    assert not any(value in shown for value in table.column("md5").drop_null().to_pylist() + table.column("sha1").drop_null().to_pylist())
    store.write(identity, shard, table)  # what the next embedding does: a usable entry again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.read_table(identity, shard, embedding_dim=64) is not None


def test_a_rewrite_that_changes_nothing_stays_a_hit(tmp_path, entry, shard):
    _, identity, table = entry
    store = EmbeddingStore(tmp_path / "cache")
    url = store.write(identity, shard, table)
    rewritten(pq.read_table(url), url, lambda t: t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.read_table(identity, shard, embedding_dim=64) is not None


def test_an_entry_written_before_hashes_is_still_read_and_has_none(tmp_path, entry, shard):
    _, identity, table = entry
    store = EmbeddingStore(tmp_path / "cache")
    url = store.write(identity, shard, table.drop_columns(list(HASH_COLUMNS)))
    assert pq.read_schema(url).names == ["key", "shard", "embedding", "error"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.has(identity, shard, embedding_dim=64)
        old = store.read_table(identity, shard, embedding_dim=64)
    assert old is not None and entry_hashes(old) is None
    assert np.array_equal(embedding_matrix(old), embedding_matrix(table), equal_nan=True)


def test_hash_shard_gives_an_old_entry_the_columns_embedding_writes(tmp_path, entry, shard):
    _, identity, table = entry
    store = EmbeddingStore(tmp_path / "cache")
    store.write(identity, shard, table.drop_columns(list(HASH_COLUMNS)))
    old = store.read_table(identity, shard, embedding_dim=64)

    hashes = hash_shard(as_location(shard), EXACT)
    assert hashes == stored_hashes(table)
    completed = with_hashes(old, hashes)
    assert completed.select(list(HASH_COLUMNS)).equals(table.select(list(HASH_COLUMNS)))
    store.write(identity, shard, completed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stored_hashes(store.read_table(identity, shard, embedding_dim=64)) == hashes

    with pytest.raises(ValueError, match="not of this entry's samples: row 0 has key 'a', the shard has 'b'"):
        with_hashes(old, hashes[1:2] + hashes[:1] + hashes[2:])
    with pytest.raises(ValueError, match="rows, the shard has"):
        with_hashes(old, hashes[:-1])


def _signature_before_hashes(key: bytes, identity: str, fingerprint: str, table: pa.Table) -> str:
    """The entry signature as it was computed before entries held hashes: old entries must keep verifying."""
    matrix = embedding_matrix(table)
    header = json.dumps([identity, fingerprint, table.column("key").to_pylist(), table.column("error").to_pylist(), list(matrix.shape)])
    digest = hashlib.sha256(header.encode())
    digest.update(np.ascontiguousarray(matrix, dtype="<f4").tobytes())
    return "hmac-sha256:" + hmac.new(key, digest.digest(), hashlib.sha256).hexdigest()


def test_the_store_key_signs_the_hash_columns_and_old_entries_keep_their_signature(tmp_path, entry, shard, monkeypatch):
    _, identity, table = entry
    monkeypatch.setenv(KEY_VARIABLE, "team secret")
    store = EmbeddingStore(tmp_path / "cache")
    url = store.write(identity, shard, table)
    fingerprint = json.loads(pq.read_schema(url).metadata[b"nsfw_curator"])["shard_fingerprint"]
    without = table.drop_columns(list(HASH_COLUMNS))
    assert entry_signature(b"team secret", identity, fingerprint, without) == _signature_before_hashes(b"team secret", identity, fingerprint, without)
    assert entry_signature(b"team secret", identity, fingerprint, table) != entry_signature(b"team secret", identity, fingerprint, without)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.read_table(identity, shard, embedding_dim=64) is not None

    def swapped_pdq(t: pa.Table) -> pa.Table:  # well-formed: only the signature can tell
        values = t.column("pdq").to_pylist()
        values[0], values[1] = values[1], values[0]
        return t.set_column(t.schema.get_field_index("pdq"), t.schema.field("pdq"), pa.array(values, pa.binary(32)))

    other_md5 = hashlib.md5(b"another image").hexdigest()
    for change in (swapped_pdq, _set("md5", 0, other_md5), _set("pdq_quality", 0, 100), lambda t: t.drop_columns(list(HASH_COLUMNS))):
        store.write(identity, shard, table)
        rewritten(pq.read_table(url), url, change)
        with pytest.warns(CorruptEntryWarning, match="signature does not match"):
            assert store.read_table(identity, shard, embedding_dim=64) is None

    store.write(identity, shard, without)  # an entry without hashes, signed: still a hit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = store.read_table(identity, shard, embedding_dim=64)
    assert old is not None and entry_hashes(old) is None and old.column("key").to_pylist() == table.column("key").to_pylist()
