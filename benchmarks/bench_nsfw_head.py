"""Throughput of the faithful LAION head against a plain MLP of the same shapes and a per-row loop.

    python benchmarks/bench_nsfw_head.py [--weights PATH] [--threads N]

The plain MLP (`Linear/ReLU x3 -> Linear -> Sigmoid`, normalisation folded like ours) is the cost floor:
it skips the categorical lookups and so gives wrong scores; the ratio shows what faithfulness costs.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _common import SHARED_DIR, best_seconds
from tasks.models.nsfw import load_nsfw_head


def plain_mlp_like(head) -> torch.nn.Sequential:
    modules: list[torch.nn.Module] = []
    for i, layer in enumerate(head.layers):
        modules.append(layer)
        modules.append(torch.nn.ReLU() if i < len(head.layers) - 1 else torch.nn.Sigmoid())
    return torch.nn.Sequential(*modules).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(SHARED_DIR / "models" / "laion_nsfw" / "vit_l_14.safetensors"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    head = load_nsfw_head(args.weights)
    mlp = plain_mlp_like(head)
    rng = np.random.default_rng(0)
    # fp16-rounded unit vectors: the realistic regime (CLIP on GPU emits fp16), with frequent vocabulary hits.
    pool = rng.standard_normal((65536, head.embedding_dim)).astype(np.float32)
    pool = (pool / np.linalg.norm(pool, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)

    print(f"threads={args.threads} embedding_dim={head.embedding_dim}")
    print(f"{'batch':>7} {'head emb/s':>12} {'plain MLP emb/s':>16} {'head/MLP':>9}")
    for batch_size in [32, 256, 1024, 4096, 16384, 65536]:
        batch = torch.from_numpy(pool[:batch_size])
        with torch.inference_mode():
            t_head = best_seconds(lambda: head.score(batch, batch_size=batch_size))
            t_mlp = best_seconds(lambda: mlp(batch))
        print(f"{batch_size:>7} {batch_size / t_head:>12,.0f} {batch_size / t_mlp:>16,.0f} {t_mlp / t_head:>9.2f}")

    rows = pool[:256]

    def per_row_loop() -> None:
        for row in rows:
            head.score(row[None, :], batch_size=1)

    t_loop = best_seconds(per_row_loop, repeats=3)
    t_batched = best_seconds(lambda: head.score(rows, batch_size=256))
    print(f"per-row Python loop: {len(rows) / t_loop:,.0f} emb/s; batched head is {t_loop / t_batched:.0f}x faster on 256 rows")


if __name__ == "__main__":
    main()
