"""Everything a filter run decides before any work starts, checked up front.

`plan_filter_run` lists and partitions the shards, checks that the output is apart from them, finds the
CLIP weights and the NSFW head offline, checks that they fit each other, fixes the identities that name
the run's embeddings and outputs, and finally claims the output for these inputs (tasks/io/ownership.py).
Every mistake a user can make here fails in seconds with one sentence, before a GPU is touched.

The plan is two kinds of value. The stages (`EmbedStage`, `FilterStage`) carry the run's resolved
settings, each once, and never the partitions: they are what a task receives beside its own partition,
so a task's inputs stay the same size however many partitions the run has. `FilterRun.partitions` is the
list of work, which only the flow walks.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from tasks.errors import UserError
from tasks.models.clip_resolve import ClipWeights, clip_identity, resolve_clip, weights_fingerprint
from tasks.io.locations import default_cache_path, default_model_dir, nsfw_weights_path, refuse_output_file, resolve_url_credentials
from tasks.models.nsfw import NSFWHead, load_nsfw_head
from tasks.io.ownership import claim_output, input_owner, refuse_overlap
from tasks.io.partition import Partition, list_shard_sizes, parse_blocksize, partition_shards
from tasks.io.read import DecodeOptions
from tasks.store.entries import EmbeddingStore


FILTER_FLOW = "nsfw-filter"


class FilterSettingsLike(Protocol):
    """The validated flow parameters the plan reads (flows/nsfw_filter.py `FilterSettings`)."""

    file_paths: str | list[str]
    output_path: str
    files_per_partition: int
    blocksize: str | None
    file_extensions: list[str]
    task_batch_size: int
    model_dir: str | None
    clip_model: str
    clip_pretrained: str
    nsfw_weights: str | None
    model_inference_batch_size: int
    num_gpus_per_worker: float
    score_threshold: float
    cache_path: str | None
    images_per_tar: int
    verbose: bool
    take_over_output: bool
    decode_mode: str


@dataclass(frozen=True)
class EmbedStage:
    """Settings of the embedding stage: which CLIP, how images are decoded, where entries go, how much at once."""

    clip_weights: ClipWeights
    decode: DecodeOptions
    embedding_identity: str
    store: EmbeddingStore  # carries the storage options of the store and of the shards
    task_batch_size: int
    model_inference_batch_size: int
    num_gpus_per_worker: float
    verbose: bool = False

    @property
    def storage_options(self) -> dict:
        return self.store.storage_options


@dataclass(frozen=True)
class FilterStage:
    """Settings of the scoring and writing stage; `embedding` is the stage whose entries it scores (and
    which embeds a shard again when its entry turns out unusable)."""

    embedding: EmbedStage
    nsfw_weights: str
    head_fingerprint: str
    output_path: str
    score_threshold: float
    images_per_tar: int
    verbose: bool = False
    storage_options: dict = field(default_factory=dict, hash=False, compare=False, repr=False)


@dataclass(frozen=True)
class FilterRun:
    """The resolved, validated plan of one run: the stages (small, handed to tasks) and the partitions."""

    partitions: tuple[Partition, ...]
    embed: EmbedStage
    filter: FilterStage
    input_bytes: int | None = None  # the shards' total size, when the listing gave every size

    @property
    def output_path(self) -> str:
        return self.filter.output_path

    @property
    def storage_options(self) -> dict:
        return self.filter.storage_options

    def models(self) -> dict[str, str]:
        """Model identities for the summary (names and fingerprints, never local secrets)."""
        weights = self.embed.clip_weights
        return {
            "clip_model": weights.model_name,
            "clip_pretrained": weights.pretrained_tag or os.path.basename(weights.checkpoint_path),
            "clip_weights_sha256": weights.weights_fingerprint,
            "embedding_identity": self.embed.embedding_identity,
            "nsfw_head": os.path.basename(self.filter.nsfw_weights),
            "nsfw_head_sha256": self.filter.head_fingerprint,
        }


# Below this mean size per partition, a run of many partitions spends a noticeable share of its time on
# orchestration: each partition costs two task runs, about 50 ms of CPU (benchmarks/bench_scale.py).
SMALL_PARTITION_BYTES = 64 << 20
SMALL_PARTITION_RUN = 100  # partitions; fewer cost seconds of overhead in all, not worth a warning
SUGGESTED_BLOCKSIZE = "512MB"


def small_partitions_advice(partitions: int, input_bytes: int | None) -> str | None:
    """One sentence advising bigger partitions when a large run's partitions are small, else None."""
    if input_bytes is None or partitions < SMALL_PARTITION_RUN or input_bytes / partitions >= SMALL_PARTITION_BYTES:
        return None
    mean_mb = input_bytes / partitions / 1e6
    return (
        f"{partitions:,} partitions of {mean_mb:.1f} MB on average: each partition costs two task runs of orchestration, "
        f"so partitions this small spend much of the run on bookkeeping; pass blocksize='{SUGGESTED_BLOCKSIZE}' "
        f"(or a larger files_per_partition) to group shards."
    )


