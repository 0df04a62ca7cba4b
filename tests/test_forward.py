"""The named forward passes of tasks/models/forward.py, run on the CPU with tiny open_clip models."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks._photos import photo_like
from tasks.errors import UserError
from tasks.models.clip_resolve import resolve_clip
from tasks.models.embed import ClipEmbedder, build_clip_model, load_clip_embedder
from tasks.models.forward import FORWARD_PASSES, build_forward, half_precision_tower, shared_forward, with_sdpa_attention
from tests.support.tiny_clip import make_tiny_clip

CPU = torch.device("cpu")
# torch.compile's graph capture without generating C++ (inductor's first build takes a minute on two cores)
CAPTURE_ONLY = "aot_eager"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny ViT CLIP with two heads (nn.MultiheadAttention's fast path needs an even count, as ViT-L/14's 16),
    its open_clip transform, and seven preprocessed photo-like images."""
    directory = tmp_path_factory.mktemp("forward")
    config_path, checkpoint_path = make_tiny_clip(directory, width=128, name="tiny-two-heads")
    weights = resolve_clip(str(config_path), str(checkpoint_path), directory)
    model, transform = build_clip_model(weights, CPU)
    pixels = torch.stack([transform(photo_like(96 + 16 * index, 80, seed=index)) for index in range(7)])
    return weights, model, transform, pixels


