"""Everything a filter run decides before any work starts, checked up front.

`plan_filter_run` lists and partitions the shards, checks that the output is apart from them, finds the
CLIP weights and the NSFW head offline, checks that they fit each other, fixes the identities that name
the run's embeddings and outputs, and finally claims the output for these inputs (tasks/ownership.py).
Every mistake a user can make here fails in seconds with one sentence, before a GPU is touched.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

from tasks.clip_resolve import ClipWeights, clip_identity, resolve_clip, weights_fingerprint
from tasks.locations import default_cache_path, default_model_dir, nsfw_weights_path
from tasks.nsfw import NSFWHead, load_nsfw_head
from tasks.ownership import claim_output, input_owner, refuse_overlap
from tasks.partition import Partition, list_shards, partition_shards
from tasks.read import DecodeOptions
from tasks.store import EmbeddingStore


FILTER_FLOW = "nsfw-filter"


@dataclass(frozen=True)
class FilterRun:
    """The resolved, validated plan of one run; small and picklable, handed to every task."""

    partitions: tuple[Partition, ...]
    clip_weights: ClipWeights
    decode: DecodeOptions
    embedding_identity: str
    store: EmbeddingStore
    nsfw_weights: str
    head_fingerprint: str
    output_path: str
    score_threshold: float
    images_per_tar: int
    task_batch_size: int
    model_inference_batch_size: int
    num_gpus_per_worker: float
    verbose: bool = False
    storage_options: dict = field(default_factory=dict, hash=False, compare=False, repr=False)

    def models(self) -> dict[str, str]:
        """Model identities for the summary (names and fingerprints, never local secrets)."""
        return {
            "clip_model": self.clip_weights.model_name,
            "clip_pretrained": self.clip_weights.pretrained_tag or os.path.basename(self.clip_weights.checkpoint_path),
            "clip_weights_sha256": self.clip_weights.weights_fingerprint,
            "embedding_identity": self.embedding_identity,
            "nsfw_head": os.path.basename(self.nsfw_weights),
            "nsfw_head_sha256": self.head_fingerprint,
        }


@functools.lru_cache(maxsize=4)
def cached_nsfw_head(path: str) -> NSFWHead:
    """The head, loaded once per process (it is shared read-only by the threads of a worker)."""
    return load_nsfw_head(path, device="cpu")


def normalise_output_path(url: str) -> str:
    return url.rstrip("/") if "://" in url else os.path.abspath(os.path.expanduser(url))


def plan_filter_run(
    file_paths: str | list[str],
    output_path: str,
    files_per_partition: int = 1,
    file_extensions: list[str] | tuple[str, ...] = (".tar",),
    task_batch_size: int = 100,
    model_dir: str | None = None,
    clip_model: str = "ViT-L-14",
    clip_pretrained: str = "openai",
    nsfw_weights: str | None = None,
    model_inference_batch_size: int = 32,
    num_gpus_per_worker: float = 0.25,
    score_threshold: float = 0.5,
    cache_path: str | None = None,
    images_per_tar: int = 1000,
    verbose: bool = False,
    decode: DecodeOptions | None = None,
    storage_options: dict | None = None,
    take_over_output: bool = False,
) -> FilterRun:
    """Validate and resolve a run and claim its output; raises UserError naming the problem and the remedy.

    `take_over_output` lets this run replace the outputs of a run over other inputs (tasks/ownership.py).
    """
    model_dir = model_dir or default_model_dir()
    cache_path = cache_path or default_cache_path()
    output_path = normalise_output_path(output_path)
    storage_options = dict(storage_options or {})
    shard_urls = list_shards(file_paths, file_extensions, storage_options)
    partitions = tuple(partition_shards(shard_urls, files_per_partition))
    refuse_overlap(output_path, file_paths, shard_urls, file_extensions, storage_options)
    clip_weights = resolve_clip(clip_model, clip_pretrained, model_dir)
    head_path = str(nsfw_weights or nsfw_weights_path(model_dir, clip_weights.model_name))
    head = cached_nsfw_head(head_path)
    head.check_dimension(clip_weights.embedding_dim, f"embeddings of CLIP {clip_weights.model_name}")
    decode = decode or DecodeOptions.for_model(clip_weights.image_size)
    # Last, once everything else is valid: the output is claimed before any task writes to it.
    owner = input_owner(FILTER_FLOW, file_paths, file_extensions, shard_urls, len(partitions), storage_options)
    claim_output(output_path, owner, take_over_output, storage_options)
    return FilterRun(
        partitions=partitions,
        clip_weights=clip_weights,
        decode=decode,
        embedding_identity=clip_identity(clip_weights, decode.identity()),
        store=EmbeddingStore(cache_path, storage_options),
        nsfw_weights=head_path,
        head_fingerprint=weights_fingerprint(head_path),
        output_path=output_path,
        score_threshold=float(score_threshold),
        images_per_tar=int(images_per_tar),
        task_batch_size=int(task_batch_size),
        model_inference_batch_size=int(model_inference_batch_size),
        num_gpus_per_worker=float(num_gpus_per_worker),
        verbose=bool(verbose),
        storage_options=storage_options,
    )
