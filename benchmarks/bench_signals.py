"""Scoring stored embeddings: the NSFW head alone against every signal together, at batch 4096.

    python benchmarks/bench_signals.py [--rows N] [--batch-size B] [--threads T] [--repeats R]

Both sides score the same random unit embeddings [N, 768] in batches of `--batch-size` with the same torch
threads. "NSFW alone" is the LAION ViT-L/14 head from the shared folder (what a run without signals costs);
"all signals" is the NSFW head, then `SignalScorer` with the improved aesthetic predictor, two prompt detectors
(Q16's and clip-retrieval's violence detector shapes, 2 x 768 each) and 30 zero-shot concepts in two groups, then
the policy (four rules). The signal weights are random values in the published formats, converted with the
product's own `models convert`; the text features are random unit vectors (computing them is once per run).
Goal: all signals >= 0.5x NSFW alone and >= 100,000 embeddings/s on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path
import numpy as np
import torch

from tasks.io.locations import Location
from tasks.models.nsfw import load_nsfw_head
from tasks.signals.concepts import ConceptGroup, ConceptGroups, text_features_fingerprint, write_text_features
from tasks.signals.convert import convert_signal_weights
from tasks.signals.plan import PlannedSignal, SignalPlan
from tasks.signals.schema import Policy
from tasks.signals.scoring import SignalScorer, filtered_by

HEAD = _common.SHARED_DIR / "models" / "laion_nsfw" / "vit_l_14.safetensors"
DIM = 768


def published_files(folder: Path) -> dict[str, Path]:
    """Random-valued files in the published formats: the improved aesthetic .pth, Q16's prompts.p, the violence .npy."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(1024, DIM), (128, 1024), (64, 128), (16, 64), (1, 16)]
    aesthetic = OrderedDict()
    for index, (rows, columns) in zip((0, 2, 4, 6, 7), shapes):
        aesthetic[f"layers.{index}.weight"] = torch.randn(rows, columns, generator=generator) / columns**0.5
        aesthetic[f"layers.{index}.bias"] = torch.randn(rows, generator=generator) * 0.01
    torch.save(aesthetic, folder / "aesthetic.pth")
    rng = np.random.default_rng(0)
    with open(folder / "q16.p", "wb") as handle:
        pickle.dump(rng.standard_normal((2, DIM)).astype(np.float16), handle, protocol=3)
    violence = rng.standard_normal((2, DIM)).astype(np.float32)
    np.save(folder / "violence.npy", violence / np.linalg.norm(violence, axis=1, keepdims=True))
    return {"aesthetic": folder / "aesthetic.pth", "q16": folder / "q16.p", "violence": folder / "violence.npy"}


def all_signals(folder: Path) -> SignalPlan:
    signals = []
    for name, source in published_files(folder).items():
        out = folder / f"{name}.safetensors"
        kind = convert_signal_weights(source, out)
        signals.append(PlannedSignal(name, kind, Location(str(out)), "0" * 64))
    rng = np.random.default_rng(1)
    groups = ConceptGroups(
        (
            ConceptGroup("nsfw", tuple(f"concept {i}" for i in range(24)), tuple([0.2] * 24)),
            ConceptGroup("special", tuple(f"special {i}" for i in range(6)), tuple([0.21] * 6)),
        )
    )
    features = rng.standard_normal((30, DIM)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    fingerprint = text_features_fingerprint("bench", groups.texts)
    store = Location(str(folder / "store"))
    write_text_features(store, features, groups.texts, fingerprint)
    digest = hashlib.sha256(features.tobytes()).hexdigest()
    signals.append(PlannedSignal("concepts", "concepts", store, fingerprint, groups, digest, "concepts.yml"))
    policy = Policy.model_validate(
        {
            "rules": [
                {"signal": "nsfw", "at_least": 0.5},
                {"signal": "aesthetic", "below": 0.0},
                {"signal": "q16", "at_least": 0.5},
                {"name": "minors", "signal": "nsfw", "at_least": 0.1, "when": [{"signal": "concepts_special", "matched": True}]},
            ]
        }
    )
    return SignalPlan(tuple(signals), policy)


def one_pass(score_batch, embeddings: np.ndarray, batch_size: int) -> float:
    """Seconds to score every row once, batch by batch."""
    start = time.perf_counter()
    for offset in range(0, len(embeddings), batch_size):
        score_batch(embeddings[offset : offset + batch_size])
    return time.perf_counter() - start


def interleaved_rates(sides: dict, embeddings: np.ndarray, batch_size: int, repeats: int) -> dict[str, float]:
    """Best embeddings/s of each side over `repeats` rounds, the sides alternating within each round (the machine is
    shared and noisy: both sides see the same load), after one warm-up batch each."""
    for score_batch in sides.values():
        score_batch(embeddings[:batch_size])
    best = {name: float("inf") for name in sides}
    for _ in range(repeats):
        for name, score_batch in sides.items():
            best[name] = min(best[name], one_pass(score_batch, embeddings, batch_size))
            print(f"  {name}: {len(embeddings) / best[name]:,.0f} embeddings/s so far", flush=True)
    return {name: len(embeddings) / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(2)
    embeddings = rng.standard_normal((args.rows, DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    head = load_nsfw_head(str(HEAD))
    with tempfile.TemporaryDirectory() as folder:
        plan = all_signals(Path(folder))
        scorer = SignalScorer(plan, DIM)

        def nsfw_alone(batch: np.ndarray) -> None:
            head.score(batch, batch_size=len(batch))

        def everything(batch: np.ndarray) -> None:
            nsfw_score = head.score(batch, batch_size=len(batch)).nsfw_score
            values = scorer.score(batch)
            filtered_by(plan.policy, {"nsfw": nsfw_score, **values.scores}, values.concepts, len(batch))

        rates = interleaved_rates({"NSFW alone": nsfw_alone, "all signals": everything}, embeddings, args.batch_size, args.repeats)
        alone, together = rates["NSFW alone"], rates["all signals"]
        print(f"NSFW alone:   {alone:12,.0f} embeddings/s", flush=True)
        print(f"all signals:  {together:12,.0f} embeddings/s (NSFW, aesthetic, 2 prompt detectors, 30 concepts, 4 rules)", flush=True)
        print(f"ratio all/NSFW alone: {together / alone:.2f}x (goal >= 0.5x); all signals goal >= 100,000/s on 2 cores", flush=True)


if __name__ == "__main__":
    main()
