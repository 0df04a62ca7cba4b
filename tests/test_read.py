"""Reading real WebDataset tars: every good and bad sample, damaged tars, batching, and S3 through moto."""

from __future__ import annotations

import io
import json
import tarfile
import threading

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.tars import (
    BAD_CASE_EXPECTED,
    Member,
    ZeroMember,
    bad_case_members,
    deeply_nested_json,
    drawn_image,
    encode,
    good_sample_members,
    jpeg_with_orientation,
    large_photo,
    long_number_json,
    member_offsets,
    photo,
    shard_of_good_samples,
    tar_bytes,
    wide_png,
    write_tar,
    write_tar_with_holes,
)
from tasks.io.locations import Location
from tasks.errors import UserError
from tests.support.s3 import NO_RETRIES
from tasks.io.read import MAX_JSON_DEPTH, MAX_JSON_NUMBER_CHARS, DecodeOptions, ReadLimits, Sample, image_extension, iter_batches, iter_samples


FULL = DecodeOptions(reduced_jpeg_size=None)  # exact pixels; reduced decoding has its own tests


@pytest.fixture(scope="module")
def bad_case_shard(tmp_path_factory):
    return str(write_tar(tmp_path_factory.mktemp("bad") / "bad.tar", bad_case_members()))


@pytest.fixture(scope="module")
def bad_case_samples(bad_case_shard):
    return list(iter_samples(bad_case_shard, FULL))


def by_key(samples: list[Sample]) -> dict[str, Sample]:
    """First sample of each key (the second 'split' is looked at separately)."""
    found: dict[str, Sample] = {}
    for sample in samples:
        found.setdefault(sample.key, sample)
    return found


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_every_sample_of_the_bad_case_shard_becomes_what_it_should(bad_case_shard, bad_case_samples):
    got = [(sample.key, sample.error) for sample in bad_case_samples]
    assert [key for key, _ in got] == [key for key, _ in BAD_CASE_EXPECTED]
    for (key, error), (_, expected) in zip(got, BAD_CASE_EXPECTED):
        if expected is None:
            assert error is None, (key, error)
        else:
            assert error is not None and expected in error, (key, error, expected)
            assert "\n" not in error and len(error) <= 160 and key is not None
    for sample in bad_case_samples:
        assert sample.shard == bad_case_shard
        assert (sample.image is None) == (sample.error is not None)
        if sample.image is not None:
            assert sample.image.mode == "RGB"


def test_nothing_is_silently_dropped(bad_case_samples):
    """Every member of the input is a member of a sample or named in a sample's error."""
    kept = [sample.member_name(ext) for sample in bad_case_samples for ext in sample.members]
    errors = " ".join(sample.error or "" for sample in bad_case_samples)
    for member in bad_case_members():
        assert member.name in kept or repr(member.name) in errors, member.name


def test_good_samples_keep_raw_bytes_caption_and_metadata(bad_case_shard, bad_case_samples):
    members = {m.name: m.data for m in bad_case_members()}
    good = by_key(bad_case_samples)["good"]
    assert list(good.members) == ["jpg", "txt", "json"]  # tar order
    assert all(good.members[ext] == members[f"good.{ext}"] for ext in good.members)  # byte for byte
    assert good.caption == "an astronaut"
    assert good.metadata == {"source": "skimage"}
    assert good.image.size == (512, 512)
    assert np.abs(pixels(good.image) - pixels(photo("astronaut"))).mean() < 3  # the JPEG of the astronaut
    default = next(iter_samples(bad_case_shard))  # by default every pixel is decoded
    assert default.key == "good" and default.image.size == (512, 512)
    reduced = next(iter_samples(bad_case_shard, DecodeOptions.for_model((224, 224), "reduced")))  # a 512 px JPEG at half size
    assert reduced.key == "good" and reduced.image.size == (256, 256)


