"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("NSFW_CURATOR_SHARED", REPO_ROOT.parent / "shared"))
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def best_seconds(fn: Callable[[], object], repeats: int = 5, min_seconds: float = 0.2) -> float:
    """Best wall time of one call over `repeats` rounds, each round looping until `min_seconds` passed."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best
