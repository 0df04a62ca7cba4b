"""Hash lists: MD5/SHA-1 of image bytes and PDQ of pixels, list files read and refused, and exact PDQ matching.

Every image here is benign: scikit-image's sample photos and PIL-drawn pictures. The lists are built from
some of those photos, so the photos left out stand for the images a list must not match.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from tasks.errors import StorageUnavailable, UserError
from tasks.hashes import image_hashes, pdq_index
from tasks.hashes.image_hashes import bytes_hashes, pdq_hash, pdq_hex, pdq_of_image
from tasks.hashes.lists import MAX_LINE_BYTES, read_hash_lists
from tasks.hashes.pdq_index import PDQIndex, match_pdq
from tasks.io.locations import Location
from tests.support.s3 import NO_RETRIES
from tests.support.tars import drawn_image, encode, photo

# The reference C++ (ThreatExchange's pdqhashing.cpp, as the `pdqhash` 0.2.8 package builds it) on these photos'
# RGB pixels: (hash as ThreatExchange writes it, quality).
REFERENCE_PDQ = {
    "astronaut": ("2d6b1af3a956c529e79ca3d2526fa834d4196c81cedd04de0a26b855fc99b724", 100),
    "coffee": ("8c629e779a663698b9a33866c026726c21a679f61eb6e1f8c79ba7e23c8299e0", 100),
    "chelsea": ("5feb5321f01da156898e2bf629a5d3438412cdbd23f48942464526315db33ffd", 100),
    "rocket": ("8792786c87937064bf1bc0e43f1fc0e03f1cc2e33da4c2537cec821b2ce4f376", 100),
    "motorcycle": ("e0c9cfdb78d358d68a58ec54e94ba55937525b67508a0b87ad64fc6b4631c470", 100),
    "hubble_deep_field": ("1c6715e46266634f72d42df2324ad397e70e86be9c665c59a42ec19c3369b919", 100),
    "retina": ("83d22b5802d238191b87b1f8bf1ad487fc0f55f8405adc011fafa8f4ebfc2a59", 100),
    "immunohistochemistry": ("d359e15bfc0e7e848183e670de26db0b8309e9b06cb6ac4becc9b073ba52f026", 100),
}
LISTED = ("astronaut", "coffee", "chelsea")
UNLISTED = ("rocket", "motorcycle", "immunohistochemistry")
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.int64)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def hamming(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Bit differences between rows of uint8 [..., 32] arrays (broadcasting)."""
    return _POPCOUNT[np.bitwise_xor(first, second)].sum(axis=-1)


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# Variants a list must still catch: each is the photo after one everyday edit.
def half_size(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.LANCZOS)


def jpeg_quality_50(image: Image.Image) -> Image.Image:
    return Image.open(io.BytesIO(encode(image, "JPEG", quality=50))).convert("RGB")