def test_formats_modes_and_orientation(bad_case_samples):
    samples = by_key(bad_case_samples)
    assert samples["png"].image.size == (600, 400)
    assert np.array_equal(pixels(samples["png"].image), pixels(photo("coffee")))  # PNG is lossless
    assert samples["webp"].image.size == (640, 427)
    assert samples["tiff"].image.size == (451, 300)
    assert samples["bmp"].image.size == (64, 48)
    assert tuple(samples["gif"].image.getpixel((5, 5))) == (255, 0, 0)  # first frame of red, blue
    grey = pixels(samples["grey"].image)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    cmyk = pixels(samples["cmyk"].image)
    assert np.abs(cmyk - pixels(photo("coffee"))).mean() < 8
    alpha = samples["alpha"].image
    assert tuple(alpha.getpixel((2, 2))) == (255, 0, 0) and tuple(alpha.getpixel((30, 15))) == (255, 255, 255)
    assert tuple(samples["deep"].image.getpixel((0, 0))) == (128, 128, 128)  # 16-bit 0x8000 -> 128, not clipped
    rotated = samples["rotated"].image
    assert rotated.size == (300, 451)  # EXIF orientation 6 applied
    upright = photo("chelsea").transpose(Image.Transpose.ROTATE_270)
    assert np.abs(pixels(rotated) - pixels(upright)).mean() < 4


def test_webdataset_key_rules(bad_case_samples):
    samples = by_key(bad_case_samples)
    assert list(samples["upper"].members) == ["JPG"]  # extension case kept for the writer
    assert samples["upper"].image is not None
    assert samples["pngnamedjpg"].image.size == (50, 40)  # content decides the decoder
    assert samples["emptycaption"].caption == ""  # an empty caption is a value, not an error
    assert list(samples["multi"].members) == ["jpg", "seg.png"]  # key is up to the first dot
    assert samples["multi"].image.size == (50, 40)
    two = samples["two"]
    assert list(two.members) == ["png", "jpg"] and image_extension(two.members) == "jpg"
    assert pixels(two.image)[..., 2].min() > 240 and pixels(two.image)[..., 1].max() < 10  # the blue JPEG
    assert samples["d1/same"].image is not None and samples["d2/same"].image is not None
    splits = [sample for sample in bad_case_samples if sample.key == "split"]
    assert [list(s.members) for s in splits] == [["jpg"], ["txt"]]
    assert splits[0].error is None and "reappears" in splits[1].error


def test_bad_samples_keep_their_members_and_reasons(bad_case_samples):
    samples = by_key(bad_case_samples)
    assert samples["corrupt"].members["txt"] == b"kept with the error"
    assert samples["zero"].members == {"jpg": b"", "txt": b"the image is empty"}
    assert samples["truncated"].error == "image 'truncated.jpg' is truncated"
    assert samples["noimage"].error.startswith("no image member")
    assert samples["bomb"].error == "image 'bomb.png' has 3600000000 pixels, over Pillow's hard limit (possible decompression bomb)"
    assert samples["heic"].error == "image member 'heic.heic' has an unsupported format (.heic)"
    assert samples["ppm"].error == "image 'ppm.jpg' is in the unsupported format PPM"
    assert samples["../escape"].members  # still carried; the error keeps it from ever being written
    assert "never written" in samples["/absolute"].error
    assert samples["dup"].members and "appears twice" in samples["dup"].error
    assert samples["link"].members == {}
    assert samples["README"].members == {}


def test_raw_pass_has_the_same_keys_and_structural_errors(bad_case_shard, bad_case_samples):
    raw = list(iter_samples(bad_case_shard, decode=None))
    assert [s.key for s in raw] == [s.key for s in bad_case_samples]
    for plain, decoded in zip(raw, bad_case_samples):
        assert plain.members == decoded.members
        assert plain.image is None and plain.caption is None and plain.metadata is None
        if plain.error is not None:
            assert plain.error == decoded.error  # structure is judged the same way in both passes
    decode_only_errors = {s.key for s in bad_case_samples if s.error} - {s.key for s in raw if s.error}
    assert decode_only_errors == {"corrupt", "truncated", "bomb", "ppm", "badjson"}


