"""A planned signal made ready to score on this machine: its head loaded once per process.

Weights given as a URL are fetched once per machine and verified against the plan's SHA-256
(tasks/models/remote_weights.py); concept text features are read back from the embedding store and validated
(tasks/signals/concepts.py). Nothing here reads a pickle.
"""

from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING

import numpy as np

from tasks.models.remote_weights import is_remote, local_weights
from tasks.signals.heads import AestheticHead, PromptDetector, load_signal_head

if TYPE_CHECKING:
    from tasks.signals.plan import PlannedSignal


@functools.lru_cache(maxsize=16)
def cached_signal_head(path: str, sha256: str = "") -> AestheticHead | PromptDetector:
    """The head in a local safetensors file, loaded once per process and digest (shared read-only by a worker's threads)."""
    return load_signal_head(path)


@functools.lru_cache(maxsize=16)
def _stored_text_features(signal: "PlannedSignal", embedding_dim: int) -> np.ndarray:
    from tasks.signals.concepts import read_text_features

    assert signal.groups is not None
    features = read_text_features(signal.location, signal.sha256, signal.groups.texts, embedding_dim)
    if features is not None and hashlib.sha256(features.tobytes()).hexdigest() != signal.features_sha256:
        features = None  # not the features the run's plan checked: the store was written meanwhile
    if features is None:
        raise RuntimeError(
            f"the text features of signal {signal.name!r} are missing or damaged in the embedding store ({signal.location}); "
            f"run again to compute them"
        )
    return features


def signal_head(signal: "PlannedSignal") -> AestheticHead | PromptDetector:
    """An aesthetic or prompts signal's head, from this machine's verified copy of its weights."""
    url = signal.location.url
    return cached_signal_head(str(local_weights(signal.location, signal.sha256)) if is_remote(url) else url, signal.sha256)


def text_features(signal: "PlannedSignal", embedding_dim: int) -> np.ndarray:
    """A concepts signal's text features [C, D] (float32, unit rows), read from the store once per process."""
    return _stored_text_features(signal, embedding_dim)
