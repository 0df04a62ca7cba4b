"""`nsfw-curator models fetch`: put CLIP weights and the LAION NSFW head where the offline loaders look.

- CLIP: open_clip's own download machinery (`open_clip.download_pretrained`: the Hugging Face Hub copy
  when `huggingface_hub` is installed, else the original URL with open_clip's SHA-256 check) fetches the
  tag's checkpoint, which is stored as `{model_dir}/clip/{clip_model}/{tag}.safetensors` (no pickle when
  it is loaded later) with its SHA-256 recorded in the user's fingerprint cache, then built once with the offline loader.
- NSFW head: LAION's Keras zip, converted by `tasks.models.laion_convert` to `{model_dir}/nsfw/{clip_model}.safetensors`.

Idempotent: files already present and readable are kept; downloads go to `{model_dir}/.downloads` and
are removed once converted. Nothing else in the project downloads weights.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tasks.models.clip_resolve import TAG_SUFFIXES, resolve_clip, weights_fingerprint
from tasks.errors import UserError
from tasks.io.locations import clip_weights_dir, default_model_dir, nsfw_weights_path

LAION_HEAD_URLS = {
    "ViT-L-14": "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/clip_autokeras_binary_nsfw.zip",
    "ViT-B-32": "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/clip_autokeras_nsfw_b32.zip",
}
HEAD_DIMENSIONS = {"ViT-L-14": 768, "ViT-B-32": 512}
DOWNLOADS_DIR = ".downloads"


def _head_model(model_name: str) -> str:
    """The CLIP architecture a LAION head is for (`ViT-L-14-quickgelu` uses the `ViT-L-14` head)."""
    return model_name.removesuffix("-quickgelu")


def _valid_clip_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return path.stat().st_size > 0
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return any(key.startswith("visual.") for key in handle.keys())
    except Exception:  # noqa: BLE001 - any unreadable file is re-fetched
        return False


def _save_safetensors(state_dict: dict, out_path: Path) -> None:
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().contiguous()
        # safetensors refuses tensors that share memory; copy the second and later sharers.
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    tmp_path = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, str(tmp_path))
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)


def fetch_clip_weights(model_dir: str | os.PathLike, clip_model: str = "ViT-L-14", clip_pretrained: str = "openai") -> Path:
    """The CLIP checkpoint for `clip_model`/`clip_pretrained` under `model_dir`, downloaded if missing."""
    import open_clip
    from open_clip.factory import load_state_dict

    model_name = clip_model.replace("/", "-")
    weights_dir = clip_weights_dir(model_dir, model_name)
    for suffix in TAG_SUFFIXES:
        present = weights_dir / f"{clip_pretrained}{suffix}"
        if present.is_file() and _valid_clip_checkpoint(present):
            weights_fingerprint(present)  # recorded now, so the first run does not hash 900 MB
            return present
    pretrained_cfg = open_clip.get_pretrained_cfg(model_name, clip_pretrained)
    if not pretrained_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise UserError(f"open_clip has no pretrained weights {clip_pretrained!r} for {model_name} (it has: {tags}); pick one of those tags.")
    download_dir = Path(model_dir) / DOWNLOADS_DIR / "clip"
    try:
        downloaded = Path(open_clip.download_pretrained(pretrained_cfg, cache_dir=str(download_dir)))
    except Exception as error:  # noqa: BLE001 - urllib and huggingface_hub raise many kinds
        raise UserError(
            f"could not download CLIP {model_name} ({clip_pretrained}) through open_clip ({type(error).__name__}: {error}); "
            f"check the network, or put a checkpoint at {weights_dir}/{clip_pretrained}.safetensors yourself."
        ) from None
    weights_dir.mkdir(parents=True, exist_ok=True)
    out_path = weights_dir / f"{clip_pretrained}.safetensors"
    try:
        state_dict = load_state_dict(str(downloaded), weights_only=True)
    except RuntimeError as error:
        if "TorchScript" not in str(error):
            raise
        # OpenAI's original files are TorchScript archives; open_clip verified this one's SHA-256. Their state
        # dicts carry metadata and mask buffers the model builds itself (as open_clip's OpenAI loader drops them).
        state_dict = load_state_dict(str(downloaded), weights_only=False)
        state_dict = {
            name: tensor
            for name, tensor in state_dict.items()
            if name not in ("input_resolution", "context_length", "vocab_size") and not name.endswith("attn_mask")
        }
    _save_safetensors(state_dict, out_path)
    del state_dict
    # Build it once with the offline loader, so a broken download fails here and not in a run.
    from tasks.models.embed import build_clip_model

    import torch

    build_clip_model(resolve_clip(model_name, clip_pretrained, model_dir), torch.device("cpu"))
    shutil.rmtree(download_dir, ignore_errors=True)
    return out_path


def fetch_nsfw_head(model_dir: str | os.PathLike, clip_model: str = "ViT-L-14") -> Path:
    """LAION's NSFW head for `clip_model` as safetensors under `model_dir`, downloaded and converted if missing."""
    from tasks.models.nsfw import load_nsfw_head

    head_model = _head_model(clip_model.replace("/", "-"))
    if head_model not in LAION_HEAD_URLS:
        raise UserError(f"LAION publishes NSFW heads only for {' and '.join(LAION_HEAD_URLS)}, not {clip_model}; use one of those CLIP models.")
    out_path = nsfw_weights_path(model_dir, head_model)
    if out_path.is_file():
        try:
            if load_nsfw_head(out_path).embedding_dim == HEAD_DIMENSIONS[head_model]:
                return out_path
        except UserError:
            pass  # damaged or foreign: fetched again below
    url = LAION_HEAD_URLS[head_model]
    download_dir = Path(model_dir) / DOWNLOADS_DIR / "nsfw"
    download_dir.mkdir(parents=True, exist_ok=True)
    zip_path = download_dir / url.rsplit("/", 1)[1]
    tmp_path = zip_path.with_name(f".{zip_path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, tmp_path.open("wb") as handle:
            shutil.copyfileobj(response, handle, 1 << 20)
        os.replace(tmp_path, zip_path)
    except (urllib.error.URLError, OSError) as error:
        raise UserError(
            f"could not download the LAION NSFW head from {url} ({error}); check the network, or download it yourself "
            f"and run `nsfw-curator models convert-laion ZIP {out_path}`."
        ) from None
    finally:
        tmp_path.unlink(missing_ok=True)
    from tasks.models.laion_convert import convert_laion_zip

    out_path.parent.mkdir(parents=True, exist_ok=True)
    convert_laion_zip(zip_path, out_path)
    shutil.rmtree(download_dir, ignore_errors=True)
    return out_path


def fetch_models(model_dir: str | os.PathLike | None = None, clip_model: str = "ViT-L-14", clip_pretrained: str = "openai") -> list[Path]:
    """Fetch CLIP weights and the matching LAION head into `model_dir`; returns [clip checkpoint, NSFW head]."""
    model_dir = Path(model_dir or default_model_dir()).expanduser()
    head_model = _head_model(clip_model.replace("/", "-"))
    if head_model not in LAION_HEAD_URLS:
        raise UserError(f"LAION publishes NSFW heads only for {' and '.join(LAION_HEAD_URLS)}, not {clip_model}; use one of those CLIP models.")
    return [fetch_clip_weights(model_dir, clip_model, clip_pretrained), fetch_nsfw_head(model_dir, clip_model)]