def test_pixel_limit_guards_against_decompression_bombs(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [Member("big.png", encode(Image.new("RGB", (400, 300)), "PNG"))])
    [sample] = iter_samples(str(shard), DecodeOptions(max_pixels=100_000))
    assert sample.error == "image 'big.png' is 400x300 pixels, over the limit of 100000 (possible decompression bomb)"
    [sample] = iter_samples(str(shard), DecodeOptions(max_pixels=120_000))
    assert sample.error is None and sample.image.size == (400, 300)


def test_large_jpegs_decode_at_reduced_size_keeping_both_sides(tmp_path):
    big = large_photo(1200, 900)
    shard = write_tar(
        tmp_path / "s.tar",
        [
            Member("big.jpg", encode(big, "JPEG", quality=92)),
            Member("bigpng.png", encode(big, "PNG")),
            Member("turned.jpg", jpeg_with_orientation(big, 6)),
            Member("small.jpg", encode(big.resize((500, 375)), "JPEG")),
        ],
    )
    sizes = {s.key: s.image.size for s in iter_samples(str(shard), DecodeOptions(reduced_jpeg_size=256))}
    # 1/2 scale: 1/4 would make the short side 225 < 256. PNGs and small JPEGs are decoded in full.
    assert sizes == {"big": (600, 450), "bigpng": (1200, 900), "turned": (450, 600), "small": (500, 375)}
    full = {s.key: s.image for s in iter_samples(str(shard), DecodeOptions(reduced_jpeg_size=None))}
    assert full["big"].size == (1200, 900) and full["turned"].size == (900, 1200)
    reduced = next(iter_samples(str(shard), DecodeOptions(reduced_jpeg_size=200))).image
    assert reduced.size == (300, 225)
    downsized = pixels(full["big"].resize(reduced.size, Image.Resampling.BOX))
    assert np.abs(pixels(reduced) - downsized).mean() < 6  # the same picture, smaller


def test_decode_options_identity_and_validation():
    default = DecodeOptions()
    assert default == FULL == DecodeOptions.for_model((224, 224)) == DecodeOptions.for_model((336, 336), "exact")  # exact by default
    assert default.identity() == DecodeOptions(max_pixels=10).identity()  # the limit does not change pixels
    assert DecodeOptions(reduced_jpeg_size=256).identity() != default.identity()
    assert DecodeOptions(reduced_jpeg_size=300).identity() != DecodeOptions(reduced_jpeg_size=256).identity()
    assert "jpeg-reduced-min-side=off" in default.identity()
    assert DecodeOptions.for_model((224, 224), "reduced").reduced_jpeg_size == 256
    assert DecodeOptions.for_model((336, 336), "reduced").reduced_jpeg_size == 336  # never below the model's input
    with pytest.raises(UserError, match=r"^decode_mode must be one of exact, reduced, gpu, not 'fast'\.$"):
        DecodeOptions.for_model((224, 224), "fast")
    with pytest.raises(UserError, match=r"^max_pixels must be a positive whole number"):
        DecodeOptions(max_pixels=0)
    with pytest.raises(UserError, match=r"^reduced_jpeg_size must be a positive number of pixels or None"):
        DecodeOptions(reduced_jpeg_size=-5)


@pytest.fixture()
def four_samples():
    members = shard_of_good_samples(["a", "b", "c", "d"])
    data = tar_bytes(members)
    return data, member_offsets(data)


def read_bytes(tmp_path, data: bytes, name: str = "damaged.tar") -> list[Sample]:
    path = tmp_path / name
    path.write_bytes(data)
    return list(iter_samples(str(path)))


def test_truncated_tar_keeps_what_was_read_and_records_the_rest(tmp_path, four_samples):
    data, offsets = four_samples
    samples = read_bytes(tmp_path, data[: offsets["c.jpg"][1] + 100])
    assert [(s.key, s.error) for s in samples[:2]] == [("a", None), ("b", None)]
    assert samples[0].image is not None and samples[1].caption == "caption b"
    rest = samples[2]
    assert len(samples) == 3 and rest.key is None and rest.members == {}
    assert rest.error == "the tar is damaged inside member 'c.jpg' (unexpected end of data); the rest of the shard could not be read"


