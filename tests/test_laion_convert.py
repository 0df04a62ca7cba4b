"""LAION's Keras zip -> safetensors head, against the TensorFlow-made export and the Keras scores."""

from __future__ import annotations

import struct
import sys
import zipfile

import numpy as np
import pytest
from safetensors import safe_open
from tests.support.laion_zips import DATA_MEMBER, INDEX_MEMBER, edit_member, flip_byte, rewrite_zip

from tasks.errors import UserError
from tasks.models.laion_convert import convert_laion_zip, crc32c
from tasks.models.nsfw import load_nsfw_head

ZIPS = {"vit_l_14": "clip_autokeras_binary_nsfw.zip", "vit_b_32": "clip_autokeras_nsfw_b32.zip"}
REGIMES = ["unit_float32", "unit_fp16_rounded", "scaled_fp16_rounded"]
TOLERANCE = 1e-5


def read_safetensors(path):
    with safe_open(str(path), "np") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


@pytest.fixture(scope="module")
def converted(laion_dir, tmp_path_factory):
    """Each LAION zip converted once for the module: name -> safetensors path."""
    out_dir = tmp_path_factory.mktemp("converted")
    return {
        name: convert_laion_zip(laion_dir / zip_file, out_dir / f"{name}.safetensors") for name, zip_file in ZIPS.items()
    }


@pytest.fixture()
def small_zip(laion_dir):
    """The smaller real zip, for the corruption tests."""
    return laion_dir / ZIPS["vit_b_32"]


def test_crc32c_known_value():
    # The check value of CRC-32C (iSCSI polynomial) for "123456789".
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("name", ZIPS)
def test_converted_file_equals_reference_export(laion_dir, converted, name):
    ours, our_metadata = read_safetensors(converted[name])
    reference, reference_metadata = read_safetensors(laion_dir / f"{name}.safetensors")
    assert sorted(ours) == sorted(reference)
    assert our_metadata == reference_metadata
    for key, expected in reference.items():
        assert ours[key].dtype == expected.dtype, key
        assert ours[key].shape == expected.shape, key
        # Bit-exact, floats included: the same float32 bytes TensorFlow restored.
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)


@pytest.mark.parametrize("name", ZIPS)
def test_converted_head_matches_keras_scores(reference_dir, converted, name):
    head = load_nsfw_head(converted[name])
    reference = np.load(reference_dir / f"laion_nsfw_{name}_keras.npz")
    for regime in REGIMES:
        result = head.score(reference[f"{regime}.inputs"], batch_size=1000)
        assert not result.unscored
        expected = reference[f"{regime}.keras_scores"]
        np.testing.assert_allclose(result.nsfw_score, expected, atol=TOLERANCE, rtol=0, err_msg=regime)


