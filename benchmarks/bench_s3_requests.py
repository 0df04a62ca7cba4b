"""S3 requests per partition of the nsfw-filter flow as the number of partitions grows, counted at the server.

    python benchmarks/bench_s3_requests.py [--partitions 20 200 2000]

A moto S3 server on loopback, a counting proxy in front of it (every request the flow makes passes
through it), one-shard partitions of 2 small images, a tiny 2-layer CLIP and the real LAION ViT-L/14 head.
For each size: a cold run (nothing cached) then a warm re-run, each printed as requests per partition
(total / N) and by kind. The per-partition cost is constant when each step's marginal requests per
partition, (R(N1) - R(N0)) / (N1 - N0), is the same at every step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from _common import SHARED_DIR, start_moto

HEAD = SHARED_DIR / "models" / "laion_nsfw" / "vit_l_14.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", type=int, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--by-kind", action="store_true", help="also print each kind of request per partition")
    args = parser.parse_args()
    sizes = sorted(args.partitions)

    moto, moto_env = start_moto()
    endpoint = moto_env.pop("AWS_ENDPOINT_URL_S3")
    os.environ.update(moto_env, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
    import s3fs
    from prefect.testing.utilities import prefect_test_harness

    from tests.support.s3_requests import count_filter_requests, request_kinds
    from tests.support.tiny_clip import make_tiny_clip

    root = Path(tempfile.mkdtemp(prefix="bench-s3-requests-"))
    try:
        config_path, checkpoint_path = make_tiny_clip(root / "clip", embed_dim=768)
        parameters = {"clip_model": str(config_path), "clip_pretrained": str(checkpoint_path), "nsfw_weights": str(HEAD),
                      "model_dir": str(root / "models")}
        with prefect_test_harness(server_startup_timeout=120):
            from flows.nsfw_filter import nsfw_filter

            totals: dict[str, list[tuple[int, int]]] = {"cold": [], "warm": []}
            print(f"{'partitions':>10} {'run':>5} {'requests':>9} {'per partition':>14}")
            for n in sizes:
                bucket = f"bench-{uuid.uuid4().hex[:10]}"
                s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(bucket)
                cold, warm = count_filter_requests(nsfw_filter, endpoint, bucket, n, parameters)
                for name, requests in (("cold", cold), ("warm", warm)):
                    totals[name].append((n, len(requests)))
                    print(f"{n:>10} {name:>5} {len(requests):>9} {len(requests) / n:>14.2f}", flush=True)
                    if args.by_kind:
                        for (method, path), count in sorted(request_kinds(requests, bucket).items(), key=lambda item: -item[1]):
                            print(f"{'':>17} {count / n:>8.2f}  {method} {path}")
        for name, rows in totals.items():
            marginals = [(b - a) / (n1 - n0) for (n0, a), (n1, b) in zip(rows, rows[1:])]
            steps = ", ".join(f"{n0}->{n1}: {m:.2f}" for ((n0, _), (n1, _)), m in zip(zip(rows, rows[1:]), marginals))
            print(f"{name}: marginal requests per partition {steps}" + (f" (last / first {marginals[-1] / marginals[0]:.3f}x)" if len(marginals) > 1 else ""))
    finally:
        moto.terminate()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