def test_corrupt_tar_header_is_not_mistaken_for_the_end(tmp_path, four_samples):
    data, offsets = four_samples
    header = offsets["c.jpg"][0]
    samples = read_bytes(tmp_path, data[:header] + b"\x07" * 512 + data[header + 512 :])
    assert [s.key for s in samples] == ["a", "b", None]
    assert samples[0].error is None
    assert "may be missing" in samples[1].error and samples[1].members  # b may have lost a member
    assert samples[2].error.startswith("the tar is damaged after member 'b.json' (a tar header is corrupt")


def test_tar_without_end_marker_is_reported(tmp_path, four_samples):
    data, offsets = four_samples
    samples = read_bytes(tmp_path, data[: offsets["d.json"][2]])  # cut off the end-of-archive blocks
    last = samples[-1]
    assert last.key is None and "end-of-archive marker" in last.error
    assert all(s.error is None for s in samples[:-2]) and "may be missing" in samples[-2].error


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "not a readable tar file (empty file)"), (b"hello" * 300, "not a readable tar file")],
    ids=["empty", "not-a-tar"],
)
def test_unreadable_shard_is_one_record(tmp_path, data, reason):
    [record] = read_bytes(tmp_path, data)
    assert record.key is None and reason in record.error


def test_gzip_shards_and_truncated_gzip(tmp_path):
    members = shard_of_good_samples(["a", "b", "c", "d"], size=(200, 150))
    packed = tar_bytes(members, gzip=True)
    assert [s.key for s in read_bytes(tmp_path, packed, "ok.tar.gz")] == ["a", "b", "c", "d"]
    cut = read_bytes(tmp_path, packed[: len(packed) * 2 // 3], "cut.tar.gz")
    assert cut[-1].key is None and "the rest of the shard could not be read" in cut[-1].error
    assert all(s.error is None for s in cut[:-2]) and len(cut) >= 2


def test_missing_shard_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"^Shard .*gone\.tar does not exist; list the shards again or fix file_paths\.$"):
        list(iter_samples(str(tmp_path / "gone.tar")))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    urls = []
    for shard in range(4):
        keys = [f"s{shard}-{index:02d}" for index in range(7)]
        urls.append(str(write_tar(root / f"part-{shard}.tar", shard_of_good_samples(keys, size=(64, 48)))))
    urls.append(str(write_tar(root / "part-4.tar", bad_case_members())))
    return urls


def test_batches_span_shards_in_order_and_match_samples(many_shards):
    expected = [(s.key, s.shard, s.error, s.caption) for url in many_shards for s in iter_samples(url)]
    for threads in (1, 3):
        batches = list(iter_batches(many_shards, task_batch_size=5, threads=threads, prefetch=1))
        assert all(len(batch) == 5 for batch in batches[:-1]) and 1 <= len(batches[-1]) <= 5
        got = [(s.key, s.shard, s.error, s.caption) for batch in batches for s in batch]
        assert got == expected
    raw = [s for batch in iter_batches(many_shards, task_batch_size=10, decode=None) for s in batch]
    assert [s.key for s in raw] == [key for key, *_ in expected] and all(s.image is None for s in raw)


def test_stopping_early_stops_the_reader(many_shards):
    before = threading.active_count()
    batches = iter_batches(many_shards * 5, task_batch_size=3, threads=2, prefetch=1)
    first = next(batches)
    assert len(first) == 3 and first[0].image is not None
    batches.close()  # the caller stops: reader and decoders must not linger
    assert threading.active_count() == before


def test_batch_errors_reach_the_caller(many_shards, tmp_path):
    with pytest.raises(UserError, match=r"missing\.tar does not exist"):
        for _ in iter_batches([many_shards[0], str(tmp_path / "missing.tar")], task_batch_size=2):
            pass
    with pytest.raises(UserError, match=r"^task_batch_size must be a whole number of at least 1, not 0\.$"):
        next(iter_batches(many_shards, task_batch_size=0))


def test_reading_from_s3_through_moto(s3_bucket, bad_case_shard, bad_case_samples):
    fs = fsspec.filesystem("s3")
    with open(bad_case_shard, "rb") as handle:
        fs.pipe(f"{s3_bucket}/shards/part-000000.tar", handle.read())
    fs.pipe(f"{s3_bucket}/shards/part-000001.tar", tar_bytes(shard_of_good_samples(["x", "y"])))
    url = f"s3://{s3_bucket}/shards/part-000000.tar"
    from_s3 = list(iter_samples(url, FULL))
    assert [(s.key, s.error, s.members) for s in from_s3] == [(s.key, s.error, s.members) for s in bad_case_samples]
    assert all(s.shard == url for s in from_s3)
    assert np.array_equal(pixels(from_s3[0].image), pixels(bad_case_samples[0].image))
    urls = [url, f"s3://{s3_bucket}/shards/part-000001.tar"]
    keys = [s.key for batch in iter_batches(urls, task_batch_size=8, threads=2) for s in batch]
    assert keys == [s.key for s in bad_case_samples] + ["x", "y"]
    with pytest.raises(UserError, match=r"^Shard s3://.*/shards/nope\.tar does not exist"):
        list(iter_samples(f"s3://{s3_bucket}/shards/nope.tar"))


def test_unreachable_s3_endpoint_propagates_so_the_task_retries(unreachable_s3):
    # Listing reports an unreachable endpoint in one sentence before any work starts; during a run a connection
    # error may be transient, so the reader lets it through and the task's retry policy handles it.
    with pytest.raises(Exception) as raised:
        list(iter_samples(Location("s3://bucket/a.tar", NO_RETRIES)))
    assert not isinstance(raised.value, UserError)
    assert "EndpointConnectionError" in type(raised.value).__name__ or "Connect" in str(raised.value)


def test_metadata_must_be_a_json_object(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            Member("list.jpg", encode(Image.new("RGB", (8, 8)), "JPEG")),
            Member("list.json", json.dumps([1, 2]).encode()),
        ],
    )
    [sample] = iter_samples(str(shard))
    assert sample.error == "member 'list.json' is JSON but not an object" and sample.image is None


