"""Convert published signal weights (aesthetic predictors, Q16 and violence prompts) to one safetensors format.

Sources, recognised by their bytes (not their suffix):

- a PyTorch file (zip, or the legacy pickle format), read ONLY with `torch.load(weights_only=True)`:
  - improved-aesthetic-predictor (`sac+logos+ava1-l14-linearMSE.pth`): a state dict with exactly
    `layers.{0,2,4,6,7}.weight/.bias` of shapes [1024, D], [128, 1024], [64, 128], [16, 64], [1, 16] (an MLP
    D -> 1024 -> 128 -> 64 -> 16 -> 1 with Dropout between and no activation);
  - LAION's aesthetic-predictor (`sa_0_4_vit_l_14_linear.pth`): exactly `weight` [1, D] and `bias` [1];
  - a 2-D tensor of prompt vectors [K, D];
- a prompts pickle (Q16's `prompts.p`: a plain pickle of a numpy array [K, D]), read with an unpickler that
  resolves only numpy's `_reconstruct`, `numpy.ndarray` and `numpy.dtype`, so a pickle naming anything else
  (`os.system`, any class) is refused before it can run;
- a `.npy` array [K, D] (clip-retrieval's `violence_detection_vit_l_14.npy`), read with `allow_pickle=False`.

D is free (768 for ViT-L/14, 512 for ViT-B/32). Values must be finite floats; prompt rows must be non-zero.

Output: a safetensors file (written atomically, never over its source; the same source always gives the
same bytes), tensors all float32 little-endian, metadata all strings:

- kind "aesthetic": `linear.{i}.weight` [out_i, in_i] and `linear.{i}.bias` [out_i] for i = 0..L-1,
  applied in order with NO activation (in_0 = D, in_{i+1} = out_i, out_{L-1} = 1); the score of an
  embedding x is that chain applied to x / |x|.
- kind "prompts": `class_vectors` [K, D] as published (not normalised); metadata `scale` (a decimal,
  default "100") and `positive_class` (a decimal index, default "1"); the score of x is
  softmax(scale * cos(x, class_vectors))[positive_class].
- every file: `kind`, `format` = "nsfw-curator-signal-1", `source` (the source's file name) and
  `source_sha256` (hex SHA-256 of the bytes converted).

Anything else is refused with one sentence naming the file and the remedy (UserError).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tasks.errors import UserError
from tasks.io.atomic import write_bytes_atomic

SIGNAL_FORMAT = "nsfw-curator-signal-1"
AESTHETIC_KIND = "aesthetic"
PROMPTS_KIND = "prompts"
SIGNAL_KINDS = (AESTHETIC_KIND, PROMPTS_KIND)
CLASS_VECTORS_TENSOR = "class_vectors"
DEFAULT_SCALE = 100.0
DEFAULT_POSITIVE_CLASS = 1
# The published files are a few MB; anything far larger is not one of them.
MAX_SOURCE_BYTES = 256 << 20

# The published aesthetic predictors: their state-dict layer prefixes and output widths (the input width D is free).
AESTHETIC_FORMATS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "improved-aesthetic-predictor": (("layers.0.", "layers.2.", "layers.4.", "layers.6.", "layers.7."), (1024, 128, 64, 16, 1)),
    "aesthetic-predictor": (("",), (1,)),
}

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (non-zip) format starts with this pickled magic number.
_LEGACY_TORCH_PREFIX = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
# numpy's array reconstructor, taken from an array so no deprecated `numpy.core` import is needed.
_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_PROMPT_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def linear_tensor_names(index: int) -> tuple[str, str]:
    """The (weight, bias) tensor names of an aesthetic head's layer `index`."""
    return f"linear.{index}.weight", f"linear.{index}.bias"


