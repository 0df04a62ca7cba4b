"""Everything a filter run decides before any work starts, checked up front.

`plan_filter_run` lists and partitions the shards, checks that the output is apart from them, finds the
CLIP weights and the NSFW head, checks that they fit each other, fixes the identities that name the run's
embeddings and outputs, and finally claims the output for these inputs (tasks/io/ownership.py).
Every mistake a user can make here fails in seconds with one sentence, before a GPU is touched.

Weights are local paths (or tags under model_dir), or object-store URLs read with the run's storage
options (tasks/models/remote_weights.py): a URL is resolved here to its SHA-256, and the stages carry the
URL and that digest, so each machine that runs a task fetches and verifies its own copy once.

The plan is two kinds of value. The stages (`EmbedStage`, `FilterStage`) carry the run's resolved
settings, each once, and never the partitions: they are what a task receives beside its own partition,
so a task's inputs stay the same size however many partitions the run has. `FilterRun.partitions` is the
list of work, which only the flow walks.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from tasks.errors import UserError
from tasks.models.clip_resolve import ClipWeights, clip_identity, resolve_clip, weights_fingerprint
from tasks.models.remote_weights import is_remote, local_weights, resolve_weights
from tasks.io.locations import Location, default_cache_path, default_model_dir, nsfw_weights_path, refuse_output_file, resolve_url_credentials
from tasks.models.nsfw import NSFWHead, load_nsfw_head
from tasks.io.ownership import claim_output, input_owner, refuse_overlap
from tasks.io.partition import Partition, list_shard_sizes, parse_blocksize, partition_shards
from tasks.io.read import DecodeOptions
from tasks.io.spool import run_spool_folder
from tasks.signals.plan import SignalPlan, plan_signals
from tasks.hashes.matching import HashListsPlan, plan_hash_lists
from tasks.store.entries import EmbeddingStore


FILTER_FLOW = "nsfw-filter"
DEFAULT_SCORE_THRESHOLD = 0.5  # the flow's default (flows/nsfw_filter.py); another value beside a policy is a mistake


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
    hash_lists: list[str] | None  # paths or URLs of hash list files
    pdq_max_distance: int
    signals: Any  # list of signal specs, or a path/URL of a JSON or YAML file holding them (tasks/signals/schema.py)
    policy: Any  # a Policy, or a path/URL of one; None: drop nsfw_score >= score_threshold
    cache_path: str | None
    images_per_tar: int
    verbose: bool
    take_over_output: bool
    decode_mode: str
    forward_pass: str
    task_runner: str
    ray_address: str | None


@dataclass(frozen=True)
class EmbedStage:
    """Settings of the embedding stage: which CLIP, how images are decoded, where entries go, how much at once."""

    clip_weights: ClipWeights
    decode: DecodeOptions
    embedding_identity: str
    store: EmbeddingStore
    task_batch_size: int
    model_inference_batch_size: int
    num_gpus_per_worker: float
    verbose: bool = False
    forward_pass: str = "autocast"  # how CLIP runs on CUDA (tasks/models/forward.py)
    # The input listing's location: every shard it lists is reached as `inputs.at(shard_url)` (one run, one set
    # of storage options).
    inputs: Location = Location(".")

    @classmethod
    def of(cls, clip_weights: ClipWeights, store: EmbeddingStore, decode: DecodeOptions, task_batch_size: int = 100,
           model_inference_batch_size: int = 32, inputs: Location = Location(".")) -> "EmbedStage":
        """The stage for these weights and decode settings, its identity computed (for library callers and tests)."""
        return cls(clip_weights, decode, clip_identity(clip_weights, decode.identity()), store, task_batch_size,
                   model_inference_batch_size, num_gpus_per_worker=0.0, inputs=inputs)

    def shard(self, shard_url: str) -> Location:
        """Where a listed shard is read from."""
        return self.inputs.at(shard_url)


@dataclass(frozen=True)
class FilterStage:
    """Settings of the scoring and writing stage; `embedding` is the stage whose entries it scores (and
    which embeds a shard again when its entry turns out unusable)."""

    embedding: EmbedStage
    head_location: Location  # the NSFW head as given: a local path, or a URL
    head_fingerprint: str  # its SHA-256
    output: Location
    score_threshold: float  # the NSFW threshold the review sheet centres on (the policy decides what passes)
    images_per_tar: int
    verbose: bool = False
    signals: SignalPlan = field(default_factory=SignalPlan)  # signals besides nsfw, and the policy
    hash_lists: HashListsPlan | None = None  # known-abuse hash lists every image is matched against (tasks/hashes/)
    # This run's folder for local copies of remote shards (tasks/io/spool.py); None when tasks may run on
    # other machines (a Ray cluster), whose copies nobody would read or remove.
    spool_folder: str | None = None

    @property
    def output_path(self) -> str:
        return self.output.url

    @property
    def hash_lists_identity(self) -> dict | None:
        return self.hash_lists.identity() if self.hash_lists is not None else None

    @property
    def nsfw_weights(self) -> str:
        """The head's file on this machine: the path as given, or for a URL this machine's verified copy
        (downloaded on first use here, then checked once per process)."""
        if is_remote(self.head_location.url):
            return str(local_weights(self.head_location, self.head_fingerprint))
        return self.head_location.url


@dataclass(frozen=True)
class FilterRun:
    """The resolved, validated plan of one run: the stages (small, handed to tasks) and the partitions."""

    partitions: tuple[Partition, ...]
    embed: EmbedStage
    filter: FilterStage
    input_bytes: int | None = None  # the shards' total size, when the listing gave every size

    @property
    def output(self) -> Location:
        return self.filter.output

    @property
    def output_path(self) -> str:
        return self.filter.output_path

    def models(self) -> dict[str, str]:
        """Model identities for the summary (names and fingerprints, never local secrets)."""
        weights = self.embed.clip_weights
        return {
            "clip_model": weights.model_name,
            "clip_pretrained": weights.pretrained_tag or _file_name(weights.checkpoint_url or weights.checkpoint_path),
            "clip_weights_sha256": weights.weights_fingerprint,
            "embedding_identity": self.embed.embedding_identity,
            "nsfw_head": _file_name(self.filter.head_location.url),
            "nsfw_head_sha256": self.filter.head_fingerprint,
            **{
                f"signal_{signal.name}": f"{signal.kind}: {signal.source_name}" for signal in self.filter.signals.signals
            },
            **{f"signal_{signal.name}_sha256": signal.sha256 for signal in self.filter.signals.signals},
            # Lists are named by count and content fingerprint only: their names and hashes stay out of shared outputs.
            **({"hash_lists": f"{len(self.filter.hash_lists.locations)} lists, fingerprint {self.filter.hash_lists.fingerprint}"}
               if self.filter.hash_lists is not None else {}),
        }


# Below this mean size per partition, a run of many partitions spends a noticeable share of its time on
# orchestration: each partition costs three task runs (read, embed, filter), about 50 ms of CPU for the two before the read task (benchmarks/bench_scale.py).
SMALL_PARTITION_BYTES = 64 << 20
SMALL_PARTITION_RUN = 100  # partitions; fewer cost seconds of overhead in all, not worth a warning
SUGGESTED_BLOCKSIZE = "512MB"


def small_partitions_advice(partitions: int, input_bytes: int | None) -> str | None:
    """One sentence advising bigger partitions when a large run's partitions are small, else None."""
    if input_bytes is None or partitions < SMALL_PARTITION_RUN or input_bytes / partitions >= SMALL_PARTITION_BYTES:
        return None
    mean_mb = input_bytes / partitions / 1e6
    return (
        f"{partitions:,} partitions of {mean_mb:.1f} MB on average: each partition costs three task runs of orchestration, "
        f"so partitions this small spend much of the run on bookkeeping; pass blocksize='{SUGGESTED_BLOCKSIZE}' "
        f"(or a larger files_per_partition) to group shards."
    )