def test_small_jpeg_decodes_exactly_as_pillow_does(tmp_path):
    data = encode(photo("rocket"), "JPEG", quality=90)
    shard = write_tar(tmp_path / "s.tar", [Member("r.jpg", data)])
    [sample] = iter_samples(str(shard))
    expected = Image.open(io.BytesIO(data)).convert("RGB")
    assert np.array_equal(pixels(sample.image), pixels(expected))


def test_member_names_that_are_not_utf8_get_a_printable_key_and_an_error(tmp_path):
    path = tmp_path / "latin1.tar"
    name = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for member_name, data in [(name, encode(Image.new("RGB", (8, 8)), "JPEG")), ("ok.jpg", encode(Image.new("RGB", (8, 8)), "JPEG"))]:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    latin, ok = iter_samples(str(path))
    assert latin.key == "caf\\xe9" and latin.error == "member name 'caf\\\\xe9.jpg' is not valid UTF-8, so the sample is never written"
    latin.error.encode("utf-8")  # storable in Parquet
    assert ok.key == "ok" and ok.error is None


# --- the per-sample resource budget: a hostile sample costs only its own row ---


def keys_and_errors(samples) -> list[tuple[str | None, str | None]]:
    return [(sample.key, sample.error) for sample in samples]


def test_extreme_aspect_ratios_are_decoded_and_transformed(tmp_path):
    # Banners once got "one side over 100 times the other"; the model's transform now bounds the resize itself.
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from tasks.models.bounded_transform import BoundedTransform, model_input, pixel_step

    jpeg = lambda width, height: encode(drawn_image(width, height), "JPEG")  # noqa: E731
    members = [
        *good_sample_members("before"),
        Member("wide.png", wide_png()),  # 1 x 100000: open_clip alone would resize it to 64 x 6,400,000 here
        Member("long.png", wide_png(100_000, 1)),
        Member("ratio100.jpg", jpeg(1000, 10)),
        Member("ratio101.jpg", jpeg(10, 1010)),
        Member("banner.jpg", jpeg(4000, 20)),
        *good_sample_members("after", seed=1),
    ]
    shard = write_tar(tmp_path / "s.tar", members)
    samples = list(iter_samples(str(shard)))
    assert keys_and_errors(samples) == [(key, None) for key in ("before", "wide", "long", "ratio100", "ratio101", "banner", "after")]
    assert [s.image.size for s in samples[1:6]] == [(1, 100_000), (100_000, 1), (1000, 10), (10, 1010), (4000, 20)]
    transform = BoundedTransform(image_transform_v2(PreprocessCfg(size=64), is_train=False))
    [batch] = list(iter_batches([str(shard)], task_batch_size=10, threads=2, transform=transform, worker_processes=False))
    assert keys_and_errors(batch) == keys_and_errors(samples)
    assert all(tuple(s.model_input.shape) == (3, 64, 64) and s.image is None for s in batch)
    for sample, decoded in zip(batch, samples):
        if decoded.image.width * decoded.image.height < 100_000:  # open_clip's own transform fits here: the same pixels
            assert torch.equal(sample.model_input, transform.transform(decoded.image)), sample.key
    # the worker processes send the uint8 crops, the same pixels before ToTensor and Normalize
    [crops] = list(iter_batches([str(shard)], task_batch_size=10, threads=2, transform=pixel_step(transform), worker_processes=True))
    assert keys_and_errors(crops) == keys_and_errors(samples)
    for sample, transformed in zip(crops, batch):
        assert sample.model_input.dtype == torch.uint8 and sample.model_input.is_contiguous(), sample.key
        assert torch.equal(model_input(transform, sample.model_input[None])[0], transformed.model_input), sample.key