def convert_signal_weights(
    source: str | Path,
    out: str | Path,
    kind: str | None = None,
    *,
    scale: float | None = None,
    positive_class: int | None = None,
) -> str:
    """Convert one published signal file to our safetensors format at `out`; returns the kind written.

    `kind` (None: from the source) must match what the source holds; `scale` and `positive_class` apply to
    prompts only (defaults 100 and 1, the published scoring).
    """
    source, out = Path(source), Path(out)
    if kind is not None and kind not in SIGNAL_KINDS:
        raise UserError(f"--kind {kind} is not a signal kind; use one of {', '.join(SIGNAL_KINDS)}.")
    data = _read_source(source, out)
    found_kind, tensors = _decode(source, data)
    if kind is not None and kind != found_kind:
        raise UserError(f"{source} holds {found_kind} weights, not {kind}; pass --kind {found_kind} or the {kind} file.")
    metadata = {"kind": found_kind, "format": SIGNAL_FORMAT, "source": source.name, "source_sha256": hashlib.sha256(data).hexdigest()}
    if found_kind == PROMPTS_KIND:
        metadata.update(_prompt_settings(source, tensors[CLASS_VECTORS_TENSOR].shape[0], scale, positive_class))
    elif scale is not None or positive_class is not None:
        raise UserError(f"{source} holds aesthetic weights, which take no --scale or --positive-class; leave those options out.")
    try:
        write_bytes_atomic(str(out), safetensors_bytes(tensors, metadata))
    except OSError as error:
        raise UserError(f"cannot write {out} ({error.strerror or error}); pass a path in a writable directory.") from None
    return found_kind


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file of float32 tensors with a fixed header order (safetensors' own writer varies it run to run)."""
    names = sorted(tensors)
    header: dict[str, dict] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in names:
        array = tensors[name]
        assert array.dtype == np.float32, name
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    payload = b"".join(np.ascontiguousarray(tensors[name], "<f4").tobytes() for name in names)
    return struct.pack("<Q", len(text)) + text + payload


def _read_source(source: Path, out: Path) -> bytes:
    """The source's bytes (read once: they are what is converted and what `source_sha256` names)."""
    if not source.is_file():
        raise UserError(f"{source} does not exist or is not a file; pass the published weights file to convert.")
    if out.is_dir():
        raise UserError(f"{out} is a directory; pass the safetensors file to write, such as {out / 'signal.safetensors'}.")
    if out.exists() and os.path.samefile(source, out):
        raise UserError(f"{out} is the source file itself; pass another path to write the safetensors file to.")
    if source.stat().st_size > MAX_SOURCE_BYTES:
        raise UserError(f"{source} is larger than any published signal weights ({MAX_SOURCE_BYTES >> 20} MiB); pass the published file.")
    return source.read_bytes()


def _decode(source: Path, data: bytes) -> tuple[str, dict[str, np.ndarray]]:
    """(kind, our tensors) from the source's bytes, by what they are."""
    if data.startswith(_NPY_MAGIC):
        return PROMPTS_KIND, _prompt_tensors(source, _load_npy(source, data))
    if data.startswith(_ZIP_MAGIC) or data.startswith(_LEGACY_TORCH_PREFIX):
        loaded = _load_torch(source, data)
        if isinstance(loaded, Mapping):
            return AESTHETIC_KIND, _aesthetic_tensors(source, loaded)
        return PROMPTS_KIND, _prompt_tensors(source, _torch_array(source, "tensor", loaded))
    return PROMPTS_KIND, _prompt_tensors(source, _load_prompts_pickle(source, data))


def _load_npy(source: Path, data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"{source} is not a plain numeric .npy array ({error}); pass the published float array of prompt vectors.") from None


def _load_torch(source: Path, data: bytes) -> object:
    if data.startswith(_ZIP_MAGIC):
        _refuse_non_torch_zip(source, data)
    import torch  # only here: it takes seconds to import, and pickles and .npy files need none of it

    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise UserError(
            f"{source} holds Python objects other than tensors, which are never unpickled; save the model's "
            f"state_dict() (or the tensor) with torch.save and convert that file."
        ) from None
    except Exception as error:  # torch raises RuntimeError, KeyError, EOFError... for a damaged file
        raise UserError(f"{source} is a damaged PyTorch file ({type(error).__name__}); download the published file again.") from None


def _refuse_non_torch_zip(source: Path, data: bytes) -> None:
    """torch.save's zip holds `{archive}/data.pkl`; any other zip is not a PyTorch file."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise UserError(f"{source} is a damaged zip archive; download the published weights file again.") from None
    if not any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
        raise UserError(f"{source} is a zip archive but not a PyTorch file; pass the published .pth, prompts pickle or .npy file.")


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global other than what a numpy array needs."""


class _PromptsUnpickler(pickle.Unpickler):
    """Resolves only what a pickled numpy array needs; any other global is refused before it is called."""

    def find_class(self, module: str, name: str) -> object:
        allowed = _PROMPT_PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return allowed


def _load_prompts_pickle(source: Path, data: bytes) -> np.ndarray:
    try:
        loaded = _PromptsUnpickler(io.BytesIO(data)).load()
    except _ForbiddenGlobal as forbidden:
        raise UserError(
            f"{source} is a pickle that calls {forbidden} rather than holding only a numpy array, so it was never run; "
            f"pass the published prompts pickle, a .npy file or a PyTorch tensor file."
        ) from None
    except Exception:  # any other failure to parse: truncated bytes, not a pickle at all
        raise _not_a_signal_file(source) from None
    if type(loaded) is not np.ndarray:
        raise UserError(f"{source} is a pickle of {type(loaded).__name__}, not of a numpy array; pass the published prompts pickle.")
    return loaded


def _not_a_signal_file(source: Path) -> UserError:
    return UserError(
        f"{source} is neither a PyTorch file, a prompts pickle nor a .npy array; pass one of the published signal weights files."
    )


def _torch_array(source: Path, name: str, value: object) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise UserError(f"{source} holds a {type(value).__name__} where a tensor ({name}) belongs; pass the published weights file.")
    if not value.is_floating_point():
        raise UserError(f"{source} holds {name} as {value.dtype}, not floats; pass the published weights file.")
    return value.detach().to(torch.float64).numpy()  # float64 holds every float dtype exactly (bfloat16 too)


def _aesthetic_tensors(source: Path, state: Mapping[str, object]) -> dict[str, np.ndarray]:
    """The published state dict as our chain of linear layers, checked against both published layouts."""
    keys = set(state)
    matching = [
        (prefixes, widths)
        for prefixes, widths in AESTHETIC_FORMATS.values()
        if keys == {f"{prefix}{part}" for prefix in prefixes for part in ("weight", "bias")}
    ]
    if not matching:
        shown = ", ".join(sorted(map(str, keys))[:6]) + (", ..." if len(keys) > 6 else "")
        raise UserError(
            f"{source} is a state dict with keys {shown or 'none'}, not a published aesthetic predictor "
            f"(layers.0/2/4/6/7 or weight/bias); pass sac+logos+ava1-l14-linearMSE.pth or sa_0_4_vit_l_14_linear.pth."
        )
    prefixes, widths = matching[0]
    tensors: dict[str, np.ndarray] = {}
    in_width: int | None = None
    for index, (prefix, out_width) in enumerate(zip(prefixes, widths)):
        weight = _torch_array(source, f"{prefix}weight", state[f"{prefix}weight"])
        bias = _torch_array(source, f"{prefix}bias", state[f"{prefix}bias"])
        if in_width is None:  # the first layer's input is the embedding, of any width D
            in_width = weight.shape[1] if weight.ndim == 2 and weight.shape[1] > 0 else -1
        if weight.shape != (out_width, in_width) or bias.shape != (out_width,):
            raise UserError(
                f"{source} has {prefix}weight of shape {list(weight.shape)} and {prefix}bias of shape {list(bias.shape)}, "
                f"not [{out_width}, {in_width if in_width > 0 else 'D'}] and [{out_width}]; pass the published file unmodified."
            )
        weight_name, bias_name = linear_tensor_names(index)
        tensors[weight_name] = _finite_float32(source, f"{prefix}weight", weight)
        tensors[bias_name] = _finite_float32(source, f"{prefix}bias", bias)
        in_width = out_width
    return tensors


def _prompt_tensors(source: Path, vectors: np.ndarray) -> dict[str, np.ndarray]:
    if vectors.dtype.kind != "f":
        raise UserError(f"{source} holds an array of {vectors.dtype}, not floats; pass the published prompt vectors.")
    if vectors.ndim != 2 or vectors.shape[0] < 2 or vectors.shape[1] < 1:
        raise UserError(f"{source} holds an array of shape {list(vectors.shape)}, not [K, D] prompt vectors with K >= 2; pass the published prompt vectors.")
    class_vectors = _finite_float32(source, "its prompt vectors", vectors)
    if not np.all(np.linalg.norm(class_vectors.astype(np.float64), axis=1) > 0):
        raise UserError(f"{source} has a prompt vector of zeros, which has no direction; pass the published prompt vectors.")
    return {CLASS_VECTORS_TENSOR: class_vectors}


def _finite_float32(source: Path, name: str, values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        as_float32 = values.astype(np.float32)
    if not np.all(np.isfinite(as_float32)):
        raise UserError(f"{source} has NaN or infinite values in {name} (as float32); pass an undamaged copy of the published file.")
    return as_float32


def _prompt_settings(source: Path, class_count: int, scale: float | None, positive_class: int | None) -> dict[str, str]:
    scale = DEFAULT_SCALE if scale is None else float(scale)
    positive_class = DEFAULT_POSITIVE_CLASS if positive_class is None else positive_class
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"--scale {scale} is not a positive finite number; pass a softmax scale such as 100 (Q16's).")
    if not 0 <= positive_class < class_count:
        raise UserError(f"--positive-class {positive_class} is not a class of {source} (it has {class_count}); pass 0 to {class_count - 1}.")
    return {"scale": format_decimal(scale), "positive_class": str(positive_class)}


def format_decimal(value: float) -> str:
    """A float as the shortest decimal that reads back to it ("100" for 100.0)."""
    return str(int(value)) if value.is_integer() else repr(value)
