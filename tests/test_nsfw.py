"""The LAION NSFW head against the original Keras model's scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tasks.errors import UserError
from tasks.models.nsfw import NON_FINITE_REASON, OUT_OF_RANGE_REASON, load_nsfw_head

HEADS = {"vit_l_14": 768, "vit_b_32": 512}
REGIMES = ["unit_float32", "unit_fp16_rounded", "scaled_fp16_rounded"]
TOLERANCE = 1e-5


def keras_reference(reference_dir, name):
    return np.load(reference_dir / f"laion_nsfw_{name}_keras.npz")


@pytest.mark.parametrize("name", HEADS)
def test_head_reads_shapes_from_file(laion_dir, name):
    head = load_nsfw_head(laion_dir / f"{name}.safetensors")
    assert head.embedding_dim == HEADS[name]
    assert head.layer_sizes == ([768, 64, 512, 256, 1] if name == "vit_l_14" else [512, 32, 32, 1])
    expected_columns = [180, 316, 413, 440, 644] if name == "vit_l_14" else [92, 133, 312]
    assert head.categorical_columns.tolist() == expected_columns


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("name", HEADS)
def test_scores_match_keras(laion_dir, reference_dir, name, regime):
    head = load_nsfw_head(laion_dir / f"{name}.safetensors")
    ref = keras_reference(reference_dir, name)
    result = head.score(ref[f"{regime}.inputs"], batch_size=257)
    assert result.nsfw_score.dtype == np.float32
    assert not result.unscored
    np.testing.assert_allclose(result.nsfw_score, ref[f"{regime}.keras_scores"], atol=TOLERANCE, rtol=0)


def test_categorical_lookup_matters(laion_dir, reference_dir):
    """fp16-rounded inputs hit the vocabularies; a plain MLP (no lookup) is measurably wrong on them."""
    head = load_nsfw_head(laion_dir / "vit_l_14.safetensors")
    ref = keras_reference(reference_dir, "vit_l_14")
    x = torch.from_numpy(ref["unit_fp16_rounded.inputs"])
    with torch.inference_mode():
        plain = head.layers[0](x)
        for layer in head.layers[1:]:
            plain = layer(torch.relu(plain))
        plain = torch.sigmoid(plain[:, 0]).numpy()
    keras = ref["unit_fp16_rounded.keras_scores"]
    assert np.abs(plain - keras).max() > 1e-3
    assert np.abs(head.score(x).nsfw_score - keras).max() < TOLERANCE


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_accepts_numpy_and_torch_dtypes(laion_dir, reference_dir, dtype):
    head = load_nsfw_head(laion_dir / "vit_l_14.safetensors")
    ref = keras_reference(reference_dir, "vit_l_14")
    # fp16-rounded inputs are exact in every dtype, so all must give the Keras scores.
    inputs = ref["unit_fp16_rounded.inputs"].astype(dtype)
    expected = ref["unit_fp16_rounded.keras_scores"]
    for batch in (inputs, torch.from_numpy(inputs)):
        np.testing.assert_allclose(head.score(batch, batch_size=100).nsfw_score, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 7, 32, 1000, 5000])
def test_batch_size_does_not_change_scores(laion_dir, reference_dir, batch_size):
    head = load_nsfw_head(laion_dir / "vit_b_32.safetensors")
    ref = keras_reference(reference_dir, "vit_b_32")
    scores = head.score(ref["scaled_fp16_rounded.inputs"][:300], batch_size=batch_size).nsfw_score
    np.testing.assert_allclose(scores, ref["scaled_fp16_rounded.keras_scores"][:300], atol=TOLERANCE, rtol=0)


def test_non_finite_rows_are_reported_not_scored(laion_dir, reference_dir):
    head = load_nsfw_head(laion_dir / "vit_l_14.safetensors")
    ref = keras_reference(reference_dir, "vit_l_14")
    x = ref["unit_float32.inputs"][:10].copy()
    x[2, 5] = np.nan
    x[5, 180] = np.inf  # a categorical column
    x[7, 0] = -np.inf
    result = head.score(x, batch_size=4)
    assert result.unscored == {2: NON_FINITE_REASON, 5: NON_FINITE_REASON, 7: NON_FINITE_REASON}
    assert np.isnan(result.nsfw_score[[2, 5, 7]]).all()
    good = [0, 1, 3, 4, 6, 8, 9]
    np.testing.assert_allclose(result.nsfw_score[good], ref["unit_float32.keras_scores"][good], atol=TOLERANCE, rtol=0)


def test_overflowing_rows_are_reported_not_scored(laion_dir):
    head = load_nsfw_head(laion_dir / "vit_b_32.safetensors")
    x = np.full((3, 512), 0.04, np.float32)
    x[1] = 3e38  # finite, but the first layer overflows float32
    result = head.score(x)
    assert result.unscored == {1: OUT_OF_RANGE_REASON}
    assert np.isnan(result.nsfw_score[1]) and np.isfinite(result.nsfw_score[[0, 2]]).all()


def test_empty_batch(laion_dir):
    head = load_nsfw_head(laion_dir / "vit_l_14.safetensors")
    result = head.score(np.zeros((0, 768), np.float32))
    assert result.nsfw_score.shape == (0,) and not result.unscored


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"NSFW head weights not found at .*nope\.safetensors.*models fetch"):
        load_nsfw_head(tmp_path / "nope.safetensors")


def test_keras_zip_instead_of_safetensors(laion_dir):
    with pytest.raises(UserError, match=r"is LAION's Keras zip, not a safetensors NSFW head; convert it with .*convert-laion"):
        load_nsfw_head(laion_dir / "clip_autokeras_binary_nsfw.zip")


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "head.pt"
    torch.save({"dense.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match=r"head\.pt is a zip archive \(a pickled PyTorch checkpoint\?\), not a safetensors NSFW head"):
        load_nsfw_head(path)
    text = tmp_path / "head.safetensors"
    text.write_text("hello, not weights")
    with pytest.raises(UserError, match=r"head\.safetensors is not a safetensors file"):
        load_nsfw_head(text)


def test_other_safetensors_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(UserError, match=r"not an NSFW head: tensor 'norm.mean' is missing"):
        load_nsfw_head(path)


def test_dimension_mismatch_names_both_dimensions_and_model(laion_dir):
    head = load_nsfw_head(laion_dir / "vit_l_14.safetensors")
    with pytest.raises(UserError, match=r"dimension 512 \(as from ViT-B-32\).*expects 768-d embeddings from CLIP ViT-L-14"):
        head.score(np.zeros((4, 512), np.float32))


def test_bad_shapes_and_types(laion_dir):
    head = load_nsfw_head(laion_dir / "vit_b_32.safetensors")
    with pytest.raises(UserError, match=r"2-D array"):
        head.score(np.zeros(512, np.float32))
    with pytest.raises(UserError, match=r"floating point"):
        head.score(np.zeros((2, 512), np.int64))
