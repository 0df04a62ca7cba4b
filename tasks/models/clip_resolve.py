"""Which CLIP model and weights a run uses, found offline, and the identity of the embeddings they make.

The counterpart of open_clip's `pretrained.py`: names, configs, tags and checkpoint paths are resolved
here without building the model, so the flow can check the embedding store (and skip loading CLIP when
every shard hits) from this module alone. Construction and batched embedding live in `tasks.models.embed`.

- `clip_model`: an open_clip model name (`ViT-L-14`) or a path to an open_clip model-config JSON whose
  file stem is the model name.
- `clip_pretrained`: a checkpoint path (`.safetensors`, `.bin`, `.pt`, `.pth`), a checkpoint URL
  (`s3://...`, any fsspec URL, same suffixes), or a pretrained tag found at
  `{model_dir}/clip/{clip_model}/{tag}.{safetensors,bin,pt}` (see `tasks.io.locations`). A tag open_clip
  knows also brings open_clip's preprocessing and QuickGELU setting for it (the `openai` weights were
  trained with QuickGELU; open_clip's `ViT-L-14` config alone would only warn about the mismatch).

Tags and paths are resolved offline. A URL is resolved through `tasks.models.remote_weights`: its SHA-256
is learned (downloading into the local weights cache at most once per machine and object version), and
`ClipWeights` carries the URL and that digest so any worker gets its own verified copy. The fingerprint
is the file's SHA-256 either way, so the same bytes name the same embeddings from a path or a URL.
Pretrained tags are never downloaded here; `nsfw-curator models fetch` (`tasks.models.fetch`) does that.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, fields
from pathlib import Path

from tasks.errors import UserError
from tasks.io.locations import Location, clip_weights_dir, default_fingerprint_cache_dir, resolve_url_credentials, safe_name
from tasks.models.remote_weights import is_remote, resolve_weights, url_suffix

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Order in which a tag's files are looked up in the model directory: safetensors first (no pickle).
TAG_SUFFIXES = (".safetensors", ".bin", ".pt")
# Bumped when the meaning of an identity changes, so old store entries become misses.
IDENTITY_VERSION = 1
_PREPROCESS_TAG_KEYS = ("mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
_HASH_CHUNK_BYTES = 8 << 20
# ClipWeights fields that say where the weights are, not what they are: left out of the identity record.
_NOT_IDENTITY_FIELDS = ("config_path", "checkpoint_path", "checkpoint_location")


@dataclass(frozen=True)
class ClipWeights:
    """A resolved CLIP model: everything needed to build it and to name its embeddings, no tensors.

    `model_config` and `preprocess` are canonical JSON strings (the dataclass stays hashable); `preprocess`
    describes open_clip's inference transform for the model, `weights_fingerprint` is the checkpoint's SHA-256.
    For weights given as a URL, `checkpoint_location` is where they are (a worker fetches its own copy from
    it; its credentials are never shown or recorded) and `checkpoint_path` the copy on the resolving machine.
    """

    model_name: str
    config_path: str | None
    checkpoint_path: str
    pretrained_tag: str | None
    weights_fingerprint: str
    embedding_dim: int
    image_size: tuple[int, int]
    quick_gelu: bool
    model_config: str
    preprocess: str
    checkpoint_location: Location | None = None

    @property
    def checkpoint_url(self) -> str | None:
        """The checkpoint's URL (without credentials) when it was given as one."""
        return self.checkpoint_location.url if self.checkpoint_location is not None else None

    @property
    def preprocess_cfg(self) -> dict:
        """open_clip's `PreprocessCfg` fields for the model's inference transform."""
        return json.loads(self.preprocess)["cfg"]


def _canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _to_2tuple(size: int | list | tuple) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        assert len(size) == 2, f"image size {size} is not (height, width)"
        return int(size[0]), int(size[1])
    return int(size), int(size)


def read_model_config(config_path: Path) -> dict:
    if not config_path.is_file():
        raise UserError(f"CLIP model config {config_path} does not exist; pass an open_clip model name or an existing model-config JSON.")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"CLIP model config {config_path} is not valid JSON ({error}); pass an open_clip model-config JSON.") from None
    if not isinstance(config, dict) or not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(
            f"CLIP model config {config_path} lacks `embed_dim`, `vision_cfg` or `text_cfg`; "
            f"pass an open_clip model-config JSON like open_clip's model_configs/ViT-L-14.json."
        )
    return config


