"""Signal heads on CLIP image embeddings, loaded only from the safetensors format of tasks/signals/convert.py.

- `AestheticHead`: the aesthetic predictors (improved-aesthetic-predictor's MLP, LAION's linear v1). Their
  layers have no activation, so the chain collapses at load into one affine map, computed in float64:
  score(x) = (x / |x|) @ weight + bias (about 1 to 10). `weight` [D] and `bias` are exposed so a caller can
  fuse the head into one matrix product with others.
- `PromptDetector`: Q16's inappropriate-content prompts, clip-retrieval's violence prompts: score(x) =
  softmax(scale * cos(x, class_vectors))[positive_class], in [0, 1]; `class_vectors` [K, D] are unit rows,
  and `scores_from_cosines` gives the same score from cosines a caller computed itself.

Scores are float32 [N], computed in float64; a row with non-finite values or of zero norm scores NaN.
Everything in the file is checked (format, kind, tensor names, shapes, float32, finite values, settings);
any mistake is one sentence (UserError) naming the file and the remedy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from tasks.errors import UserError
from tasks.signals.convert import (
    AESTHETIC_KIND,
    CLASS_VECTORS_TENSOR,
    PROMPTS_KIND,
    SIGNAL_FORMAT,
    SIGNAL_KINDS,
    linear_tensor_names,
)

CONVERT_COMMAND = "nsfw-curator models convert"
# First bytes of the published (unconverted) files: a zip (torch), a pickle, a .npy array.
_PUBLISHED_MAGICS = (b"PK\x03\x04", b"\x80", b"\x93NUMPY")


@dataclass(frozen=True)
class AestheticHead:
    """An aesthetic predictor as one affine map on unit embeddings: float64 `weight` [D] and `bias`."""

    path: Path
    weight: np.ndarray = field(repr=False)
    bias: float
    metadata: Mapping[str, str] = field(repr=False)

    @property
    def embedding_dim(self) -> int:
        return int(self.weight.shape[0])

    def check_dimension(self, dim: int) -> None:
        """UserError when embeddings of width `dim` are not what this head was trained on."""
        _refuse_other_dimension(self.path, self.embedding_dim, dim)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Aesthetic scores float32 [N] of embeddings [N, D] (normalised here, as the published code does)."""
        unit = _unit_rows(_checked_matrix(self.path, embeddings, self.embedding_dim))
        return (unit @ self.weight + self.bias).astype(np.float32)


@dataclass(frozen=True)
class PromptDetector:
    """A zero-shot detector: unit `class_vectors` float32 [K, D], softmax `scale`, the `positive_class` scored."""

    path: Path
    class_vectors: np.ndarray = field(repr=False)
    scale: float
    positive_class: int
    metadata: Mapping[str, str] = field(repr=False)
    # The unit rows in float64, so `score` does not round the vectors to float32 first.
    _class_vectors64: np.ndarray = field(repr=False, compare=False)

    @property
    def embedding_dim(self) -> int:
        return int(self.class_vectors.shape[1])

    @property
    def class_count(self) -> int:
        return int(self.class_vectors.shape[0])

    def check_dimension(self, dim: int) -> None:
        """UserError when embeddings of width `dim` are not what these prompts were made for."""
        _refuse_other_dimension(self.path, self.embedding_dim, dim)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """The positive class's probability float32 [N] for embeddings [N, D]."""
        unit = _unit_rows(_checked_matrix(self.path, embeddings, self.embedding_dim))
        return self.scores_from_cosines(unit @ self._class_vectors64.T)

    def scores_from_cosines(self, cosines: np.ndarray) -> np.ndarray:
        """The same score from cosines [N, K] of unit embeddings with `class_vectors` (a stable softmax, in float64)."""
        cosines = np.asarray(cosines)
        if cosines.ndim != 2 or cosines.shape[1] != self.class_count:
            shape = list(cosines.shape)
            raise UserError(f"{self.path} scores cosines [N, {self.class_count}], not an array of shape {shape}; pass one cosine per class vector.")
        logits = self.scale * cosines.astype(np.float64, copy=False)
        with np.errstate(invalid="ignore"):
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            return (shifted[:, self.positive_class] / shifted.sum(axis=1)).astype(np.float32)


