"""Every configured signal of a batch of stored embeddings, and the policy's verdict on each row.

`SignalScorer(plan, embedding_dim)` prepares, once per process and plan, one float32 matrix holding every prompt
detector's class vectors and every concept's text features side by side, and one float64 matrix of the
aesthetic heads' collapsed affine maps (their layers have no activation, so an MLP is one affine map; float64
keeps it within 1e-6 of the layer-by-layer float32 network). A batch then costs the NSFW head plus two matrix
products, however many signals and concepts the run has (benchmarks/bench_signals.py).

Every signal sees L2-normalised embeddings, as the published aesthetic, Q16 and clip-retrieval code feed them (the
store's are unit length within its tolerance): since each is linear in the embedding, its result is divided by the
embedding's norm rather than the [N, D] matrix normalised first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from tasks.signals.concepts import score_concepts
from tasks.signals.heads import AestheticHead, PromptDetector
from tasks.signals.loaded import signal_head, text_features
from tasks.signals.plan import SignalPlan
from tasks.signals.schema import Condition, Policy


@dataclass(frozen=True)
class SignalValues:
    """A batch's signal scores (float32 [N] per signal name) and matched concepts (per concept group)."""

    scores: dict[str, np.ndarray]
    concepts: dict[str, list[str | None]]


class SignalScorer:
    """The plan's extra signals (not `nsfw`, which the NSFW head scores) over embeddings [N, D]."""

    def __init__(self, plan: SignalPlan, embedding_dim: int) -> None:
        self.plan = plan
        self.embedding_dim = embedding_dim
        cosine_blocks: list[np.ndarray] = []
        self._prompts: list[tuple[str, PromptDetector, slice]] = []
        self._concepts: list[tuple[str, object, slice]] = []
        aesthetic_weights: list[np.ndarray] = []
        aesthetic_biases: list[float] = []
        self._aesthetic: list[str] = []
        offset = 0
        for signal in plan.signals:
            if signal.kind == "concepts":
                block = text_features(signal, embedding_dim)
                self._concepts.append((signal.name, signal.groups, slice(offset, offset + block.shape[0])))
            else:
                head = signal_head(signal)
                if isinstance(head, AestheticHead):
                    aesthetic_weights.append(head.weight)
                    aesthetic_biases.append(head.bias)
                    self._aesthetic.append(signal.name)
                    continue
                block = head.class_vectors
                self._prompts.append((signal.name, head, slice(offset, offset + block.shape[0])))
            cosine_blocks.append(np.asarray(block, dtype=np.float32))
            offset += block.shape[0]
        self._cosine_matrix = np.ascontiguousarray(np.concatenate(cosine_blocks).T) if cosine_blocks else None  # [D, K]
        self._aesthetic_matrix = np.stack(aesthetic_weights, axis=1) if aesthetic_weights else None  # float64 [D, A]
        self._aesthetic_bias = np.asarray(aesthetic_biases, dtype=np.float64)

    def score(self, embeddings: np.ndarray) -> SignalValues:
        """Scores of finite embeddings [N, D]; the caller leaves out rows the NSFW head could not score."""
        scores: dict[str, np.ndarray] = {}
        concepts: dict[str, list[str | None]] = {}
        if not self.plan.signals:
            return SignalValues(scores, concepts)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        # Norms, not normalised copies: every signal is linear in the embedding, so dividing its [N, K] result
        # by the norms is the same as scoring unit rows, without writing a second [N, D] matrix.
        norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64))
        # A zero (or overflowing) embedding has no direction: every signal of it is NaN, i.e. not scored.
        inverse = np.where((norms > 0) & np.isfinite(norms), 1.0 / np.where(norms > 0, norms, 1.0), np.nan)
        if self._aesthetic_matrix is not None:
            for column, name in enumerate(self._aesthetic):
                # float64 accumulation (einsum casts in small buffers): within 1e-6 of the float64 layer-by-layer network.
                dot = np.einsum("ij,j->i", embeddings, self._aesthetic_matrix[:, column], dtype=np.float64)
                scores[name] = (dot * inverse + self._aesthetic_bias[column]).astype(np.float32)
        if self._cosine_matrix is not None:
            cosines = embeddings @ self._cosine_matrix
            cosines *= inverse.astype(np.float32)[:, None]
            for name, head, columns in self._prompts:
                scores[name] = head.scores_from_cosines(cosines[:, columns]).astype(np.float32)
            for name, groups, columns in self._concepts:
                for group, (group_score, matched) in score_concepts(cosines[:, columns], groups).items():
                    scores[f"{name}_{group}"] = group_score
                    concepts[f"{name}_{group}"] = matched
        return SignalValues(scores, concepts)


@functools.lru_cache(maxsize=4)
def cached_scorer(plan: SignalPlan, embedding_dim: int) -> SignalScorer:
    """One scorer per process and plan (its matrices are built once and shared read-only by a worker's threads)."""
    return SignalScorer(plan, embedding_dim)


def _holds(test: Condition, scores: dict[str, np.ndarray], concepts: dict[str, list[str | None]], rows: int) -> np.ndarray:
    if test.matched is not None:
        matched = np.fromiter((concept is not None for concept in concepts[test.signal]), dtype=bool, count=rows)
        return matched if test.matched else ~matched
    values = scores[test.signal].astype(np.float64)
    return values >= test.at_least if test.at_least is not None else values < test.below  # NaN: never holds


def filtered_by(policy: Policy, scores: dict[str, np.ndarray], concepts: dict[str, list[str | None]], rows: int) -> list[str | None]:
    """Per row, the label of the first rule that drops it, or None (vectorised over the rows, rule by rule)."""
    verdict = np.full(rows, -1, dtype=np.int64)
    for number, rule in enumerate(policy.rules):
        drops = _holds(rule, scores, concepts, rows)
        for test in rule.when:
            drops &= _holds(test, scores, concepts, rows)
        verdict[(verdict < 0) & drops] = number
    labels = [rule.label for rule in policy.rules]
    return [labels[number] if number >= 0 else None for number in verdict.tolist()]