def test_conversion_needs_no_tensorflow(small_zip, tmp_path, monkeypatch):
    for module in ("tensorflow", "keras", "tf_keras"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of these now raises ImportError
    out = convert_laion_zip(small_zip, tmp_path / "head.safetensors")
    assert load_nsfw_head(out).embedding_dim == 512


def test_creates_parent_directory_and_replaces_atomically(small_zip, tmp_path):
    out = tmp_path / "models" / "nsfw" / "ViT-B-32.safetensors"
    assert convert_laion_zip(str(small_zip), str(out)) == out
    first = out.read_bytes()
    out.write_bytes(b"an older file")
    convert_laion_zip(small_zip, out)
    assert out.read_bytes() == first
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind


def test_same_zip_gives_same_bytes(small_zip, converted, tmp_path):
    """Deterministic output: a content hash of the converted head is the same on every machine."""
    out = convert_laion_zip(small_zip, tmp_path / "again.safetensors")
    assert out.read_bytes() == converted["vit_b_32"].read_bytes()


def test_failed_conversion_keeps_existing_output(small_zip, tmp_path):
    out = tmp_path / "head.safetensors"
    out.write_bytes(b"the previous head")
    damaged = rewrite_zip(small_zip, tmp_path / "damaged.zip", edit_member(DATA_MEMBER, flip_byte(5000)))
    with pytest.raises(UserError):
        convert_laion_zip(damaged, out)
    assert out.read_bytes() == b"the previous head"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.zip", "head.safetensors"]


def test_missing_zip(tmp_path):
    with pytest.raises(UserError, match=r"LAION NSFW model zip not found at .*nope\.zip; download it from https://"):
        convert_laion_zip(tmp_path / "nope.zip", tmp_path / "out.safetensors")


def test_file_that_is_not_a_zip(tmp_path):
    not_zip = tmp_path / "model.zip"
    not_zip.write_text("<html>404 Not Found</html>")
    with pytest.raises(UserError, match=r"model\.zip is not a readable zip archive .*download LAION's zip again"):
        convert_laion_zip(not_zip, tmp_path / "out.safetensors")


def test_zip_without_saved_model(tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("photos/cat.jpg", b"\xff\xd8\xff")
    with pytest.raises(UserError, match=r"photos\.zip holds no Keras SavedModel .*pass LAION's clip_autokeras zip"):
        convert_laion_zip(archive, tmp_path / "out.safetensors")


def test_zip_missing_the_variables_data(small_zip, tmp_path):
    def drop_data(name: str, data: bytes) -> bytes | None:
        return None if name.endswith(DATA_MEMBER) else data

    damaged = rewrite_zip(small_zip, tmp_path / "no_data.zip", drop_data)
    with pytest.raises(UserError, match=r"holds no Keras SavedModel"):
        convert_laion_zip(damaged, tmp_path / "out.safetensors")


def test_corrupt_variables_data_fails_checksum(small_zip, tmp_path):
    # Byte 5000 lies inside the first dense kernel (offsets 4104..69640 in this checkpoint).
    damaged = rewrite_zip(small_zip, tmp_path / "flipped.zip", edit_member(DATA_MEMBER, flip_byte(5000)))
    expected = r"flipped\.zip is damaged: layer_with_weights-2/kernel/.* fails its checksum .*download it again"
    with pytest.raises(UserError, match=expected):
        convert_laion_zip(damaged, tmp_path / "out.safetensors")


def test_truncated_variables_data(small_zip, tmp_path):
    half = edit_member(DATA_MEMBER, lambda data: data[: len(data) // 2])
    damaged = rewrite_zip(small_zip, tmp_path / "truncated.zip", half)
    with pytest.raises(UserError, match=r"truncated\.zip is damaged: the variables data file is truncated before"):
        convert_laion_zip(damaged, tmp_path / "out.safetensors")


def test_corrupt_variables_index_fails_checksum(small_zip, tmp_path):
    damaged = rewrite_zip(small_zip, tmp_path / "index.zip", edit_member(INDEX_MEMBER, flip_byte(100)))
    with pytest.raises(UserError, match=r"index\.zip is damaged: variables\.index fails its block checksum"):
        convert_laion_zip(damaged, tmp_path / "out.safetensors")


def test_truncated_variables_index(small_zip, tmp_path):
    damaged = rewrite_zip(small_zip, tmp_path / "short_index.zip", edit_member(INDEX_MEMBER, lambda data: data[:-10]))
    with pytest.raises(UserError, match=r"short_index\.zip is damaged: variables\.index is not a TensorFlow"):
        convert_laion_zip(damaged, tmp_path / "out.safetensors")


def test_zip_member_damaged_in_transit(small_zip, tmp_path):
    """A byte flipped inside the compressed zip stream is caught by the zip's own CRC."""
    damaged = tmp_path / "transit.zip"
    data = bytearray(small_zip.read_bytes())
    with zipfile.ZipFile(small_zip) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(DATA_MEMBER))
    # The payload follows a 30-byte local header, the name and the local extra field.
    name_size, extra_size = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_size + extra_size + info.compress_size // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"transit\.zip is (not a readable zip archive|damaged)"):
        convert_laion_zip(damaged, tmp_path / "out.safetensors")


def test_other_keras_model_is_rejected(small_zip, tmp_path):
    """A SavedModel whose head is not dense/relu/sigmoid gets a clear 'not supported' error."""

    def swap_sigmoid(data: bytes) -> bytes:
        return data.replace(b'"activation": "sigmoid"', b'"activation": "softmax"')

    other = rewrite_zip(small_zip, tmp_path / "other.zip", edit_member("keras_metadata.pb", swap_sigmoid))
    with pytest.raises(UserError, match=r"other\.zip is not a model this converter supports: the layers after"):
        convert_laion_zip(other, tmp_path / "out.safetensors")


def test_output_path_that_is_a_directory(small_zip, tmp_path):
    with pytest.raises(UserError, match=r"is a directory; pass the safetensors file to write"):
        convert_laion_zip(small_zip, tmp_path)
