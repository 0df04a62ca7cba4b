"""CLIP's text tower alone: concept texts to L2-normalised text features, without building the image tower.

`encode_concepts(weights, texts)` gives what open_clip's full model gives, `model.encode_text(tokenizer(texts))`
then L2 normalisation (float32 [C, D]), from open_clip's own pieces: `_build_text_tower` with the model
config's `text_cfg` (QuickGELU as resolved, fp32), the model's tokenizer from `open_clip.get_tokenizer`,
and only the text keys of the checkpoint. The image tower's parameters are never allocated and its
weights are never read from a safetensors checkpoint (other checkpoints are loaded whole by open_clip's
`load_state_dict`, with `weights_only=True`, and their image weights dropped at once).

Text keys are where open_clip's model classes keep them: `CLIP` at the top level (`token_embedding.*`,
`positional_embedding`, `transformer.*`, `ln_final.*`, `text_projection*`), `CustomTextCLIP` and `CoCa`
under `text.` (or at the top level in the old format open_clip converts). Text towers from Hugging Face
(`hf_model_name`) are refused: they need a download this product does not make.

The checkpoint is checked as `tasks.models.embed.build_clip_model` checks it (a path against its
fingerprint, a URL through this machine's verified copy). The tower is built once per process, ClipWeights
and device (`functools.lru_cache`).
"""

from __future__ import annotations

import functools
import json
import pickle
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.errors import UserError
from tasks.io.locations import redacted
from tasks.models.clip_resolve import ClipWeights, read_model_config, weights_fingerprint
from tasks.models.embed import select_device
from tasks.models.remote_weights import local_weights

# Concepts encoded per forward pass: a ViT-L/14 text tower holds 256 x 77 tokens in well under a GB.
ENCODE_BATCH = 256

_build_lock = threading.Lock()