def _model_name_and_config(clip_model: str) -> tuple[str, Path | None, dict]:
    import open_clip

    if clip_model.lower().endswith(".json"):
        config_path = Path(clip_model).expanduser().resolve()
        return config_path.stem, config_path, read_model_config(config_path)
    model_name = clip_model.replace("/", "-")
    config = open_clip.get_model_config(model_name)
    if config is None or model_name.startswith(("hf-hub:", "local-dir:")):
        raise UserError(
            f"CLIP model {clip_model!r} is not an open_clip model name (see open_clip.list_models()) nor a "
            f"model-config .json path; pass one of those as clip_model."
        )
    return model_name, None, config


def checkpoint_for_tag(model_name: str, clip_pretrained: str, model_dir: str | os.PathLike) -> tuple[Path, str | None]:
    """The checkpoint file and the pretrained tag (None when `clip_pretrained` is a path)."""
    candidate = Path(clip_pretrained).expanduser()
    if candidate.suffix.lower() in CHECKPOINT_SUFFIXES or os.sep in clip_pretrained or "/" in clip_pretrained:
        if not candidate.is_file():
            raise UserError(
                f"CLIP checkpoint {candidate} does not exist; pass an existing .safetensors/.bin/.pt file "
                f"or a pretrained tag found under --model-dir."
            )
        if candidate.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise UserError(f"CLIP checkpoint {candidate} is not a .safetensors, .bin, .pt or .pth file; convert it to one of those.")
        return candidate.resolve(), None
    weights_dir = clip_weights_dir(model_dir, model_name)
    tags = dict.fromkeys([clip_pretrained, clip_pretrained.lower().replace("-", "_")])
    for tag in tags:
        for suffix in TAG_SUFFIXES:
            path = weights_dir / f"{tag}{suffix}"
            if path.is_file():
                return path.resolve(), tag
    raise UserError(
        f"CLIP weights {model_name} ({clip_pretrained}) were not found: looked for {weights_dir}/{clip_pretrained}"
        f".{{safetensors,bin,pt}}; run `nsfw-curator models fetch --model-dir {model_dir}` to get them, "
        f"or pass a checkpoint path as clip_pretrained."
    )


_fingerprint_lock = threading.Lock()
_fingerprint_memo: dict[tuple, str] = {}


def weights_fingerprint(checkpoint_path: str | os.PathLike) -> str:
    """SHA-256 of a weight file, cached by (path, size, mtime, inode) in-process and in the user's cache folder.

    Hashing ViT-L/14 (900 MB) takes seconds, so the digest is kept as one small JSON record per file in
    `default_fingerprint_cache_dir()`, named by the hash of the file's resolved path, and reused while the
    file keeps its path, size, mtime and inode. Nothing is written beside the model file: model folders are
    often shared, versioned or mounted read-only. The cache is fooled only by replacing the file in place
    with another of the same byte size *and* restoring the old mtime; delete its record after doing so.
    """
    path = Path(checkpoint_path).resolve()
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    with _fingerprint_lock:
        if memo_key in _fingerprint_memo:
            return _fingerprint_memo[memo_key]
    record_path = fingerprint_record_path(path)
    expected = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    digest = _read_fingerprint_record(record_path, expected)
    if digest is None:
        hasher = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                hasher.update(chunk)
        digest = hasher.hexdigest()
        _write_fingerprint_record(record_path, {**expected, "sha256": digest})
    with _fingerprint_lock:
        _fingerprint_memo[memo_key] = digest
    return digest


def fingerprint_record_path(resolved_path: Path) -> Path:
    """Where the cached digest of the file at `resolved_path` is kept."""
    return default_fingerprint_cache_dir() / f"{hashlib.sha256(str(resolved_path).encode()).hexdigest()[:32]}.json"


def _read_fingerprint_record(record_path: Path, expected: dict) -> str | None:
    """The recorded digest when the record is valid and describes the file as it is now, else None."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or any(record.get(name) != value for name, value in expected.items()):
        return None
    digest = record.get("sha256")
    return digest if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) else None


def _write_fingerprint_record(record_path: Path, record: dict) -> None:
    tmp_path = record_path.with_name(f".{record_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path.write_text(_canonical_json(record))
        os.replace(tmp_path, record_path)
    except OSError:
        # An unwritable cache folder only costs a re-hash in the next process.
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def _preprocess_description(image_size: tuple[int, int], tag_cfg: dict) -> tuple[dict, str]:
    """open_clip's final inference preprocess config for the model, and the transform it builds."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    cfg = merge_preprocess_dict(PreprocessCfg(), {key: tag_cfg[key] for key in _PREPROCESS_TAG_KEYS if key in tag_cfg})
    cfg["size"] = image_size
    cfg = {key: list(value) if isinstance(value, tuple) else value for key, value in cfg.items()}
    transform = image_transform_v2(PreprocessCfg(**copy.deepcopy(cfg)), is_train=False)
    return cfg, repr(transform)