SignalHead = AestheticHead | PromptDetector


def load_signal_head(path: str | Path, kind: str | None = None) -> SignalHead:
    """The head a converted safetensors file holds, by its metadata kind; `kind` (when given) must match."""
    path = Path(path)
    if kind is not None and kind not in SIGNAL_KINDS:
        raise UserError(f"{kind} is not a signal kind; use one of {', '.join(SIGNAL_KINDS)}.")
    tensors, metadata = _read_signal_file(path)
    found_kind = metadata.get("kind")
    if kind is not None and found_kind != kind:
        raise UserError(f"{path} holds {found_kind} signal weights, not {kind}; pass a {kind} file made by `{CONVERT_COMMAND}`.")
    if found_kind == AESTHETIC_KIND:
        return _aesthetic_head(path, tensors, metadata)
    return _prompt_detector(path, tensors, metadata)


def _read_signal_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The file's float32 tensors and metadata, once its format and kind are ours."""
    if not path.is_file():
        raise UserError(f"signal weights not found at {path}; convert the published file with `{CONVERT_COMMAND} SOURCE {path}`.")
    with path.open("rb") as handle:
        first_bytes = handle.read(8)
    # A safetensors file starts with its header's length (8 bytes, little-endian), which may begin with 0x80 like a
    # pickle: a published file is told apart only when the bytes after that length are not a JSON header.
    if first_bytes.startswith(_PUBLISHED_MAGICS) and not _is_safetensors(path):
        raise UserError(
            f"{path} is a published weights file, not converted signal weights; "
            f"convert it with `{CONVERT_COMMAND} {path} OUT.safetensors` and pass OUT.safetensors."
        )
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            _refuse_foreign_metadata(path, metadata)
            dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
            not_float32 = sorted(name for name, dtype in dtypes.items() if dtype != "F32")
            if not_float32:
                raise _damaged(path, f"holds {not_float32[0]} as {dtypes[not_float32[0]]}, not F32")
            tensors = {name: handle.get_tensor(name) for name in dtypes}
    except (SafetensorError, OSError, ValueError):
        raise _damaged(path, "is not a readable safetensors file") from None
    non_finite = sorted(name for name, values in tensors.items() if not np.all(np.isfinite(values)))
    if non_finite:
        raise _damaged(path, f"has NaN or infinite values in {non_finite[0]}")
    return tensors, metadata


def _is_safetensors(path: Path) -> bool:
    """Whether the file opens as safetensors (its header parses)."""
    try:
        with safe_open(str(path), framework="numpy"):
            return True
    except (SafetensorError, OSError, ValueError):
        return False


def _damaged(path: Path, problem: str) -> UserError:
    return UserError(f"{path} {problem}; convert the published file again with `{CONVERT_COMMAND}`.")


