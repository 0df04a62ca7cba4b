"""Named forward passes of an open_clip image tower: the same embeddings, computed faster on a GPU.

`build_forward(model, device, name, batch_size, dtype)` returns a function from a preprocessed batch
[N, 3, H, W] (any float dtype, any device) to the image features [N, D] on `device`, unnormalised, as
`model.encode_image` gives them, in the reduced precision `dtype` (float16 or bfloat16). The shared fp32
model is never changed: the half-precision passes run their own copy of the visual tower (ViT-L/14: 0.6 GB
in fp16), so other code keeps using the model as it was built.

Each pass is one step on the one before, so a benchmark can keep only the steps that pay:

autocast       `model.encode_image` under `torch.autocast(dtype)`: what the embedder has always run. Autocast
               casts every weight again for each batch (it caches casts only of weights that require grad), and
               nn.MultiheadAttention leaves its fused inference fast path (it is off while autocast is on) for
               `F.multi_head_attention_forward`, which still calls `F.scaled_dot_product_attention`.
half           a copy of the visual tower in `dtype`, no autocast: no casts per batch, and nn.MultiheadAttention
               takes its inference fast path (`torch._native_multi_head_attention`, SDPA kernels on CUDA) where
               its conditions hold: eval, no grad, batch_first, input dtype = weight dtype, an even number of heads.
half-sdpa      that copy with each block's nn.MultiheadAttention replaced by open_clip's own `Attention` (the
               block open_clip builds for `vision_cfg.block_type="custom"`), same weights, which calls
               `F.scaled_dot_product_attention` itself whatever the head count: no fork of open_clip.
half-compiled  the half-sdpa tower under `torch.compile` (compiled on its first call, one graph, no breaks) for
               one batch shape: a batch of fewer rows is padded with zeros to `batch_size` and the padding's
               rows dropped (a ViT never mixes rows, so padding changes no real row); a larger batch runs in
               pieces of `batch_size`.

On the CPU every pass runs too (tests use bfloat16); the embedder itself runs fp32 there.
`shared_forward` keeps one built pass per model, name, device, dtype and batch size in a process, so the
embedders made for each partition share one copy and one compilation.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable

import torch

from tasks.errors import UserError

FORWARD_PASSES = ("autocast", "half", "half-sdpa", "half-compiled")
DEFAULT_FORWARD = "autocast"  # until a GPU measurement in benchmarks/bench_gpu.py says another pass pays
REDUCED_DTYPES = (torch.float16, torch.bfloat16)

Forward = Callable[[torch.Tensor], torch.Tensor]


def check_forward_for_model(name: str, model_config: dict) -> None:
    """Refuse, before any task runs, a pass that needs open_clip's own ViT blocks for a model whose image tower has none."""
    vision = model_config.get("vision_cfg") or {}
    is_open_clip_vit = isinstance(vision.get("layers"), int) and not vision.get("timm_model_name")
    if name in ("half-sdpa", "half-compiled") and not is_open_clip_vit:
        raise UserError(f"forward pass {name!r} needs an open_clip ViT image tower, and this model's is not one; use forward_pass 'half' or 'autocast'.")


def check_forward_name(name: str) -> str:
    """`name` when it is one of FORWARD_PASSES; otherwise one sentence naming them."""
    if name not in FORWARD_PASSES:
        raise UserError(f"forward pass must be one of {', '.join(FORWARD_PASSES)}, not {name!r}.")
    return name


def build_forward(
    model: torch.nn.Module,
    device: torch.device,
    name: str,
    batch_size: int,
    dtype: torch.dtype,
    compile_backend: str = "inductor",
) -> Forward:
    """The forward pass `name` of `model`'s image tower on `device` in `dtype` (see the module docstring).

    `batch_size` is the one batch shape "half-compiled" is compiled for; `compile_backend` is torch.compile's
    backend (tests use "aot_eager": the same captured graph without generating code).
    """
    check_forward_name(name)
    assert dtype in REDUCED_DTYPES, f"forward passes run in float16 or bfloat16, not {dtype}"
    assert batch_size >= 1, "the embedder validates its batch size"
    if name == "autocast":
        return _autocast_forward(model, device, dtype)
    tower = half_precision_tower(model, device, dtype)
    if name != "half":
        tower = with_sdpa_attention(tower)
    if name == "half-compiled":
        return _padded_forward(torch.compile(tower, dynamic=False, fullgraph=True, backend=compile_backend), device, dtype, batch_size)
    return _tower_forward(tower, device, dtype)


_shared_lock = threading.Lock()
# Weakly keyed by the model: a pass holds only its own tower, so unloading the model frees its passes too.
_shared: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str, torch.dtype, int], Forward]] = weakref.WeakKeyDictionary()