@functools.lru_cache(maxsize=4)
def cached_nsfw_head(path: str) -> NSFWHead:
    """The head, loaded once per process (it is shared read-only by the threads of a worker)."""
    return load_nsfw_head(path, device="cpu")


def normalise_output_path(url: str) -> str:
    return url.rstrip("/") if "://" in url else os.path.abspath(os.path.expanduser(url))


def plan_filter_run(
    settings: FilterSettingsLike, storage_options: dict[str, Any] | None = None, decode: DecodeOptions | None = None
) -> FilterRun:
    """Validate and resolve a run and claim its output; raises UserError naming the problem and the remedy.

    `settings` holds the flow's validated parameters (their defaults live in the flow's signature only);
    `settings.take_over_output` lets this run replace the outputs of a run over other inputs (tasks/io/ownership.py).
    """
    model_dir = settings.model_dir or default_model_dir()
    # URL credentials move into the storage options here: nothing the run holds, writes or prints carries them.
    file_paths, output_path, cache_path, storage_options = resolve_url_credentials(
        settings.file_paths, settings.output_path, settings.cache_path or default_cache_path(), storage_options=storage_options
    )
    refuse_output_file(output_path, storage_options)
    output_path = normalise_output_path(output_path)
    file_extensions = settings.file_extensions
    shard_sizes = list_shard_sizes(file_paths, file_extensions, storage_options)
    shard_urls = list(shard_sizes)
    if settings.blocksize is not None and settings.files_per_partition != 1:
        raise UserError("files_per_partition and blocksize both size partitions; pass one of them.")
    blocksize = parse_blocksize(settings.blocksize) if settings.blocksize is not None else None
    partitions = tuple(partition_shards(shard_urls, settings.files_per_partition, shard_sizes=list(shard_sizes.values()), blocksize=blocksize))
    sizes_known = all(size is not None for size in shard_sizes.values())
    refuse_overlap(output_path, file_paths, shard_urls, file_extensions, storage_options)
    clip_weights = resolve_clip(settings.clip_model, settings.clip_pretrained, model_dir)
    head_path = str(settings.nsfw_weights or nsfw_weights_path(model_dir, clip_weights.model_name))
    head = cached_nsfw_head(head_path)
    head.check_dimension(clip_weights.embedding_dim, f"embeddings of CLIP {clip_weights.model_name}")
    decode = decode or DecodeOptions.for_model(clip_weights.image_size, settings.decode_mode)
    # Last, once everything else is valid: the output is claimed before any task writes to it.
    owner = input_owner(FILTER_FLOW, file_paths, file_extensions, shard_urls, len(partitions), storage_options)
    claim_output(output_path, owner, settings.take_over_output, storage_options)
    embed = EmbedStage(
        clip_weights=clip_weights,
        decode=decode,
        embedding_identity=clip_identity(clip_weights, decode.identity()),
        store=EmbeddingStore(cache_path, storage_options),
        task_batch_size=int(settings.task_batch_size),
        model_inference_batch_size=int(settings.model_inference_batch_size),
        num_gpus_per_worker=float(settings.num_gpus_per_worker),
        verbose=bool(settings.verbose),
    )
    scoring = FilterStage(
        embedding=embed,
        nsfw_weights=head_path,
        head_fingerprint=weights_fingerprint(head_path),
        output_path=output_path,
        score_threshold=float(settings.score_threshold),
        images_per_tar=int(settings.images_per_tar),
        verbose=bool(settings.verbose),
        storage_options=storage_options,
    )
    input_bytes = sum(shard_sizes.values()) if sizes_known else None
    return FilterRun(partitions=partitions, embed=embed, filter=scoring, input_bytes=input_bytes)