def fp32_embeddings(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return F.normalize(model.encode_image(pixels), dim=-1)


def ops_run(forward, pixels: torch.Tensor) -> set[str]:
    """The aten operators a forward pass ran (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        forward(pixels)
    return {event.key for event in profile.key_averages()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", FORWARD_PASSES)
def test_every_pass_keeps_the_fp32_embeddings_and_leaves_the_shared_model_as_it_was(tiny, name, dtype):
    _, model, _, pixels = tiny
    before = {key: value.clone() for key, value in model.state_dict().items()}
    forward = build_forward(model, CPU, name, batch_size=4, dtype=dtype, compile_backend=CAPTURE_ONLY)
    features = forward(pixels)

    assert features.shape == (7, 768) and features.dtype == dtype
    cosines = (F.normalize(features.float(), dim=-1) * fp32_embeddings(model, pixels)).sum(dim=1)
    assert cosines.min() >= 0.999, cosines
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[key], before[key]) and state[key].dtype == torch.float32 for key in before)
    assert type(model.visual.transformer.resblocks[0]).__name__ == "ResidualAttentionBlock"


def test_half_takes_multihead_attentions_fast_path_which_autocast_turns_off(tiny):
    _, model, _, pixels = tiny
    autocast_ops = ops_run(build_forward(model, CPU, "autocast", 4, torch.bfloat16), pixels)
    half_ops = ops_run(build_forward(model, CPU, "half", 4, torch.bfloat16), pixels)

    assert "aten::_native_multi_head_attention" in half_ops
    assert "aten::_native_multi_head_attention" not in autocast_ops
    assert "aten::scaled_dot_product_attention" in autocast_ops  # F.multi_head_attention_forward's path without weights


def test_half_sdpa_runs_open_clips_own_attention_block_with_the_same_weights(tiny):
    from open_clip.transformer import CustomResidualAttentionBlock

    _, model, _, pixels = tiny
    half = build_forward(model, CPU, "half", 4, torch.float16)
    sdpa = build_forward(model, CPU, "half-sdpa", 4, torch.float16)
    sdpa_ops = ops_run(sdpa, pixels)

    assert "aten::scaled_dot_product_attention" in sdpa_ops and "aten::_native_multi_head_attention" not in sdpa_ops
    tower = with_sdpa_attention(half_precision_tower(model, CPU, torch.float16))
    assert all(isinstance(block, CustomResidualAttentionBlock) for block in tower.transformer.resblocks)
    assert not any(tensor.is_meta for tensor in [*tower.parameters(), *tower.buffers()])
    assert F.cosine_similarity(sdpa(pixels).float(), half(pixels).float()).min() >= 0.9999


def test_half_compiled_pads_a_short_batch_without_changing_its_rows_and_splits_a_long_one(tiny):
    _, model, _, pixels = tiny
    forward = build_forward(model, CPU, "half-compiled", batch_size=4, dtype=torch.bfloat16, compile_backend=CAPTURE_ONLY)
    full = forward(pixels[:4])
    short = forward(pixels[:3])  # padded to 4 with zero images
    other_fourth = forward(torch.cat([pixels[:3], pixels[6:7]]))
    long = forward(pixels)  # 4 + 3

    assert short.shape == (3, 768) and long.shape == (7, 768)
    assert torch.equal(short, full[:3]) and torch.equal(other_fourth[:3], full[:3])
    assert torch.equal(long[:4], full) and torch.equal(long[4:], forward(pixels[4:]))


def test_half_sdpa_on_a_tower_without_transformer_blocks_says_to_use_half(tmp_path):
    # open_clip's ModifiedResNet image tower: layers given per stage
    config_path, checkpoint_path = make_tiny_clip(tmp_path, name="tiny-resnet", layers=[1, 1, 1, 1], width=16)
    model, _ = build_clip_model(resolve_clip(str(config_path), str(checkpoint_path), tmp_path), CPU)
    pixels = torch.rand(2, 3, 64, 64)

    assert build_forward(model, CPU, "half", 2, torch.bfloat16)(pixels).shape == (2, 768)
    with pytest.raises(UserError, match="needs an open_clip ViT image tower, not ModifiedResNet; use 'half'"):
        build_forward(model, CPU, "half-sdpa", 2, torch.bfloat16)


def test_shared_forward_builds_once_per_setting_and_goes_with_its_model(tiny):
    from tasks.models import forward as forward_module

    _, model, _, _ = tiny
    first = shared_forward(model, CPU, "half", 4, torch.bfloat16)
    assert shared_forward(model, CPU, "half", 4, torch.bfloat16) is first
    assert shared_forward(model, CPU, "half", 8, torch.bfloat16) is first  # one copy serves every batch size
    assert shared_forward(model, CPU, "half-sdpa", 4, torch.bfloat16) is not first
    compiled = shared_forward(model, CPU, "half-compiled", 4, torch.bfloat16)
    assert shared_forward(model, CPU, "half-compiled", 8, torch.bfloat16) is not compiled  # compiled for one batch shape

    copy = torch.nn.Module()
    copy.visual = model.visual
    shared_forward(copy, CPU, "half", 4, torch.bfloat16)
    kept = len(forward_module._shared)
    del copy
    gc.collect()
    assert len(forward_module._shared) == kept - 1


def test_an_unknown_pass_is_one_sentence_and_a_cpu_embedder_runs_fp32_whatever_the_pass(tiny):
    weights, model, transform, pixels = tiny
    with pytest.raises(UserError, match="forward pass must be one of autocast, half, half-sdpa, half-compiled, not 'fast'"):
        ClipEmbedder(weights, model, transform, CPU, 4, forward="fast")

    embedder = load_clip_embedder(weights, "cpu", 4, forward="half-sdpa")
    assert embedder.precision == "fp32" and embedder.forward == "half-sdpa"
    np.testing.assert_allclose(embedder.embed_pixels(pixels), fp32_embeddings(embedder.model, pixels).numpy(), rtol=0, atol=1e-6)


def test_the_flows_forward_pass_reaches_the_embedding_stage_and_a_wrong_one_is_refused(tmp_path, tiny_clip_768, laion_dir):
    from flows.nsfw_filter import preflight
    from tests.support.filter_parameters import local_filter_parameters
    from tests.support.tars import shard_of_good_samples, write_tar

    from tasks.errors import UserError

    write_tar(tmp_path / "in" / "part-000000.tar", shard_of_good_samples(["a", "b"], size=(64, 48)))
    plan = preflight(local_filter_parameters(tmp_path, tiny_clip_768, laion_dir, forward_pass="half-sdpa"))
    assert plan.embed.forward_pass == "half-sdpa"
    assert preflight(local_filter_parameters(tmp_path, tiny_clip_768, laion_dir, take_over_output=True)).embed.forward_pass == "autocast"
    with pytest.raises(UserError, match="forward_pass"):
        preflight(local_filter_parameters(tmp_path, tiny_clip_768, laion_dir, forward_pass="fp8", take_over_output=True))


def test_a_pass_the_models_tower_cannot_run_is_refused_before_any_task():
    from tasks.errors import UserError
    from tasks.models.forward import check_forward_for_model

    vit = {"vision_cfg": {"layers": 24, "width": 1024, "patch_size": 14}}
    resnet = {"vision_cfg": {"layers": [3, 4, 6, 3], "width": 64}}
    timm = {"vision_cfg": {"timm_model_name": "convnext_base", "layers": 12}}
    for name in ("autocast", "half", "half-sdpa", "half-compiled"):
        check_forward_for_model(name, vit)
    for config in (resnet, timm):
        check_forward_for_model("half", config)
        for name in ("half-sdpa", "half-compiled"):
            with pytest.raises(UserError, match="needs an open_clip ViT image tower"):
                check_forward_for_model(name, config)