def shared_forward(model: torch.nn.Module, device: torch.device, name: str, batch_size: int, dtype: torch.dtype) -> Forward:
    """`build_forward`'s pass, built once per model, name, device, dtype and batch size in this process."""
    if name == "autocast":
        return _autocast_forward(model, device, dtype)  # nothing to build, and it holds the model itself
    # only a compiled pass is built for one batch shape; the others serve every batch size with one copy
    key = (check_forward_name(name), str(device), dtype, int(batch_size) if name == "half-compiled" else None)
    with _shared_lock:
        passes = _shared.setdefault(model, {})
        if key not in passes:
            passes[key] = build_forward(model, device, name, batch_size, dtype)
        return passes[key]


def _autocast_forward(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Forward:
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
            return model.encode_image(pixels.to(device, non_blocking=True))

    return forward


def half_precision_tower(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model.visual` in `dtype` on `device` (open_clip's `encode_image` is `visual(image)`).

    Each floating-point weight is cast as it is copied (deepcopy's memo holds the cast tensors), so the tower never
    exists twice in float32 on the device: ViT-L/14's copy costs its 0.6 GB in fp16, not 1.2 GB more on the way."""
    visual = model.visual
    memo: dict[int, object] = {}
    for tensor in [*visual.parameters(), *visual.buffers()]:
        if tensor.is_floating_point():
            cast = tensor.detach().to(device=device, dtype=dtype)
            memo[id(tensor)] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else cast
    tower = copy.deepcopy(visual, memo)
    return tower.to(device=device, dtype=dtype).eval().requires_grad_(False)


def with_sdpa_attention(tower: torch.nn.Module) -> torch.nn.Module:
    """`tower` with its nn.MultiheadAttention blocks replaced, in place, by open_clip's SDPA blocks of the same weights."""
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    transformer = getattr(tower, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not isinstance(blocks, torch.nn.ModuleList):
        raise UserError(f"forward pass 'half-sdpa' needs an open_clip ViT image tower, not {type(tower).__name__}; use 'half'.")
    assert transformer.batch_first, "open_clip's SDPA block runs batch-first"
    for index, block in enumerate(blocks):
        if isinstance(block, CustomResidualAttentionBlock):
            continue  # open_clip built this one with its own SDPA attention already
        assert isinstance(block, ResidualAttentionBlock) and not hasattr(block, "ln_1_kv"), f"unexpected block {type(block).__name__}"
        blocks[index] = _sdpa_block(block, CustomResidualAttentionBlock)
    return tower


def _sdpa_block(block: torch.nn.Module, block_type: type[torch.nn.Module]) -> torch.nn.Module:
    """open_clip's custom block around `block`'s own norms, MLP and layer scales, its attention weights in open_clip's Attention."""
    attention = block.attn
    assert attention.batch_first and attention._qkv_same_embed_dim and attention.bias_k is None and not attention.add_zero_attn
    with torch.device("meta"):  # no random initialisation: every tensor comes from `block`
        swapped = block_type(attention.embed_dim, attention.num_heads)
    # the block's own modules keep its activation (QuickGELU or GELU), norm type and layer scale
    swapped.ln_1, swapped.ls_1, swapped.ln_2, swapped.mlp, swapped.ls_2 = block.ln_1, block.ls_1, block.ln_2, block.mlp, block.ls_2
    swapped.attn.load_state_dict(attention.state_dict(), strict=True, assign=True)
    return swapped.eval().requires_grad_(False)


def _tower_forward(tower: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Forward:
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return tower(pixels.to(device, dtype, non_blocking=True))

    return forward


def _padded_forward(compiled: Callable[[torch.Tensor], torch.Tensor], device: torch.device, dtype: torch.dtype, batch_size: int) -> Forward:
    lock = threading.Lock()  # compilation and its caches are not for concurrent first calls from several partitions
    compiled_once: list[bool] = []  # set after the first call, which compiles

    def run_one(rows: torch.Tensor) -> torch.Tensor:
        real_rows = len(rows)
        if real_rows < batch_size:
            padded = torch.zeros((batch_size, *rows.shape[1:]), dtype=dtype, device=device)
            padded[:real_rows] = rows
            rows = padded
        with lock:
            if not compiled_once:
                try:
                    out = compiled(rows)
                except Exception as error:  # noqa: BLE001 - a tower or a machine torch.compile cannot handle: one sentence
                    reason = " ".join(str(error).split())[:200] or type(error).__name__
                    raise UserError(f"forward pass 'half-compiled' could not compile this image tower ({reason}); use forward_pass 'half-sdpa'.") from None
                compiled_once.append(True)
                return out[:real_rows]
            return compiled(rows)[:real_rows]

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            pixels = pixels.to(device, dtype, non_blocking=True)
            if len(pixels) <= batch_size:
                return run_one(pixels)
            return torch.cat([run_one(piece) for piece in pixels.split(batch_size)])

    return forward