def test_errors_of_the_retired_aspect_ratio_limit_are_recognised():
    # Store entries written before banners were scored hold this error; such an entry is stale, not a result.
    from tasks.store.retired_errors import first_retired_error

    limit = 100.0
    old = f"image {'wide.png'!r} is {1}x{100000} pixels, one side over {limit:g} times the other (the limit for resizing it)"
    assert first_retired_error([None, "image 'a.jpg' is truncated", old, old]) == 2
    assert first_retired_error([None, "image 'a.jpg' is truncated", None]) is None
    assert first_retired_error([f"{old}; and more"]) is None  # whole sentences only
    long_name = f"image {'dir/' * 20 + 'banner.png'!r} is 1x100000 pixels, one side over 100 times the other (the limit for resizing it)"
    assert first_retired_error([long_name[:157] + "..."]) == 0  # as the reader shortened it
    assert first_retired_error(["image 'a.png' is 1x2 pixels, over the limit of 1 (possible decompression bomb)"]) is None


def nested(levels: int) -> bytes:
    return b'{"a": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


def test_json_metadata_is_parsed_with_bounded_depth_and_number_size(tmp_path):
    image = encode(drawn_image(40, 30), "JPEG")
    cases = {
        "deep": deeply_nested_json(),  # 100,000 '[': RecursionError in Python's parser
        "number": long_number_json(),  # 5,000 digits: ValueError from Python's int conversion limit
        "depthok": nested(MAX_JSON_DEPTH),
        "toodeep": nested(MAX_JSON_DEPTH + 1),
        "intok": b'{"n": ' + b"9" * MAX_JSON_NUMBER_CHARS + b"}",
        "float": b'{"x": 0.' + b"1" * MAX_JSON_NUMBER_CHARS + b"}",
    }
    members = [*good_sample_members("before")]
    for key, metadata in cases.items():
        members += [Member(f"{key}.jpg", image), Member(f"{key}.json", metadata)]
    members += good_sample_members("after", seed=1)
    samples = {s.key: s for s in iter_samples(str(write_tar(tmp_path / "s.tar", members)))}
    assert samples["deep"].error == f"member 'deep.json' nests JSON deeper than {MAX_JSON_DEPTH} levels"
    assert samples["number"].error == f"member 'number.json' holds a number of 5000 characters, over the limit of {MAX_JSON_NUMBER_CHARS}"
    assert samples["toodeep"].error == f"member 'toodeep.json' nests JSON deeper than {MAX_JSON_DEPTH} levels"
    assert samples["float"].error == f"member 'float.json' holds a number of {MAX_JSON_NUMBER_CHARS + 2} characters, over the limit of {MAX_JSON_NUMBER_CHARS}"
    assert samples["depthok"].error is None and samples["depthok"].image is not None
    assert samples["intok"].error is None and samples["intok"].metadata == {"n": int("9" * MAX_JSON_NUMBER_CHARS)}
    for key in ("before", "after"):
        assert samples[key].error is None and samples[key].metadata["key"] == key and samples[key].image is not None
    for key in ("deep", "number", "toodeep", "float"):
        assert samples[key].image is None and samples[key].members["json"] == cases[key]  # kept byte for byte