def cropped_1_percent(image: Image.Image) -> Image.Image:
    """1% of the width and of the height trimmed off, half at each edge."""
    dx, dy = max(1, round(image.width * 0.01)), max(1, round(image.height * 0.01))
    return image.crop((dx // 2, dy // 2, image.width - (dx - dx // 2), image.height - (dy - dy // 2)))


def brighter(image: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(1.2)


VARIANTS = (half_size, jpeg_quality_50, cropped_1_percent, brighter)


@pytest.fixture(scope="module")
def photo_files() -> dict[str, bytes]:
    """Each sample photo as the JPEG member a shard would hold."""
    return {name: encode(photo(name), "JPEG", quality=90) for name in LISTED + UNLISTED}


@pytest.fixture(scope="module")
def decoded(photo_files) -> dict[str, np.ndarray]:
    return {name: pixels(Image.open(io.BytesIO(data))) for name, data in photo_files.items()}


@pytest.fixture(scope="module")
def list_dir(tmp_path_factory, photo_files, decoded):
    """Three list files made from the listed photos: PDQ hashes, MD5 digests and SHA-1 digests."""
    directory = tmp_path_factory.mktemp("lists")
    pdq_lines = [f"# PDQ of {name}\n{pdq_hex(pdq_hash(decoded[name])[0])}\n" for name in LISTED]
    write(directory / "pdq.txt", "".join(pdq_lines))
    write(directory / "md5.txt", "".join(f"{bytes_hashes(photo_files[name])[0]}\n" for name in LISTED))
    write(directory / "sha1.txt", "".join(f"{bytes_hashes(photo_files[name])[1].upper()}\n" for name in LISTED))
    return directory


@pytest.fixture(scope="module")
def hash_lists(list_dir):
    return read_hash_lists([list_dir / "pdq.txt", list_dir / "md5.txt", list_dir / "sha1.txt"])


# ---------------------------------------------------------------------------------------------------
# Image hashes


def test_pdq_gives_the_reference_bits_and_quality_on_the_sample_photos():
    for name, (reference_hex, reference_quality) in REFERENCE_PDQ.items():
        bits, quality = pdq_hash(pixels(photo(name)))
        assert (pdq_hex(bits), quality) == (reference_hex, reference_quality), name


def test_pdq_of_image_gives_the_reference_bits_from_pillows_luma_without_a_copy_of_the_pixels():
    for name, (reference_hex, reference_quality) in REFERENCE_PDQ.items():
        assert pdq_of_image(photo(name)) == (bytes.fromhex(reference_hex), reference_quality), name  # 0 bits apart
    for seed, (width, height) in enumerate([(5, 5), (64, 64), (333, 97), (1000, 17), (2100, 2100)]):  # the last: > 4 MP
        image = drawn_image(width, height, seed=seed)
        assert pdq_of_image(image) == pdq_hash(pixels(image)), (width, height)
    image = photo("chelsea")
    for mode in ("L", "RGBA", "P", "CMYK"):  # any mode is hashed as its RGB pixels
        other = image.convert(mode)
        assert pdq_of_image(other) == pdq_hash(pixels(other)), mode
    assert pdq_of_image(image.crop((0, 0, 4, 300))) == (bytes(32), 0)


def test_the_luma_read_in_place_outlives_its_image():
    image = photo("coffee")
    luma = image_hashes._float_luma(image)
    expected = np.asarray(image.convert("F"))
    del image
    others = [photo("rocket").convert("F") for _ in range(4)]  # reuse of freed memory would show here
    assert luma.dtype == np.float32 and np.array_equal(luma, expected) and len(others) == 4


def test_pdq_agrees_with_the_pdqhash_package_on_drawn_images_of_many_sizes():
    pdqhash = pytest.importorskip("pdqhash")
    sizes = [(5, 5), (64, 64), (127, 128), (129, 300), (333, 97), (640, 480), (1000, 17)]
    for seed, (width, height) in enumerate(sizes):
        image = pixels(drawn_image(width, height, seed=seed))
        reference_bits, reference_quality = pdqhash.compute(image)
        bits, quality = pdq_hash(image)
        assert (bits, quality) == (np.packbits(reference_bits.astype(np.uint8)).tobytes(), reference_quality), (width, height)


def test_pdq_takes_a_view_as_its_copy_and_refuses_what_is_not_rgb_bytes():
    image = pixels(photo("coffee"))
    view = image[10:-10, 20:-20]
    assert pdq_hash(view) == pdq_hash(view.copy())
    for bad in (image.astype(np.float32), image[..., 0], np.dstack([image, image[..., :1]]), image.tolist()):
        with pytest.raises(ValueError):
            pdq_hash(bad)
    assert pdq_hash(image[:4]) == (bytes(32), 0)  # under 5 px on a side: the reference's empty hash


def test_pdq_hex_writes_bit_255_first():
    assert pdq_hex(bytes([0x80]) + bytes(31)) == "80" + "0" * 62
    assert pdq_hex(bytes(31) + bytes([0x01])) == "0" * 62 + "01"
    with pytest.raises(ValueError):
        pdq_hex(bytes(16))


def test_bytes_hashes_are_md5_and_sha1_hex():
    assert bytes_hashes(b"") == ("d41d8cd98f00b204e9800998ecf8427e", "da39a3ee5e6b4b0d3255bfef95601890afd80709")


# ---------------------------------------------------------------------------------------------------
# Matching lists against images


def test_variants_of_listed_photos_match_by_pdq_and_other_photos_do_not(hash_lists, decoded):
    pdq_list = hash_lists.lists[0]
    index = PDQIndex(pdq_list.pdq)
    names, hashes, qualities = [], [], []
    for name in LISTED + UNLISTED:
        original = Image.fromarray(decoded[name])
        for variant in VARIANTS:
            bits, quality = pdq_hash(pixels(variant(original)))
            names.append((name, variant.__name__))
            hashes.append(np.frombuffer(bits, dtype=np.uint8))
            qualities.append(quality)
    matches = match_pdq(index, np.stack(hashes), np.array(qualities))
    found = {names[row]: (LISTED[list_row], distance) for row, list_row, distance in matches}
    for name in LISTED:
        for variant in VARIANTS:
            listed_as, distance = found[(name, variant.__name__)]
            assert listed_as == name and distance <= 31, (name, variant.__name__, distance)
    assert not [key for key in found if key[0] in UNLISTED]
    assert len(matches) == len(LISTED) * len(VARIANTS)  # each variant matches its own photo only


def test_exact_lists_match_only_the_original_bytes(hash_lists, photo_files):
    for name in LISTED:
        assert hash_lists.exact_matches(*bytes_hashes(photo_files[name])) == ("md5.txt", "sha1.txt")
        same_pixels_other_file = encode(Image.open(io.BytesIO(photo_files[name])), "JPEG", quality=89)
        assert hash_lists.exact_matches(*bytes_hashes(same_pixels_other_file)) == ()
        assert hash_lists.exact_matches(*bytes_hashes(photo_files[name] + b"\0")) == ()
    for name in UNLISTED:
        assert hash_lists.exact_matches(*bytes_hashes(photo_files[name])) == ()


def test_a_flat_image_has_low_quality_and_is_not_matched_even_when_listed(tmp_path):
    flat = np.full((240, 320, 3), (90, 140, 200), dtype=np.uint8)
    gradient = np.repeat(np.linspace(0, 255, 320).astype(np.uint8)[None, :, None], 3, axis=2).repeat(240, axis=0)
    flat_bits, flat_quality = pdq_hash(flat)
    gradient_bits, gradient_quality = pdq_hash(gradient)
    assert flat_quality < 50 and gradient_quality < 50
    listed = read_hash_lists([write(tmp_path / "flat.txt", f"{pdq_hex(flat_bits)}\n{pdq_hex(gradient_bits)}\n")])
    index = PDQIndex(listed.lists[0].pdq)
    queries = np.stack([np.frombuffer(flat_bits, np.uint8), np.frombuffer(gradient_bits, np.uint8)])
    assert {(row, distance) for row, _, distance in index.match(queries)} >= {(0, 0), (1, 0)}  # there, at distance 0
    assert match_pdq(index, queries, np.array([flat_quality, gradient_quality])) == []
    assert match_pdq(index, queries, np.array([flat_quality, gradient_quality]), min_quality=0) != []


# ---------------------------------------------------------------------------------------------------
# The index: exact against brute force


@pytest.fixture(scope="module")
def random_list_and_queries():
    """3000 random list hashes; queries planted at each distance 0..40 from list rows, and unrelated ones."""
    rng = np.random.default_rng(7)
    listed = rng.integers(0, 256, (3000, 32), dtype=np.uint8)
    queries = []
    for distance in range(41):
        for _ in range(3):
            flips = np.zeros(256, dtype=np.uint8)
            flips[rng.choice(256, distance, replace=False)] = 1
            queries.append(listed[rng.integers(len(listed))] ^ np.packbits(flips))
    queries = np.concatenate([np.stack(queries), rng.integers(0, 256, (60, 32), dtype=np.uint8)])
    return listed, queries


@pytest.mark.parametrize("max_distance", [0, 15, 16, 31, 47])
def test_index_finds_exactly_the_pairs_brute_force_finds(random_list_and_queries, max_distance):
    listed, queries = random_list_and_queries
    distances = hamming(queries[:, None, :], listed[None, :, :])
    query_rows, list_rows = np.nonzero(distances <= max_distance)
    expected = sorted(zip(query_rows.tolist(), distances[query_rows, list_rows].tolist(), list_rows.tolist()))
    found = PDQIndex(listed).match(queries, max_distance=max_distance)
    assert sorted((row, distance, list_row) for row, list_row, distance in found) == expected
    assert found == sorted(found, key=lambda match: (match[0], match[2], match[1]))  # query row, distance, list row
    if max_distance == 31:  # the planted neighbours: 3 per distance, 0..31 found and 32..40 not
        assert sorted({row // 3 for row, _, _ in found if row < 123}) == list(range(32))


def near_copies(hashes: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Each row with up to `bits` of its 256 bits flipped (positions drawn at random, so some may repeat)."""
    flips = np.zeros((len(hashes), 256), dtype=np.uint8)
    np.put_along_axis(flips, rng.integers(0, 256, (len(hashes), bits)), 1, axis=1)
    return hashes ^ np.packbits(flips, axis=1)


def test_index_equals_faiss_brute_force_at_100000_list_hashes_with_a_crowded_cluster(monkeypatch):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, (1, 32), dtype=np.uint8)
    cluster = np.concatenate([near_copies(np.repeat(base, 1000, axis=0), bits, rng) for bits in range(5)])
    listed = np.concatenate([rng.integers(0, 256, (95000, 32), dtype=np.uint8), cluster])
    planted = np.concatenate([near_copies(listed[rng.integers(0, 95000, 4)], bits, rng) for bits in range(0, 48)])
    near_cluster = np.concatenate([near_copies(base, bits, rng) for bits in (0, 10, 20, 29, 35)])
    queries = np.concatenate([planted, near_cluster, rng.integers(0, 256, (40, 32), dtype=np.uint8)])
    brute_force = faiss.IndexBinaryFlat(256)
    brute_force.add(listed)
    index = PDQIndex(listed)
    for candidates_per_step in (pdq_index._CANDIDATES_PER_STEP, 1000):  # 1000: the cluster's buckets exceed a step
        monkeypatch.setattr(pdq_index, "_CANDIDATES_PER_STEP", candidates_per_step)
        for max_distance in (31, 47):
            limits, distances, labels = brute_force.range_search(queries, max_distance + 1)  # the radius is exclusive
            query_rows = np.repeat(np.arange(len(queries)), np.diff(limits.astype(np.int64)))
            expected = set(zip(query_rows.tolist(), labels.tolist(), distances.astype(int).tolist()))
            found = index.match(queries, max_distance=max_distance)
            assert len(found) == len(set(found)) and set(found) == expected, (candidates_per_step, max_distance)
            assert len(expected) > 2 * len(cluster)  # the queries near the cluster match thousands of its hashes


def test_index_counts_bits_the_same_without_numpys_bitwise_count(random_list_and_queries, monkeypatch):
    listed, queries = random_list_and_queries
    index = PDQIndex(listed)
    expected = index.match(queries, max_distance=31)
    monkeypatch.delattr(np, "bitwise_count")  # numpy before 2.0
    assert index.match(queries, max_distance=31) == expected and len(expected) >= 96  # 3 planted at each of 0..31


def test_index_pickles_as_its_hashes_and_refuses_bad_arguments(random_list_and_queries):
    listed, queries = random_list_and_queries
    index = PDQIndex(listed)
    copy = pickle.loads(pickle.dumps(index))
    assert copy.match(queries) == index.match(queries) and len(copy) == len(listed)
    assert repr(index) == "PDQIndex(3000 hashes)"
    assert PDQIndex(listed[:0]).match(queries) == [] and index.match(queries[:0]) == []
    for bad_distance in (-1, 64, 2.5, True):
        with pytest.raises(UserError) as refused:
            index.match(queries, max_distance=bad_distance)
        assert one_sentence(str(refused.value))
    with pytest.raises(UserError):
        match_pdq(index, queries, np.full(len(queries), 100), min_quality=101)
    with pytest.raises(ValueError):
        index.match(queries.astype(np.int16))
    with pytest.raises(ValueError):
        match_pdq(index, queries, np.full(len(queries) - 1, 100))


# ---------------------------------------------------------------------------------------------------
# List files


def test_a_list_allows_any_case_comments_blank_lines_and_repeats(tmp_path, hash_lists, list_dir):
    md5, sha1, pdq = "0123456789abcdef" * 2, "0123456789" * 4, "89abcdef" * 8
    text = f"\ufeff# known hashes\n\n{md5.upper()}\r\n{sha1}  # a trailing comment\n  {pdq}\n{pdq.upper()}\n{md5}\n"
    (one,) = read_hash_lists([write(tmp_path / "mixed.txt", text)]).lists
    assert one.name == "mixed.txt" and one.md5 == {md5} and one.sha1 == {sha1}
    assert one.pdq.shape == (1, 32) and one.pdq[0].tobytes().hex() == pdq and not one.pdq.flags.writeable
    counts = [(item.name, len(item.md5), len(item.sha1), len(item.pdq)) for item in hash_lists.lists]
    assert counts == [("pdq.txt", 0, 0, 3), ("md5.txt", 3, 0, 0), ("sha1.txt", 0, 3, 0)]


def test_the_fingerprint_names_the_content_and_nothing_shows_a_hash(tmp_path, hash_lists, list_dir):
    hashes = [line for name in ("pdq.txt", "md5.txt", "sha1.txt") for line in (list_dir / name).read_text().split("\n")
              if line and not line.startswith("#")]
    rewritten = tmp_path / "same"  # the same lists: other order, case and comments, a repeat
    write(rewritten / "pdq.txt", "\n".join(reversed([h.upper() for h in hashes[:3]])) + f"\n# again\n{hashes[0]}\n")
    write(rewritten / "md5.txt", "\n".join(hashes[3:6]))
    write(rewritten / "sha1.txt", "\n".join(h.lower() for h in hashes[6:]))
    same = read_hash_lists([rewritten / "sha1.txt", rewritten / "md5.txt", rewritten / "pdq.txt"])
    assert same.fingerprint == hash_lists.fingerprint and len(hash_lists.fingerprint) == 64
    changed = tmp_path / "changed"
    write(changed / "pdq.txt", "\n".join(hashes[:2]))
    write(changed / "md5.txt", "\n".join(hashes[3:6]))
    write(changed / "sha1.txt", "\n".join(hashes[6:]))
    assert read_hash_lists([changed / "pdq.txt", changed / "md5.txt", changed / "sha1.txt"]).fingerprint != hash_lists.fingerprint
    shown = " ".join([repr(hash_lists), str(hash_lists), *map(repr, hash_lists.lists), *map(str, hash_lists.lists)]).lower()
    assert "pdq.txt" in shown and not [h for h in hashes if h.lower() in shown]


BAD_LINES = {
    "33 hex digits": "a" * 33,
    "63 hex digits": "b" * 63,
    "not hex": "0123456789abcdefghij0123456789ab",
    "two hashes on one line": f"{'c' * 32} {'d' * 32}",
    "a hash with its quality": f"{'e' * 64},100",
    "bytes that are no text": "\udcff\udcfe" * 16,
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_line_is_one_sentence_naming_the_file_and_line_but_not_the_line(tmp_path, case):
    bad_line = BAD_LINES[case]
    data = f"# list\n{'f' * 32}\n\n{bad_line}\n{'0' * 40}\n".encode("utf-8", "surrogateescape")
    path = write(tmp_path / "known.txt", data)
    with pytest.raises(UserError) as refused:
        read_hash_lists([path])
    message = str(refused.value)
    assert one_sentence(message) and str(path) in message and "line 4 " in message
    assert not [part for part in bad_line.replace(",", " ").split() if len(part) >= 8 and part in message]


def test_an_overlong_line_is_refused_without_reading_it_whole(tmp_path):
    path = write(tmp_path / "long.txt", "a" * 32 + "\n" + "b" * (10 * MAX_LINE_BYTES))
    with pytest.raises(UserError) as refused:
        read_hash_lists([path])
    assert one_sentence(str(refused.value)) and "line 2 " in str(refused.value) and "bbbbbbbb" not in str(refused.value)


@pytest.mark.parametrize(
    "content, expected",
    [("", "holds no hash"), ("# only a comment\n\n   \n", "holds no hash"), (None, "does not exist"), ("dir", "is a directory")],
)
def test_an_empty_missing_or_unreadable_list_is_one_sentence(tmp_path, content, expected):
    path = tmp_path / "list.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        write(path, content)
    with pytest.raises(UserError) as refused:
        read_hash_lists([path])
    assert one_sentence(str(refused.value)) and str(path) in str(refused.value) and expected in str(refused.value)


def test_lists_need_distinct_names_and_at_least_one_file(tmp_path):
    first, second = write(tmp_path / "a" / "list.txt", "a" * 32), write(tmp_path / "b" / "list.txt", "b" * 32)
    for bad in ([first, second], [], str(first)):
        with pytest.raises(UserError) as refused:
            read_hash_lists(bad)
        assert one_sentence(str(refused.value))


def test_a_list_in_object_storage_reads_the_same_and_a_missing_one_is_one_sentence(s3_bucket, tmp_path, list_dir, hash_lists):
    import fsspec

    fs = fsspec.filesystem("s3")
    for name in ("pdq.txt", "md5.txt", "sha1.txt"):
        fs.pipe(f"{s3_bucket}/lists/{name}", (list_dir / name).read_bytes())
    remote = read_hash_lists([f"s3://{s3_bucket}/lists/{name}" for name in ("pdq.txt", "md5.txt", "sha1.txt")])
    assert remote.fingerprint == hash_lists.fingerprint
    with pytest.raises(UserError) as refused:
        read_hash_lists([f"s3://{s3_bucket}/lists/missing.txt"])
    assert one_sentence(str(refused.value)) and "does not exist" in str(refused.value)


def test_unreachable_storage_is_one_sentence_that_may_pass(unreachable_s3):
    with pytest.raises(StorageUnavailable) as refused:
        read_hash_lists([Location("s3://some-bucket/lists/pdq.txt", NO_RETRIES)])
    assert one_sentence(str(refused.value)) and "s3://some-bucket/lists/pdq.txt" in str(refused.value)


def test_the_fingerprint_ignores_file_order_when_pdq_hashes_share_their_first_bytes(tmp_path):
    shared = "ab" * 8
    hashes = [shared + f"{value:048x}" for value in (3, 1, 2)]
    first = read_hash_lists([write(tmp_path / "one" / "pdq.txt", "\n".join(hashes))])
    second = read_hash_lists([write(tmp_path / "two" / "pdq.txt", "\n".join(sorted(hashes)))])
    assert first.fingerprint == second.fingerprint
    assert [row.tobytes().hex() for row in first.lists[0].pdq] == hashes  # rows stay in file order
