"""`nsfw-curator serve`: both flows as deployments of this one process on a single GPU host, no work pool.

`prefect.serve` registers `nsfw-filter/nsfw-filter-serve` and `image-dedup/image-dedup-serve` with the
server PREFECT_API_URL names, then runs each of their flow runs (from the UI, the API, a schedule or the
dedup trigger) as a subprocess of this process. Each deployment runs one flow run at a time
(`concurrency_limit=1`; more wait in the AwaitingConcurrencySlot state), and every task on a GPU also
holds that GPU's global concurrency limit (flows/gpu_limits.py). When a filter run completes, the
trigger starts image-dedup on its dataset, store and models, writing what it kept, deduplicated, to
its output_path/dedup (the same trigger as deployments/prefect.yaml, `dedup_after_filter_trigger`).
"""

from __future__ import annotations

import os
from typing import Any

FILTER_DEPLOYMENT = "nsfw-filter-serve"
DEDUP_DEPLOYMENT = "image-dedup-serve"
# The GPU environment of every run (as the work pool's job variables in deployments/prefect.yaml); a value set already wins.
GPU_ENVIRONMENT = {
    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # GPU indices in CUDA_VISIBLE_DEVICES are nvidia-smi's
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",  # less fragmentation across partitions
}


def dedup_after_filter_trigger(filter_deployment: str) -> dict[str, Any]:
    """The event trigger that runs image-dedup after each completed nsfw-filter run of `filter_deployment`.

    Parameters left out of the filter run are absent (hence .get and the flow's defaults); the deduplicated
    copy of what it kept goes to its output_path/dedup.
    """
    return {
        "type": "event",
        "name": "image-dedup after nsfw-filter",
        "description": f"Run image-dedup on the dataset and embedding store of each completed nsfw-filter/{filter_deployment} run.",
        "enabled": True,
        "expect": ["prefect.flow-run.Completed"],
        "match": {"prefect.resource.id": "prefect.flow-run.*"},
        "match_related": [
            {"prefect.resource.role": "flow", "prefect.resource.name": "nsfw-filter"},
            {"prefect.resource.role": "deployment", "prefect.resource.name": filter_deployment},
        ],
        "parameters": {
            "file_paths": "{{ flow_run.parameters.file_paths }}",
            "cache_path": "{{ flow_run.parameters.get('cache_path') }}",
            "model_dir": "{{ flow_run.parameters.get('model_dir') }}",
            "clip_model": "{{ flow_run.parameters.get('clip_model', 'ViT-L-14') }}",
            "clip_pretrained": "{{ flow_run.parameters.get('clip_pretrained', 'openai') }}",
            "output_path": "{{ flow_run.parameters.output_path.rstrip('/') }}/dedup",
            "filter_output_path": "{{ flow_run.parameters.output_path }}",
        },
    }


def serve_flows(limit: int | None = None) -> None:
    """Register both deployments and run their flow runs here until stopped (Ctrl-C or TERM)."""
    for name, value in GPU_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    from prefect import serve
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    from flows.dedup import image_dedup
    from flows.nsfw_filter import nsfw_filter

    # Module entrypoints: a flow run imports the installed package, whatever the working directory.
    filter_deployment = nsfw_filter.to_deployment(
        name=FILTER_DEPLOYMENT,
        concurrency_limit=1,
        description="Score every image of a WebDataset with LAION's CLIP-based NSFW detector on this GPU host and keep the safe ones.",
        tags=["nsfw-curator"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    dedup_deployment = image_dedup.to_deployment(
        name=DEDUP_DEPLOYMENT,
        concurrency_limit=1,
        description=f"Find near-duplicate images from the cached CLIP embeddings; starts by itself after every completed nsfw-filter/{FILTER_DEPLOYMENT} run.",
        tags=["nsfw-curator"],
        triggers=[DeploymentEventTrigger(**dedup_after_filter_trigger(FILTER_DEPLOYMENT))],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    serve(filter_deployment, dedup_deployment, limit=limit)