def test_a_sample_over_its_byte_budget_is_an_error_and_its_neighbours_are_read(tmp_path):
    limits = ReadLimits(sample_bytes=1 << 20)
    shard = write_tar_with_holes(
        tmp_path / "s.tar",
        [
            *good_sample_members("before"),
            Member("big.jpg", encode(drawn_image(40, 30), "JPEG")),
            ZeroMember("big.first", 600_000),
            ZeroMember("big.second", 600_000),  # passes the budget: it and the rest are skipped unread
            ZeroMember("big.third", 10),
            *good_sample_members("after", seed=1),
        ],
    )
    for decode in (DecodeOptions(), None):  # the raw pass (filter stage) judges it the same way
        samples = list(iter_samples(str(shard), decode, limits=limits))
        assert keys_and_errors(samples) == [
            ("before", None),
            ("big", f"the sample's members pass the {1 << 20}-byte read limit at member 'big.second'"),
            ("after", None),
        ]
        assert list(samples[1].members) == ["jpg", "first"] and samples[1].image is None
        assert samples[2].members["txt"] == b"caption after"
    with pytest.raises(UserError, match=r"^sample_bytes must be a whole number of bytes of at least 512, not 0\.$"):
        ReadLimits(sample_bytes=0)


def test_zero_members_of_a_gzip_tar_are_skipped_without_holding_them(tmp_path):
    # Twelve members of 4 MiB zeros compress to a few KB each; over the budget they are streamed past in pieces.
    members = [*good_sample_members("before"), Member("bomb.jpg", encode(drawn_image(40, 30), "JPEG"))]
    members += [Member(f"bomb.m{index:02d}", bytes(4 << 20)) for index in range(12)]
    members += good_sample_members("after", seed=1)
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(tar_bytes(members, gzip=True))
    assert path.stat().st_size < 1 << 20
    samples = list(iter_samples(str(path), limits=ReadLimits(sample_bytes=10 << 20)))
    assert keys_and_errors(samples) == [
        ("before", None),
        ("bomb", f"the sample's members pass the {10 << 20}-byte read limit at member 'bomb.m02'"),
        ("after", None),
    ]
    assert samples[2].image is not None


def test_batches_close_early_when_their_bytes_reach_the_budget(tmp_path):
    keys = [f"k{index:02d}" for index in range(12)]
    shard = str(write_tar(tmp_path / "s.tar", shard_of_good_samples(keys, size=(320, 240))))
    decoded_bytes = 320 * 240 * 3  # each sample's RGB image; raw members add ~10 KB
    limits = ReadLimits(batch_bytes=4 * decoded_bytes + 100_000)
    batches = list(iter_batches([shard], task_batch_size=10, threads=2, prefetch=1, limits=limits))
    assert [len(batch) for batch in batches] == [4, 4, 4]
    assert [s.key for batch in batches for s in batch] == keys and all(s.image is not None for batch in batches for s in batch)
    raw = list(iter_batches([shard], task_batch_size=10, decode=None, limits=ReadLimits(batch_bytes=3 * 12_000)))
    assert all(1 <= len(batch) <= 3 for batch in raw) and [s.key for batch in raw for s in batch] == keys
    huge = list(iter_batches([shard], task_batch_size=10, threads=2, limits=ReadLimits(batch_bytes=512)))
    assert [len(batch) for batch in huge] == [1] * 12  # a sample alone may exceed the budget: it is never refused for it