def _refuse_foreign_metadata(path: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != SIGNAL_FORMAT:
        raise _damaged(path, f"is not in the {SIGNAL_FORMAT} format (format {metadata.get('format')!r})")
    if metadata.get("kind") not in SIGNAL_KINDS:
        raise _damaged(path, f"is of signal kind {metadata.get('kind')!r}, not one of {', '.join(SIGNAL_KINDS)}")


def _aesthetic_head(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> AestheticHead:
    layer_count = len(tensors) // 2
    expected_names = {name for index in range(layer_count) for name in linear_tensor_names(index)}
    if layer_count == 0 or set(tensors) != expected_names:
        raise _damaged(path, f"does not hold the aesthetic tensors linear.0..{max(layer_count - 1, 0)}.weight/.bias")
    layers = [tuple(tensors[name] for name in linear_tensor_names(index)) for index in range(layer_count)]
    in_width = layers[0][0].shape[1] if layers[0][0].ndim == 2 else 0
    for index, (weight, bias) in enumerate(layers):
        out_width = 1 if index == layer_count - 1 else (weight.shape[0] if weight.ndim == 2 else 0)
        if in_width < 1 or weight.shape != (out_width, in_width) or bias.shape != (out_width,):
            shapes = f"{list(weight.shape)} and {list(bias.shape)}"
            raise _damaged(path, f"has linear.{index} of shapes {shapes}, which do not chain from D inputs to 1 output")
        in_width = out_width
    weight64, bias64 = _collapsed_affine(layers)
    if not (np.all(np.isfinite(weight64)) and math.isfinite(bias64)):
        raise UserError(f"{path} has layers whose product overflows float64; convert an undamaged copy of the published file.")
    weight64.flags.writeable = False
    return AestheticHead(path=path, weight=weight64, bias=bias64, metadata=metadata)


def _collapsed_affine(layers: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, float]:
    """The chain W_L(...(W_1 x + b_1)...) + b_L as w @ x + c in float64, from the last layer back (vector products only)."""
    last_weight, last_bias = layers[-1]
    row = last_weight.astype(np.float64)  # [1, width]: the map from the current layer's input to the score
    bias = float(last_bias[0])
    for weight, layer_bias in reversed(layers[:-1]):
        bias += float((row @ layer_bias.astype(np.float64))[0])
        row = row @ weight.astype(np.float64)
    return row[0], bias


def _prompt_detector(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> PromptDetector:
    vectors = tensors.get(CLASS_VECTORS_TENSOR)
    if set(tensors) != {CLASS_VECTORS_TENSOR} or vectors.ndim != 2 or vectors.shape[0] < 2 or vectors.shape[1] < 1:
        raise _damaged(path, f"does not hold one {CLASS_VECTORS_TENSOR} tensor [K, D] with K >= 2")
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise _damaged(path, "has a class vector of zeros")
    scale = _positive_scale(path, metadata.get("scale"))
    positive_class = _class_index(path, metadata.get("positive_class"), vectors.shape[0])
    unit64 = vectors.astype(np.float64) / norms
    unit32 = unit64.astype(np.float32)
    unit64.flags.writeable = False
    unit32.flags.writeable = False
    return PromptDetector(
        path=path, class_vectors=unit32, scale=scale, positive_class=positive_class, metadata=metadata, _class_vectors64=unit64
    )


def _positive_scale(path: Path, text: str | None) -> float:
    try:
        scale = float(text) if text is not None else math.nan
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"{path} has scale {text!r}, not a positive number; convert it again with `{CONVERT_COMMAND} --scale S`.")
    return scale


def _class_index(path: Path, text: str | None, class_count: int) -> int:
    if text is None or not text.isdecimal() or not 0 <= int(text) < class_count:
        raise UserError(
            f"{path} has positive_class {text!r}, not a class index below {class_count}; "
            f"convert it again with `{CONVERT_COMMAND} --positive-class K`."
        )
    return int(text)


def _checked_matrix(path: Path, values: np.ndarray, width: int) -> np.ndarray:
    """`values` as float64 [N, width]; UserError naming the head when its width differs."""
    matrix = np.asarray(values)
    if matrix.ndim != 2:
        shape = list(matrix.shape)
        raise UserError(f"{path} scores a matrix [N, {width}], not an array of shape {shape}; pass the embeddings as one row each.")
    _refuse_other_dimension(path, width, matrix.shape[1])
    return matrix.astype(np.float64, copy=False)


def _refuse_other_dimension(path: Path, expected: int, dim: int) -> None:
    if dim != expected:
        raise UserError(
            f"{path} is for {expected}-d CLIP embeddings, not {dim}-d; pass signal weights converted for the CLIP model that made the embeddings."
        )


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; a row of zero norm or with non-finite values becomes NaN."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        unit = matrix / norms
    unit[~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)] = np.nan
    return unit