def _file_name(location: str) -> str:
    """The last path segment of a path or URL (what the summary names a weight file by)."""
    return location.rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else os.path.basename(location)


def load_planned_head(location: Location) -> tuple[NSFWHead, str]:
    """The NSFW head at a local path or URL (fetched once per machine), and its SHA-256; UserError when it is not one."""
    if is_remote(location.url):
        resolved = resolve_weights(location)
        return cached_nsfw_head(str(resolved.path)), resolved.sha256
    head = cached_nsfw_head(location.url)  # first: a missing or foreign file is one sentence
    return head, weights_fingerprint(location.url)


@functools.lru_cache(maxsize=4)
def cached_nsfw_head(path: str) -> NSFWHead:
    """The head, loaded once per process (it is shared read-only by the threads of a worker)."""
    return load_nsfw_head(path, device="cpu")


def input_location(file_paths: str | list[str], storage_options: dict[str, Any]) -> Location:
    """The input listing's location: its first URL, with the run's storage options (which reach every shard)."""
    first = file_paths if isinstance(file_paths, str) else next((str(path) for path in file_paths if path), "")
    return Location(first or ".", storage_options)


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
    # Weights URLs are read with the same storage options as the shards.
    file_paths, output_path, cache_path, clip_pretrained, nsfw_weights, storage_options = resolve_url_credentials(
        settings.file_paths,
        settings.output_path,
        settings.cache_path or default_cache_path(),
        settings.clip_pretrained,
        settings.nsfw_weights,
        storage_options=storage_options,
    )
    # Each place the run touches, once, as a location carrying the run's storage options; nothing below takes them.
    inputs = input_location(file_paths, storage_options)
    refuse_output_file(Location(output_path, storage_options))
    output = Location(normalise_output_path(output_path), storage_options)
    output_path = output.url
    file_extensions = settings.file_extensions
    shard_sizes = list_shard_sizes(file_paths, file_extensions, inputs)
    shard_urls = list(shard_sizes)
    if settings.blocksize is not None and settings.files_per_partition != 1:
        raise UserError("files_per_partition and blocksize both size partitions; pass one of them.")
    blocksize = parse_blocksize(settings.blocksize) if settings.blocksize is not None else None
    partitions = tuple(partition_shards(shard_urls, settings.files_per_partition, shard_sizes=list(shard_sizes.values()), blocksize=blocksize))
    sizes_known = all(size is not None for size in shard_sizes.values())
    refuse_overlap(output, file_paths, shard_urls, file_extensions, inputs)
    clip_pretrained = Location(clip_pretrained, storage_options) if is_remote(str(clip_pretrained)) else clip_pretrained
    clip_weights = resolve_clip(settings.clip_model, clip_pretrained, model_dir)
    head_location = Location(str(nsfw_weights or nsfw_weights_path(model_dir, clip_weights.model_name)), storage_options)
    head, head_fingerprint = load_planned_head(head_location)
    head.check_dimension(clip_weights.embedding_dim, f"embeddings of CLIP {clip_weights.model_name}")
    decode = decode or DecodeOptions.for_model(clip_weights.image_size, settings.decode_mode)
    from tasks.models.forward import check_forward_for_model

    check_forward_for_model(settings.forward_pass, json.loads(clip_weights.model_config))
    if decode.on_device:
        from tasks.models.device_transform import DeviceTransform

        DeviceTransform.of(clip_weights.preprocess_cfg)  # a model whose preprocessing the device cannot reproduce is refused here
    if settings.policy is not None and float(settings.score_threshold) != DEFAULT_SCORE_THRESHOLD:
        raise UserError("score_threshold applies only when no policy is given; put the NSFW threshold in the policy's rules.")
    store = EmbeddingStore(Location(cache_path, storage_options))
    signals = plan_signals(
        settings.signals, settings.policy, float(settings.score_threshold), clip_weights.embedding_dim, storage_options, clip_weights, store
    )
    hash_lists = plan_hash_lists(settings.hash_lists, settings.pdq_max_distance, storage_options)
    # Last, once everything else is valid: the output is claimed before any task writes to it.
    owner = input_owner(FILTER_FLOW, file_paths, file_extensions, shard_urls, len(partitions), inputs)
    claim_output(output, owner, settings.take_over_output)
    embed = EmbedStage(
        clip_weights=clip_weights,
        decode=decode,
        embedding_identity=clip_identity(clip_weights, decode.identity()),
        store=store,
        task_batch_size=int(settings.task_batch_size),
        model_inference_batch_size=int(settings.model_inference_batch_size),
        num_gpus_per_worker=float(settings.num_gpus_per_worker),
        verbose=bool(settings.verbose),
        forward_pass=str(settings.forward_pass),
        inputs=inputs,
    )
    scoring = FilterStage(
        embedding=embed,
        head_location=head_location,
        head_fingerprint=head_fingerprint,
        output=output,
        score_threshold=float(settings.score_threshold),
        images_per_tar=int(settings.images_per_tar),
        verbose=bool(settings.verbose),
        signals=signals,
        hash_lists=hash_lists,
        # Every task of a threads run, or of a Ray started here, runs on this machine and sees its disk.
        spool_folder=run_spool_folder() if settings.task_runner == "threads" or not settings.ray_address else None,
    )
    input_bytes = sum(shard_sizes.values()) if sizes_known else None
    return FilterRun(partitions=partitions, embed=embed, filter=scoring, input_bytes=input_bytes)
