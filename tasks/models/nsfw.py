"""LAION's CLIP-based NSFW detector as a torch module.

The AutoKeras model is not a plain MLP: a few embedding coordinates are *categorical*. Keras formats
each such float32 as "%f" (six decimals), looks the string up in a vocabulary learned at training
time and feeds the vocabulary index, not the value, into the normalisation. This module computes
exactly that function (see the weight format in the README) from a safetensors file.

Speed: the normalisation is folded into the first dense layer, and the categorical override is
applied as a rank-C correction to that layer's output, so a batch costs one pass over the
embeddings plus the four matrix products of a plain MLP.
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from tasks.errors import UserError
from tasks.models.weights_present import refuse_missing_head

# Which CLIP image tower each head was trained on, by embedding dimension (for error messages).
CLIP_MODEL_FOR_DIM = {768: "ViT-L-14", 512: "ViT-B-32"}

NON_FINITE_REASON = "embedding has non-finite values (NaN or inf); not scored"
OUT_OF_RANGE_REASON = "embedding values are too large for float32 arithmetic; not scored"

_INT64_MAX = torch.iinfo(torch.int64).max


def _is_keras_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("saved_model.pb") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file; UserError when the file is something else."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if head[:2] == b"PK":
            if _is_keras_zip(path):
                raise UserError(
                    f"{path} is LAION's Keras zip, not a safetensors NSFW head; convert it with "
                    f"`nsfw-curator models convert-laion {path} OUT.safetensors`."
                )
            raise UserError(
                f"{path} is a zip archive (a pickled PyTorch checkpoint?), not a safetensors NSFW head; "
                f"only safetensors heads are loaded."
            )
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 2 <= size <= 100_000_000:
            raise UserError(f"{path} is not a safetensors file; pass an NSFW head in safetensors format.")
        try:
            return json.loads(fh.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path} is not a safetensors file; pass an NSFW head in safetensors format.") from None


@dataclass(frozen=True)
class HeadScores:
    """Scores of a batch: float32 `nsfw_score` (NaN where not scored) and the reason for each such row."""

    nsfw_score: np.ndarray
    unscored: dict[int, str] = field(default_factory=dict)


class NSFWHead(torch.nn.Module):
    """The LAION NSFW detector. `forward` maps embeddings [N, D] to scores [N] in [0, 1]."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        super().__init__()
        self.metadata = dict(metadata or {})
        mean = tensors["norm.mean"].float()
        std = torch.clamp(torch.sqrt(tensors["norm.variance"].float()), min=float(tensors["norm.epsilon"].reshape(-1)[0]))
        self.embedding_dim = int(mean.numel())

        n_layers = 0
        while f"dense.{n_layers}.weight" in tensors:
            n_layers += 1
        if n_layers == 0:
            raise KeyError("dense.0.weight")
        weights = [tensors[f"dense.{i}.weight"].float() for i in range(n_layers)]
        biases = [tensors[f"dense.{i}.bias"].float() for i in range(n_layers)]
        assert weights[0].shape[1] == self.embedding_dim, "first dense layer does not match the normalisation size"
        self.layer_sizes = [self.embedding_dim] + [int(w.shape[0]) for w in weights]

        # Fold (h - mean) / std into the first layer: W' = W / std, b' = b - W' @ mean.
        first_weight = weights[0] / std
        first_bias = biases[0] - first_weight @ mean
        self.layers = torch.nn.ModuleList()
        for i, (w, b) in enumerate(zip([first_weight] + weights[1:], [first_bias] + biases[1:])):
            layer = torch.nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            layer.requires_grad_(False)
            self.layers.append(layer)

        columns = tensors.get("categorical.columns", torch.zeros(0, dtype=torch.int64)).to(torch.int64)
        self.register_buffer("categorical_columns", columns)
        keys = [tensors[f"categorical.{int(c)}.keys_micro"].to(torch.int64) for c in columns]
        values = [tensors[f"categorical.{int(c)}.values"].to(torch.int64) for c in columns]
        defaults = [tensors[f"categorical.{int(c)}.default"].reshape(-1)[0].to(torch.int64) for c in columns]
        vocab_size = max([k.numel() for k in keys], default=1)
        # One padded [C, V] table searched for all columns at once; padding sorts last and never matches.
        padded_keys = torch.full((len(keys), vocab_size), _INT64_MAX, dtype=torch.int64)
        padded_values = torch.zeros((len(keys), vocab_size), dtype=torch.int64)
        for i, (k, v) in enumerate(zip(keys, values)):
            if k.numel() > 1 and not bool((k[1:] > k[:-1]).all()):
                order = torch.argsort(k)
                k, v = k[order], v[order]
            padded_keys[i, : k.numel()] = k
            padded_values[i, : v.numel()] = v
        self.register_buffer("vocab_keys", padded_keys)
        self.register_buffer("vocab_values", padded_values.to(torch.float32))
        self.register_buffer("vocab_defaults", torch.stack(defaults).to(torch.float32) if defaults else torch.zeros(0))
        # Columns of the folded first layer that see categorical inputs: [out, C].
        self.register_buffer("categorical_weight", first_weight[:, columns].contiguous())

    @property
    def expected_clip_model(self) -> str:
        return CLIP_MODEL_FOR_DIM.get(self.embedding_dim, f"a {self.embedding_dim}-d CLIP model")

    def _categorical_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Vocabulary index minus raw value, for each categorical column: [N, C]."""
        raw = x[:, self.categorical_columns]  # [N, C]
        finite = torch.isfinite(raw)
        # "%f" then lookup == rint(x * 1e6) looked up among integer keys; float64 keeps it exact.
        micro = torch.round(torch.where(finite, raw, 0).double() * 1e6).clamp(-(2**62), 2**62).to(torch.int64)
        micro = micro.T.contiguous()  # [C, N]
        position = torch.searchsorted(self.vocab_keys, micro).clamp_(max=self.vocab_keys.shape[1] - 1)
        found = (torch.gather(self.vocab_keys, 1, position) == micro) & finite.T
        index = torch.where(found, torch.gather(self.vocab_values, 1, position), self.vocab_defaults[:, None])
        return index.T - torch.where(finite, raw, 0)

    def _scores_and_validity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.layers[0](x)
        # A NaN or inf anywhere in a row makes every first-layer output non-finite (inf * 0 is NaN), so
        # checking [N, 64] outputs finds bad rows at a fraction of the cost of checking [N, D] inputs.
        valid = torch.isfinite(h).all(dim=1)
        if self.categorical_columns.numel():
            h = h + self._categorical_delta(x) @ self.categorical_weight.T
        for layer in self.layers[1:]:
            h = layer(torch.relu(h))
        return torch.sigmoid(h[:, 0]), valid

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores [N] of embeddings [N, D]; rows with non-finite values give unspecified scores."""
        return self._scores_and_validity(embeddings.float())[0]

    def check_dimension(self, embedding_dim: int, source: str = "the embeddings") -> None:
        if embedding_dim != self.embedding_dim:
            got = CLIP_MODEL_FOR_DIM.get(embedding_dim)
            got_text = f" (as from {got})" if got else ""
            raise UserError(
                f"{source} have dimension {embedding_dim}{got_text}, but the NSFW head expects "
                f"{self.embedding_dim}-d embeddings from CLIP {self.expected_clip_model}; "
                f"use the head made for your CLIP model or embed with {self.expected_clip_model}."
            )

    @torch.inference_mode()
    def score(
        self,
        embeddings: np.ndarray | torch.Tensor,
        batch_size: int = 32,
        device: torch.device | str | None = None,
    ) -> HeadScores:
        """Score embeddings [N, D] (numpy or torch, float16/32/64) in batches of `batch_size`.

        Rows with a NaN or infinite value get a NaN score and a reason in `unscored`.
        """
        tensor = embeddings if isinstance(embeddings, torch.Tensor) else torch.from_numpy(np.asarray(embeddings))
        if tensor.ndim != 2:
            raise UserError(f"embeddings must be a 2-D array [N, D], got shape {tuple(tensor.shape)}.")
        if not (tensor.is_floating_point()):
            raise UserError(f"embeddings must be floating point, got {tensor.dtype}.")
        self.check_dimension(int(tensor.shape[1]))
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}.")
        device = torch.device(device) if device is not None else next(self.parameters()).device
        if next(self.parameters()).device != device:
            self.to(device)
        scores = torch.empty(tensor.shape[0], dtype=torch.float32)
        valid_rows = torch.empty(tensor.shape[0], dtype=torch.bool)
        for start in range(0, tensor.shape[0], batch_size):
            chunk = tensor[start : start + batch_size].to(device, non_blocking=True).float()
            chunk_scores, valid = self._scores_and_validity(chunk)
            scores[start : start + chunk.shape[0]] = torch.where(valid, chunk_scores, torch.nan).cpu()
            valid_rows[start : start + chunk.shape[0]] = valid.cpu()
        unscored: dict[int, str] = {}
        for row in torch.nonzero(~valid_rows).flatten().tolist():
            finite = bool(torch.isfinite(tensor[row]).all())
            unscored[row] = OUT_OF_RANGE_REASON if finite else NON_FINITE_REASON
        return HeadScores(scores.numpy(), unscored)


def load_nsfw_head(path: str | Path, device: torch.device | str = "cpu") -> NSFWHead:
    """Load a head from a safetensors file (never pickle). Raises UserError with a remedy on bad files."""
    path = Path(path)
    refuse_missing_head(str(path))
    header = _read_safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    try:
        tensors = load_file(str(path))
        head = NSFWHead(tensors, metadata)
    except KeyError as missing:
        raise UserError(
            f"{path} is a safetensors file but not an NSFW head: tensor {missing.args[0]!r} is missing; "
            f"convert LAION's Keras zip with `nsfw-curator models convert-laion`."
        ) from None
    return head.to(device).eval()