class TextTower:
    """A built text tower and its tokenizer; `encode` maps texts to float32 [C, D] L2-normalised features."""

    def __init__(self, module: torch.nn.Module, tokenizer, device: torch.device, embedding_dim: int) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.device = device
        self.embedding_dim = embedding_dim

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows = [np.zeros((0, self.embedding_dim), np.float32)]
        for start in range(0, len(texts), ENCODE_BATCH):
            tokens = self.tokenizer(list(texts[start : start + ENCODE_BATCH])).to(self.device)
            features = self.module(tokens)
            if isinstance(features, tuple):  # a tower that also gives its tokens (CoCa): the pooled features come first
                features = features[0]
            rows.append(F.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(rows)


def encode_concepts(weights: ClipWeights, texts: Sequence[str], device: str | torch.device = "cpu") -> np.ndarray:
    """float32 [len(texts), D], L2-normalised: open_clip's `encode_text` of each text, from the text tower alone."""
    device = str(select_device(device))
    with _build_lock:  # one build per tower even when partitions start together
        tower = text_tower(weights, device)
    return tower.encode(texts)


@functools.lru_cache(maxsize=2)
def text_tower(weights: ClipWeights, device: str) -> TextTower:
    """The text tower of `weights` on `device`, eval and fp32, built once per process."""
    import open_clip
    from open_clip.model import _build_text_tower, resize_text_pos_embed

    config = _model_config(weights)
    text_cfg = dict(config["text_cfg"])
    if "hf_model_name" in text_cfg:
        raise UserError(
            f"CLIP model {weights.model_name} has a Hugging Face text tower ({text_cfg['hf_model_name']}), which concept "
            f"signals do not load; use an open_clip model with its own text transformer."
        )
    custom_text = bool(config.get("custom_text", False))
    if not custom_text:
        # `CLIP` takes its text tower's weights but not a class token or the tokens output.
        text_cfg.update(embed_cls=False, output_tokens=False)
    module = _build_text_tower(int(config["embed_dim"]), text_cfg, quick_gelu=bool(config.get("quick_gelu", False)))
    state_dict = _text_state_dict(weights, set(module.state_dict()), custom_text)
    checkpoint_positions = state_dict.get("positional_embedding")
    if checkpoint_positions is not None and checkpoint_positions.ndim == 2 and checkpoint_positions.shape[1] == module.positional_embedding.shape[1]:
        resize_text_pos_embed(state_dict, module)  # as open_clip does for another context length; another width is refused below
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        reason = re.sub(r"\.\s+", "; ", " ".join(str(error).split())[:300]).rstrip(".")  # torch's several sentences as one
        raise UserError(f"CLIP checkpoint {_shown(weights)} does not load into {weights.model_name}'s text tower ({reason}); pass the checkpoint made for this model config.") from None
    module = module.to(torch.device(device)).eval().requires_grad_(False)
    return TextTower(module, open_clip.get_tokenizer(weights.model_name), torch.device(device), weights.embedding_dim)


def _model_config(weights: ClipWeights) -> dict:
    """The resolved model config, with open_clip's registry holding it (the tokenizer is found by model name)."""
    import open_clip

    if weights.config_path and open_clip.get_model_config(weights.model_name) != read_model_config(Path(weights.config_path)):
        # open_clip's documented way to use a model-config file: register it under its file stem.
        open_clip.add_model_config(weights.config_path)
    registered = dict(open_clip.get_model_config(weights.model_name) or {})
    if weights.quick_gelu:
        registered["quick_gelu"] = True
    config = json.loads(weights.model_config)
    if registered != config:
        raise UserError(f"CLIP model config for {weights.model_name} changed since it was resolved; start the run again.")
    return config


def _first_sentence(error: BaseException) -> str:
    """`TypeName: the error's first sentence`, without terminal colour codes, for a message of one sentence."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())
    return f"{type(error).__name__}: {re.split(r'(?<=[.!?]) ', text, maxsplit=1)[0].rstrip('.')[:200]}"


def _shown(weights: ClipWeights) -> str:
    return redacted(weights.checkpoint_url) if weights.checkpoint_url else weights.checkpoint_path


def _checkpoint(weights: ClipWeights) -> str:
    """The checkpoint file to read, checked against the weights' fingerprint."""
    if weights.checkpoint_url:
        # Weights given as a URL: this machine's verified copy, downloaded here once when the machine lacks it.
        return str(local_weights(weights.checkpoint_location, weights.weights_fingerprint))
    checkpoint = weights.checkpoint_path
    if not Path(checkpoint).is_file():
        raise UserError(f"CLIP checkpoint {checkpoint} no longer exists; restore it or resolve the weights again.")
    if weights_fingerprint(checkpoint) != weights.weights_fingerprint:
        raise UserError(f"CLIP checkpoint {checkpoint} changed since it was resolved; start the run again.")
    return checkpoint


def _text_names(checkpoint_keys: list[str], tower_keys: set[str], custom_text: bool) -> dict[str, str]:
    """Checkpoint key -> tower key for the checkpoint's text-tower tensors (after `module.`, as open_clip strips it,
    then `text.` for a custom-text model in the current format)."""
    prefix = "module." if checkpoint_keys and checkpoint_keys[0].startswith("module") else ""
    if custom_text and any(key.startswith(f"{prefix}text.") for key in checkpoint_keys):
        prefix += "text."
    return {key: key[len(prefix) :] for key in checkpoint_keys if key.startswith(prefix) and key[len(prefix) :] in tower_keys}


def _text_state_dict(weights: ClipWeights, tower_keys: set[str], custom_text: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's text-tower tensors, named as the tower names them; the image tower's are never kept."""
    from open_clip.factory import load_state_dict
    from safetensors import SafetensorError, safe_open

    checkpoint = _checkpoint(weights)
    if checkpoint.lower().endswith(".safetensors"):
        try:
            with safe_open(checkpoint, framework="pt", device="cpu") as handle:
                names = _text_names(list(handle.keys()), tower_keys, custom_text)
                return {tower_key: handle.get_tensor(key) for key, tower_key in names.items()}
        except SafetensorError as error:
            raise UserError(f"CLIP checkpoint {_shown(weights)} is not a readable safetensors file ({error}); fetch it again.") from None
    try:
        full = load_state_dict(checkpoint, device="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch's weights-only unpickler fails on bad bytes in many types (KeyError, EOFError, ...)
        if "TorchScript" in str(error):
            hint = "it is a TorchScript archive, which is not loaded without pickle; `nsfw-curator models fetch` stores weights as safetensors"
        elif isinstance(error, pickle.UnpicklingError):
            hint = "it holds pickled objects other than tensors, which are never unpickled; convert it to safetensors"
        else:
            hint = f"{_first_sentence(error)}; pass a safetensors checkpoint or a state dict saved with torch.save"
        raise UserError(f"CLIP checkpoint {_shown(weights)} does not load: {hint}.") from None
    return {tower_key: full[key] for key, tower_key in _text_names(list(full), tower_keys, custom_text).items()}