def _remote_checkpoint(location: Location) -> tuple[str, str]:
    """(local copy, SHA-256) of a checkpoint given as a URL."""
    if url_suffix(location.url) not in CHECKPOINT_SUFFIXES:
        raise UserError(f"CLIP checkpoint {location} is not a .safetensors, .bin, .pt or .pth file; pass the URL of one of those.")
    resolved = resolve_weights(location)
    return str(resolved.path), resolved.sha256


def resolve_clip(
    clip_model: str = "ViT-L-14",
    clip_pretrained: str | Location = "openai",
    model_dir: str | os.PathLike | None = None,
) -> ClipWeights:
    """Find the model config and checkpoint and fingerprint them; raises UserError with a remedy.

    `clip_pretrained` is a tag, a local path, or the Location of a checkpoint URL (the plan's, carrying the
    run's storage options; a URL string is reached with the environment's credentials and those written
    into it). Offline for tags and paths; a checkpoint URL is downloaded only when this machine holds no
    verified copy of that version of the object.
    """
    import open_clip

    if model_dir is None:
        from tasks.io.locations import default_model_dir

        model_dir = default_model_dir()
    model_name, config_path, config = _model_name_and_config(str(clip_model))
    location: Location | None = None
    if isinstance(clip_pretrained, Location) or is_remote(str(clip_pretrained)):
        location = clip_pretrained if isinstance(clip_pretrained, Location) else Location(*resolve_url_credentials(clip_pretrained))
        checkpoint, fingerprint = _remote_checkpoint(location)
        tag = None
    else:
        checkpoint_path, tag = checkpoint_for_tag(model_name, str(clip_pretrained), model_dir)
        checkpoint, fingerprint = str(checkpoint_path), weights_fingerprint(checkpoint_path)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, tag) if tag else {}
    config = copy.deepcopy(config)
    quick_gelu = bool(config.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    if quick_gelu:
        config["quick_gelu"] = True
    image_size = _to_2tuple(config["vision_cfg"].get("image_size", 224))
    preprocess_cfg, transform_repr = _preprocess_description(image_size, tag_cfg)
    return ClipWeights(
        model_name=model_name,
        config_path=str(config_path) if config_path else None,
        checkpoint_path=checkpoint,
        pretrained_tag=tag,
        weights_fingerprint=fingerprint,
        embedding_dim=int(config["embed_dim"]),
        image_size=image_size,
        quick_gelu=quick_gelu,
        model_config=_canonical_json(config),
        preprocess=_canonical_json({"cfg": preprocess_cfg, "transform": transform_repr}),
        checkpoint_location=location,
    )


def clip_identity(weights: ClipWeights, decode_identity: str) -> str:
    """The embedding identity: `{model_name}-{32 hex}` over model config, weights, preprocessing and decoding.

    Computed without building the model. Device and precision are not part of it: an entry written on a
    GPU under fp16 autocast serves a CPU run and vice versa (they agree to a cosine of about 0.9999).
    """
    digest = hashlib.sha256(
        _canonical_json(
            {
                "version": IDENTITY_VERSION,
                "model_name": weights.model_name,
                "model_config": weights.model_config,
                "weights_sha256": weights.weights_fingerprint,
                "preprocess": weights.preprocess,
                "decode": decode_identity,
            }
        ).encode()
    ).hexdigest()[:32]
    return f"{safe_name(weights.model_name)}-{digest}"


def identity_record(weights: ClipWeights, decode_identity: str) -> dict[str, str]:
    """What an identity covers, in readable form, for the store's file metadata."""
    # Where the weights came from is not what they are (and storage options may hold credentials).
    record = {item.name: getattr(weights, item.name) for item in fields(weights) if item.name not in _NOT_IDENTITY_FIELDS}
    record["image_size"] = list(weights.image_size)
    record["decode"] = decode_identity
    return record