def solid_jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    return encode(Image.new("RGB", size, colour), "JPEG", quality=95)


RED, GREEN, BLUE = (230, 20, 20), (20, 230, 20), (20, 20, 230)
NAMING_MEMBERS = [
    # key `dir/with`, extension `dots.in.name.jpg`: an image by its last extension component
    Member("dir/with.dots.in.name.jpg", solid_jpeg(RED)),
    Member("dir/with.dots.in.name.txt", b"a caption"),
    # no member named exactly by an image format: the first image member in tar order
    Member("views.left.png", encode(Image.new("RGB", (20, 10), BLUE), "PNG")),
    Member("views.right.jpg", solid_jpeg(RED)),
    # a member named exactly `jpg` wins over `seg.png`, wherever it is in the tar
    Member("masked.seg.png", encode(Image.new("RGB", (20, 10), GREEN), "PNG")),
    Member("masked.jpg", solid_jpeg(RED)),
    # upper-case extensions, exact and dotted
    Member("SHOUT.JPEG", solid_jpeg(GREEN)),
    Member("SHOUT.TXT", b"LOUD"),
    Member("SHOUT.META.JSON", b'{"a": 1}'),
    Member("camera.raw.Export.PNG", encode(Image.new("RGB", (20, 10), BLUE), "PNG")),
    # a dotted name whose format is one we recognise but do not decode
    Member("phone.v2.HEIC", b"\x00\x00\x00\x18ftypheic"),
]


def test_image_member_follows_webdataset_naming(tmp_path):
    shard = str(write_tar(tmp_path / "naming.tar", NAMING_MEMBERS))
    samples = by_key(list(iter_samples(shard, FULL)))
    assert list(samples) == ["dir/with", "views", "masked", "SHOUT", "camera", "phone"]
    colours = {key: tuple(int(v) for v in pixels(sample.image).reshape(-1, 3).mean(axis=0)) for key, sample in samples.items() if sample.image}
    close = lambda found, expected: max(abs(a - b) for a, b in zip(found, expected)) < 12  # noqa: E731
    dotted = samples["dir/with"]
    assert dotted.error is None and close(colours["dir/with"], RED) and dotted.caption == "a caption"
    assert image_extension(samples["views"].members) == "left.png" and close(colours["views"], BLUE)
    assert image_extension(samples["masked"].members) == "jpg" and close(colours["masked"], RED)
    shout = samples["SHOUT"]
    assert shout.error is None and close(colours["SHOUT"], GREEN) and shout.caption == "LOUD" and shout.metadata == {"a": 1}
    assert samples["camera"].error is None and close(colours["camera"], BLUE)
    assert samples["phone"].image is None and samples["phone"].error == "image member 'phone.v2.HEIC' has an unsupported format (.heic)"
    # Members keep their extensions as read, so the writer re-creates every name byte for byte.
    assert [sample.member_name(ext) for sample in samples.values() for ext in sample.members] == [m.name for m in NAMING_MEMBERS]


def test_webdataset_reads_the_same_samples_and_image_members(tmp_path):
    import webdataset

    shard = str(write_tar(tmp_path / "naming.tar", NAMING_MEMBERS[:-1]))  # webdataset cannot decode the HEIC stand-in
    ours = {sample.key: sample for sample in iter_samples(shard, FULL)}
    theirs = {sample["__key__"]: sample for sample in webdataset.WebDataset(shard, shardshuffle=False).decode("pil")}
    assert list(theirs) == list(ours)
    for key, sample in ours.items():
        # webdataset lower-cases extensions when grouping; we keep their case for the writer and compare without it.
        assert set(theirs[key]) - {"__key__", "__url__", "__local_path__"} == {ext.lower() for ext in sample.members}
        decoded_by_webdataset = {ext for ext, value in theirs[key].items() if isinstance(value, Image.Image)}
        assert image_extension(sample.members).lower() in decoded_by_webdataset
