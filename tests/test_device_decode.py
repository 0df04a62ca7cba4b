"""decode_mode="gpu" run on the CPU: the device half's code (TorchCodec decoding, torch's resize, PDQ on tensors) against
open_clip's own preprocess, the exact CPU path's rows, and the reference PDQ; fallbacks and batch splitting."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageOps
from tests.support.tars import (
    PHOTO_NAMES,
    Member,
    bad_case_members,
    drawn_image,
    encode,
    jpeg_with_orientation,
    large_photo,
    photo,
    png_bomb,
    write_tar,
)
from tests.support.tiny_clip import make_tiny_clip
from tests.test_hash_lists import REFERENCE_PDQ

from tasks.errors import UserError
from tasks.hashes.device_pdq import pdq_of_pixels
from tasks.hashes.image_hashes import pdq_hex
from tasks.io.decode import DecodeOptions, decode_and_transform, decode_mode_of, open_sample_image
from tasks.io.decode_dispatch import BatchDecoder
from tasks.io.samples import Sample
from tasks.io.device_jpeg import (
    FALLBACK_DEVICE_REFUSED,
    FALLBACK_ELONGATED,
    FALLBACK_INKS,
    FALLBACK_NOT_JPEG,
    FALLBACK_UNENDED,
    DeviceJpeg,
    without_app1,
)
from tasks.models.bounded_transform import BoundedTransform, pixel_step
from tasks.models.clip_resolve import clip_identity, resolve_clip
from tasks.models.device_decode import decode_jpegs, device_inputs
from tasks.models.device_feed import DeviceFeedCounts, feed_device_batches, host_batches
from tasks.models.device_transform import DeviceTransform, orient
from tasks.models.embed import embed_shard, load_clip_embedder
from tasks.store.entries import METADATA_KEY, EmbeddingStore, embedding_matrix

CPU = torch.device("cpu")
GPU_MODE = DecodeOptions.for_model((224, 224), "gpu")
EXACT = DecodeOptions.for_model((224, 224), "exact")
VIT_L_14 = {"size": [224, 224], "interpolation": "bicubic", "resize_mode": "shortest"}


def _open_clip_input(data: bytes, transform: BoundedTransform) -> torch.Tensor:
    """open_clip's own preprocess (the unbounded transform) of the exact CPU decode (Pillow, EXIF orientation, RGB)."""
    return transform.transform(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def _in_levels(crop: np.ndarray, data: bytes, transform: BoundedTransform) -> np.ndarray:
    """|model input of the gpu mode's crop - open_clip's preprocess|, in 8-bit levels (x 255 x std per channel)."""
    got = transform.normalise(torch.from_numpy(crop)[None])[0]
    std = torch.tensor(transform.normalise.std).view(3, 1, 1)
    return ((got - _open_clip_input(data, transform)).abs() * std * 255).numpy()


def _gpu_mode_crops(shard: str, transform: BoundedTransform, batch_size: int = 4, counts: DeviceFeedCounts | None = None) -> dict:
    """key -> (uint8 crop or None, error) of every row the gpu feed makes, in order."""
    rows = {}
    for batch in feed_device_batches([shard], pixel_step(transform), DeviceTransform.of(VIT_L_14), batch_size, GPU_MODE, CPU, counts,
                                     task_batch_size=5, threads=2):
        crops = iter(batch.pixels) if batch.pixels is not None else iter(())
        for key, error in batch.rows:
            assert key not in rows, key
            rows[key] = (next(crops).numpy() if error is None else None, error)
    return rows


@pytest.fixture(scope="module")
def vit_l_14_transform():
    return BoundedTransform(image_transform_v2(PreprocessCfg(size=(224, 224)), is_train=False))


@pytest.fixture(scope="module")
def kinds_of_jpeg() -> list[tuple[str, bytes]]:
    """Test photos, a drawn image, grayscale, CMYK, progressive, 4:4:4 and EXIF-rotated JPEGs (one sample each)."""
    members = [(name, encode(photo(name), "JPEG", quality=90)) for name in PHOTO_NAMES]
    members += [
        ("drawn", encode(drawn_image(320, 240, seed=1), "JPEG", quality=90)),
        ("grey", encode(photo("coffee").convert("L"), "JPEG", quality=90)),
        ("cmyk", encode(photo("chelsea").convert("CMYK"), "JPEG", quality=90)),
        ("progressive", encode(photo("rocket"), "JPEG", quality=85, progressive=True)),
        ("full-chroma", encode(photo("astronaut"), "JPEG", quality=90, subsampling=0)),
        ("large", encode(large_photo(1280, 960, seed=2), "JPEG", quality=90)),
        ("small", encode(drawn_image(90, 60, seed=3), "JPEG", quality=90)),
    ]
    members += [(f"turned{orientation}", jpeg_with_orientation(photo("coffee"), orientation)) for orientation in range(2, 9)]
    return members


def test_model_input_matches_open_clip_preprocess(tmp_path, vit_l_14_transform, kinds_of_jpeg):
    shard = str(write_tar(tmp_path / "kinds.tar", [Member(f"{key}.jpg", data) for key, data in kinds_of_jpeg]))
    counts = DeviceFeedCounts()
    rows = _gpu_mode_crops(shard, vit_l_14_transform, counts=counts)
    assert list(rows) == [key for key, _ in kinds_of_jpeg]
    differences = []
    for key, data in kinds_of_jpeg:
        crop, error = rows[key]
        assert error is None, (key, error)
        difference = _in_levels(crop, data, vit_l_14_transform)
        assert difference.mean() <= 0.5 and (difference > 2 + 1e-3).mean() <= 0.01, (key, difference.mean(), (difference > 2).mean())
        differences.append(difference)
    assert _in_levels(rows["cmyk"][0], dict(kinds_of_jpeg)["cmyk"], vit_l_14_transform).max() < 1e-3  # the exact path's own input
    assert counts.fallbacks == {FALLBACK_INKS: 1} and counts.on_device == len(kinds_of_jpeg) - 1
    everything = np.concatenate([difference.ravel() for difference in differences])
    assert everything.mean() <= 0.5 and (everything > 2 + 1e-3).mean() <= 0.01


def test_orientation_is_pillows(kinds_of_jpeg):
    stored = photo("coffee").convert("RGB")
    pixels = torch.from_numpy(np.asarray(stored).copy()).permute(2, 0, 1)
    for orientation in range(1, 9):
        tagged = stored.copy()
        tagged.getexif()[0x0112] = orientation  # exif_transpose reads the image's EXIF
        upright = np.asarray(ImageOps.exif_transpose(tagged))
        assert np.array_equal(orient(pixels, orientation).permute(1, 2, 0).numpy(), upright), orientation
    # TorchCodec turns a JPEG upright itself, as exif_transpose does (600 x 400 stored, turned a quarter)
    assert tuple(decode_jpegs([dict(kinds_of_jpeg)["turned6"]], CPU)[0].shape) == (3, 600, 400)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    config_path, checkpoint_path = make_tiny_clip(tmp_path_factory.mktemp("tiny-gpu-mode"), embed_dim=768)
    return resolve_clip(str(config_path), str(checkpoint_path))


def _entry(weights, shard: str, decode: DecodeOptions, store: EmbeddingStore, batch_size: int = 4) -> tuple[dict, np.ndarray, dict]:
    """The store entry embed_shard writes: its columns, its embeddings and its metadata record."""
    embedder = load_clip_embedder(weights, "cpu", batch_size=batch_size)
    embed_shard(shard, embedder, store, decode, task_batch_size=7, threads=2)
    table = store.read_table(clip_identity(weights, decode.identity()), shard)
    columns = {name: table.column(name).to_pylist() for name in ("key", "error", "md5", "sha1")}
    return columns, embedding_matrix(table), json.loads(table.schema.metadata[METADATA_KEY])


def test_every_sample_keeps_its_row_and_the_exact_paths_verdict(tmp_path, tiny_weights):
    """Bad members among good JPEGs: PNG, WebP, GIF, CMYK, truncated, zero-byte, bomb headers and the rest of the bad cases."""
    members = bad_case_members()
    members[3:3] = [Member("bomb2.jpg", _jpeg_bomb_header()), Member("banner.jpg", encode(Image.new("RGB", (4, 2400), (90, 30, 200)), "JPEG"))]
    shard = str(write_tar(tmp_path / "bad.tar", members))
    store = EmbeddingStore(tmp_path / "cache")
    exact, exact_embeddings, _ = _entry(tiny_weights, shard, DecodeOptions.for_model(tiny_weights.image_size, "exact"), store)
    gpu, gpu_embeddings, metadata = _entry(tiny_weights, shard, DecodeOptions.for_model(tiny_weights.image_size, "gpu"), store)

    assert gpu["key"] == exact["key"] and gpu["error"] == exact["error"]
    assert gpu["md5"] == exact["md5"] and gpu["sha1"] == exact["sha1"]
    good = np.array([error is None for error in exact["error"]])
    cosines = (exact_embeddings[good] * gpu_embeddings[good]).sum(axis=1)
    assert cosines.min() >= 0.9999, dict(zip(np.array(exact["key"], dtype=object)[good], cosines))
    row = {key: index for index, key in enumerate(gpu["key"])}
    for key in ("png", "webp", "gif", "cmyk", "banner"):  # decoded by the exact CPU path: the very same embedding
        assert np.array_equal(gpu_embeddings[row[key]], exact_embeddings[row[key]]), key
    assert "is truncated" in gpu["error"][row["truncated"]] and "decompression" in gpu["error"][row["bomb2"]]
    counts = metadata["device_decode"]
    fallbacks = counts["fallbacks"]
    # the truncated JPEG never reaches the device: its marker walk ends before EOI
    assert fallbacks[FALLBACK_INKS] == 1 and fallbacks[FALLBACK_UNENDED] == 1 and fallbacks[FALLBACK_ELONGATED] == 1
    assert FALLBACK_DEVICE_REFUSED not in fallbacks
    assert fallbacks[FALLBACK_NOT_JPEG] == 9  # png, webp, bmp, tiff, gif, grey, alpha, deep and the PNG named .jpg
    # every image decoded once: on the device, or on the CPU path (the truncated JPEG among those, as an error row)
    assert counts["on_device"] + sum(fallbacks.values()) == int(good.sum()) + 1


def _jpeg_bomb_header(width: int = 60_000, height: int = 60_000) -> bytes:
    """A small JPEG whose frame header claims `width` x `height` pixels."""
    data = bytearray(encode(drawn_image(16, 16, seed=20), "JPEG"))
    at = data.index(b"\xff\xc0") + 5
    data[at : at + 4] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_failed_batch_call_is_split_until_each_bad_image_is_alone():
    good = [encode(photo(name), "JPEG", quality=90) for name in PHOTO_NAMES[:4]]
    truncated = good[0][: len(good[0]) // 3]
    datas = [good[0], truncated, good[1], b"\xff\xd8\xff\xe0 not really", good[2], encode(drawn_image(), "PNG"), good[3], truncated]
    decoded = decode_jpegs(datas, CPU)
    assert [image is None for image in decoded] == [False, True, False, True, False, True, False, True]
    for data, image in zip(datas, decoded):
        if image is not None:
            assert torch.equal(image, decode_jpegs([data], CPU)[0])
            assert np.array_equal(image.permute(1, 2, 0).numpy(), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_device_memory_is_bounded_per_decoder_call():
    transform = DeviceTransform.of(VIT_L_14)
    datas = [encode(photo(name), "JPEG", quality=90) for name in PHOTO_NAMES[:5]]
    jpegs = [DeviceJpeg(data, *Image.open(io.BytesIO(data)).size[::-1], 1) for data in datas]
    one_call = device_inputs(jpegs, transform, CPU)
    one_image_a_call = device_inputs(jpegs, transform, CPU, limit=1)
    two_a_call = device_inputs(jpegs, transform, CPU, limit=jpegs[0].decoded_bytes + jpegs[1].decoded_bytes)
    for first, second, third in zip(one_call, one_image_a_call, two_a_call):
        assert torch.equal(first.pixels, second.pixels) and torch.equal(first.pixels, third.pixels) and first.pdq == second.pdq
    assert all(result.pixels.dtype == torch.uint8 and tuple(result.pixels.shape) == (3, 224, 224) for result in one_call)


def test_pdq_from_device_pixels_is_the_reference():
    distances = []
    for name, (reference_hex, reference_quality) in REFERENCE_PDQ.items():
        data = encode(photo(name), "PNG")  # the reference hashes were made from the photos' own pixels
        pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
        bits, quality = pdq_of_pixels(pixels)
        distances.append(bin(int(pdq_hex(bits), 16) ^ int(reference_hex, 16)).count("1"))
        assert quality == reference_quality, name
    assert max(distances) <= 2, distances


def test_gpu_mode_has_its_own_identity_and_refuses_what_it_cannot_reproduce():
    identities = {mode: DecodeOptions.for_model((224, 224), mode).identity() for mode in ("exact", "reduced", "gpu")}
    assert len(set(identities.values())) == 3
    assert {mode: decode_mode_of(identity) for mode, identity in identities.items()} == {mode: mode for mode in identities}
    assert DecodeOptions.for_model((224, 224), "gpu").mode == "gpu"
    for cfg in ({**VIT_L_14, "resize_mode": "longest"}, {**VIT_L_14, "interpolation": "lanczos"}, {**VIT_L_14, "size": [224, 160]}):
        with pytest.raises(UserError, match="decode_mode 'exact'"):
            DeviceTransform.of(cfg)


def test_bombs_and_odd_sides_never_reach_the_device(tmp_path, vit_l_14_transform):
    members = [Member("good.jpg", encode(photo("coffee"), "JPEG")), Member("bomb.jpg", _jpeg_bomb_header()),
               Member("bombpng.png", png_bomb()), Member("line.jpg", encode(Image.new("RGB", (1, 3000), (9, 9, 9)), "JPEG"))]
    counts = DeviceFeedCounts()
    rows = _gpu_mode_crops(str(write_tar(tmp_path / "hostile.tar", members)), vit_l_14_transform, counts=counts)
    assert rows["good"][1] is None and "decompression" in rows["bomb"][1] and "decompression" in rows["bombpng"][1]
    assert rows["line"][1] is None and rows["line"][0].shape == (3, 224, 224)  # scored the careful way, on the CPU
    assert counts.on_device == 1 and counts.fallbacks == {FALLBACK_ELONGATED: 1}


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _exif_orientation(orientation: int, big_endian: bool = False, as_long: bool = False) -> bytes:
    """An APP1 EXIF segment holding only an Orientation tag (SHORT, or LONG as some writers store it)."""
    order = "big" if big_endian else "little"
    value = orientation.to_bytes(4, order) if as_long else orientation.to_bytes(2, order) + b"\0\0"
    tiff = (b"MM" if big_endian else b"II") + (42).to_bytes(2, order) + (8).to_bytes(4, order) + (1).to_bytes(2, order)
    tiff += (0x0112).to_bytes(2, order) + (4 if as_long else 3).to_bytes(2, order) + (1).to_bytes(4, order) + value + bytes(4)
    return _segment(0xE1, b"Exif\0\0" + tiff)


def _xmp_orientation(orientation: int) -> bytes:
    packet = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/></rdf:RDF></x:xmpmeta>')
    return _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0" + packet.encode())


def test_orientation_is_the_one_pillow_reads_whatever_the_device_decoder_would(tmp_path, vit_l_14_transform):
    """XMP orientation, XMP before EXIF, a big-endian LONG tag: the device decodes the stored pixels (APP1 removed) and
    turns them as Pillow says, so crops and PDQ are the exact mode's."""
    plain = encode(photo("coffee"), "JPEG", quality=90)
    cases = {
        "xmp3": _xmp_orientation(3),
        "xmp-then-exif6": _xmp_orientation(1) + _exif_orientation(6),
        "long3": _exif_orientation(3, big_endian=True, as_long=True),
        "long6": _exif_orientation(6, big_endian=True, as_long=True),
    }
    members = [Member(f"{key}.jpg", plain[:2] + segments + plain[2:]) for key, segments in cases.items()]
    rows = _gpu_mode_crops(str(write_tar(tmp_path / "exif.tar", members)), vit_l_14_transform)
    for member in members:
        key = member.name[:-4]
        difference = _in_levels(rows[key][0], member.data, vit_l_14_transform)
        assert difference.mean() <= 0.5, (key, difference.mean())
        exact = Sample(key=key, shard="exif.tar", members={"jpg": member.data})
        decode_and_transform(exact, open_sample_image(exact, EXACT), None)
        stored = without_app1(member.data)
        assert stored is not None and b"Exif" not in stored and b"xmpmeta" not in stored
        assert pdq_of_pixels(decode_jpegs([stored], CPU)[0]) == (exact.image_hashes.pdq, exact.image_hashes.pdq_quality), key  # PDQ of the stored pixels


def test_host_batches_close_at_the_readers_byte_budget(tmp_path, vit_l_14_transform):
    """Error rows hold their members too: a host batch never holds much over `batch_bytes` of raw members."""
    noise = np.random.default_rng(5).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    members = [Member(f"{index:03d}.jpg", b"\xff\xd8\xff\xe0" + noise) for index in range(12)]  # corrupt: error rows
    members.append(Member("good.jpg", encode(photo("coffee"), "JPEG")))
    shard = str(write_tar(tmp_path / "heavy.tar", members))
    decoder = BatchDecoder(EXACT, pixel_step(vit_l_14_transform), 1, False)
    try:
        batches = list(host_batches([shard], DeviceTransform.of(VIT_L_14).fits, 64, EXACT, decoder, DeviceFeedCounts(), batch_bytes=1_000_000))
    finally:
        decoder.close()
    assert [len(rows) for rows in batches] == [4, 4, 4, 1]
    assert [row.sample.key for rows in batches for row in rows] == [member.name[:-4] for member in members]


def test_an_image_the_device_cannot_fit_goes_to_the_cpu_alone(tmp_path, vit_l_14_transform, monkeypatch):
    """Device memory runs out while one image is resized (its float copy): that image is decoded by the CPU path."""
    members = [Member(f"{index}.jpg", encode(photo(name), "JPEG", quality=90)) for index, name in enumerate(PHOTO_NAMES[:5])]
    resize = DeviceTransform.pixels

    def out_of_memory_on_the_third(self, image):
        if image.shape[1:] == (300, 451):  # chelsea, the third photo
            raise torch.OutOfMemoryError("CUDA out of memory (one image's float copy)")
        return resize(self, image)

    monkeypatch.setattr(DeviceTransform, "pixels", out_of_memory_on_the_third)
    counts = DeviceFeedCounts()
    rows = _gpu_mode_crops(str(write_tar(tmp_path / "oom.tar", members)), vit_l_14_transform, counts=counts)
    assert list(rows) == ["0", "1", "2", "3", "4"] and all(error is None for _, error in rows.values())
    assert counts.on_device == 4 and counts.fallbacks == {FALLBACK_DEVICE_REFUSED: 1}
    assert _in_levels(rows["2"][0], members[2].data, vit_l_14_transform).max() < 1e-3  # the exact path's own input
