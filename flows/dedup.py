"""The `image-dedup` flow: near-duplicate images from the embedding store, without running CLIP.

shards -> their store entries (identity found without CLIP weights) -> all-pairs or clustered cosine
search in memory (tasks/dedup/groups.py), or out-of-core over cluster buckets, each bucket a task
(tasks/dedup/buckets.py, bucket_search.py, out_of_core.py) -> duplicates.parquet, kept.parquet, skipped.parquet, summary.json, and
optionally a deduplicated copy of the dataset (or of what a filter run kept).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, Optional, Union

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from pydantic import Field

from flows.nsfw_filter import storage_options_from_secret
from flows.parameters import settings_model, validate_settings
from flows.gpu_limits import hold_gpu
from flows.prefect_cache import STORAGE_RETRIES
from flows.run_names import dedup_run_name
from flows.runners import open_task_runner
from tasks.dedup.bucket_search import links_done, search_bucket
from tasks.dedup.buckets import BucketLayout, assign_unit, train_centroids, unit_done
from tasks.dedup.out_of_core import (
    WORK_FOLDER,
    OutOfCoreResult,
    default_in_memory_max_rows,
    entry_sizes,
    plan_layout,
    remove_work,
    resolve,
)
from tasks.dedup.groups import deduplicate
from tasks.models.clip_resolve import clip_identity, resolve_clip
from tasks.dedup.io import (
    earlier_copies,
    find_embedding_identity,
    load_embeddings,
    missing_shards,
    passed_samples,
    removed_samples,
    remove_stale_copies,
    shard_location,
    write_dedup_summary,
    write_deduplicated_copy,
    write_frame,
)
from tasks.store.entries import shard_fingerprint
from tasks.models.embed import embed_partition
from tasks.models.remote_weights import is_remote
from tasks.errors import UserError
from tasks.stop import clear_stop
from tasks.io.locations import Location, default_cache_path, redacted, resolve_url_credentials
from tasks.io.ownership import claim_output, input_owner, refuse_overlap, settle_owner
from tasks.io.partition import list_shards
from tasks.io.read import DEFAULT_DECODE_MODE, DecodeOptions
from tasks.filter.plan import EmbedStage, input_location, normalise_output_path
from tasks.store.entries import EmbeddingStore
from tasks.io.write import join_url, remove_leftover_temp_files

DEDUP_FLOW = "image-dedup"
# Out-of-core units assigned at once on one machine.
_UNITS_IN_FLIGHT = 2


@dataclass(frozen=True)
class DedupLocations:
    """Every place a run touches, built once from the user's parameters with the run's storage options."""

    inputs: Location  # the input listing's: every listed shard is reached as `inputs.at(shard_url)`
    output: Location
    cache: Location  # the embedding store
    filter_output: Location | None  # the nsfw-filter run whose kept samples a copy is restricted to
    clip_pretrained: Union[str, Location]  # a tag or local path, or the Location of a checkpoint URL


@task(name="load-embeddings", **STORAGE_RETRIES, persist_result=False)
def load_embeddings_task(store: EmbeddingStore, identity: str, shard_urls: list[str], inputs: Location):
    return load_embeddings(store, identity, shard_urls, inputs)


@task(name="embed-missing", **STORAGE_RETRIES, persist_result=False, tags=["gpu"])
def embed_missing_task(
    shard_urls: list[str],
    clip_model: str,
    clip_pretrained: Union[str, Location],
    model_dir: Optional[str],
    store: EmbeddingStore,
    inputs: Location,
    decode_mode: str = DEFAULT_DECODE_MODE,
) -> str:
    """Embed shards the store lacks, exactly as the filter flow would (same identity); returns the identity."""
    weights = resolve_clip(clip_model, clip_pretrained, model_dir)  # a checkpoint URL is read like the shards
    decode = DecodeOptions.for_model(weights.image_size, decode_mode)
    with hold_gpu(1.0) as device:
        embed_partition(shard_urls, EmbedStage.of(weights, store, decode, inputs=inputs), device=device)
    return clip_identity(weights, decode.identity())


@task(name="find-duplicates", persist_result=False)
def find_duplicates_task(stored, similarity_threshold: float, method: str):
    return deduplicate(stored.embeddings, stored.key, stored.shard, similarity_threshold=similarity_threshold, method=method)


def _output_file(output: Location, name: str) -> Location:
    return output.at(join_url(output.url, name))


@task(name="write-dedup-outputs", **STORAGE_RETRIES, persist_result=False)
def write_outputs_task(result, output: Location) -> dict[str, str]:
    return {name: write_frame(_output_file(output, f"{name}.parquet"), getattr(result, name)) for name in ("duplicates", "kept", "skipped")}


@task(name="train-centroids", **STORAGE_RETRIES, persist_result=False)
def train_centroids_task(store: EmbeddingStore, layout: BucketLayout) -> str:
    return train_centroids(store, layout)


@task(name="assign-unit", **STORAGE_RETRIES, persist_result=False)
def assign_unit_task(store: EmbeddingStore, layout: BucketLayout, unit: int) -> str:
    return assign_unit(store, layout, unit)


@task(name="search-bucket", **STORAGE_RETRIES, persist_result=False)
def search_bucket_task(layout: BucketLayout, bucket: int) -> str:
    return search_bucket(layout, bucket)


@task(name="resolve-groups", **STORAGE_RETRIES, persist_result=False)
def resolve_task(store: EmbeddingStore, layout: BucketLayout, output: Location) -> OutOfCoreResult:
    return resolve(store, layout, output)


def _run_all(runner, task_function, parameters: list[dict], in_flight: int) -> None:
    """Run every task, at most `in_flight` at once; raise the first failure (after its retries)."""
    futures: list = []
    for arguments in parameters:
        if len(futures) >= in_flight:
            futures[-in_flight].wait()
        futures.append(runner.submit(task_function, arguments))
    for future in futures:
        future.wait()
    for future in futures:
        future.result()


def search_out_of_core(store: EmbeddingStore, layout: BucketLayout, output: Location, settings: Any) -> OutOfCoreResult:
    """Centroids, then units into buckets, then buckets searched, each a task; work already done is kept."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    train_centroids_task(store, layout)
    seconds["centroids"] = time.perf_counter() - started
    # On one machine two units at a time (one reads and writes while the other computes), then one bucket
    # at a time (each uses every core, and memory stays one bucket's); Ray spreads them over its workers.
    on_ray = settings.task_runner == "ray"
    with open_task_runner(settings.task_runner, settings.ray_address, _UNITS_IN_FLIGHT, 0.0) as runner:
        units = [unit for unit in range(len(layout.units)) if not unit_done(layout, unit)]
        _run_all(runner, assign_unit_task, [dict(store=store, layout=layout, unit=unit) for unit in units],
                 len(units) if on_ray else _UNITS_IN_FLIGHT)
        seconds["assign"] = time.perf_counter() - started - sum(seconds.values())
        buckets = [bucket for bucket in range(layout.num_buckets) if not links_done(layout, bucket)]
        _run_all(runner, search_bucket_task, [dict(layout=layout, bucket=bucket) for bucket in buckets],
                 len(buckets) if on_ray else 1)
        seconds["search"] = time.perf_counter() - started - sum(seconds.values())
    outcome = resolve_task(store, layout, output)
    seconds["resolve"] = time.perf_counter() - started - sum(seconds.values())
    seconds["total"] = time.perf_counter() - started
    return dataclasses.replace(outcome, stats=dataclasses.replace(outcome.stats, seconds=seconds))


def _listed_shards(settings: Any, places: DedupLocations) -> list[str]:
    """The listed shards, once the output is known to be apart from every input."""
    shard_urls = list_shards(settings.file_paths, settings.file_extensions, places.inputs)
    filter_output = places.filter_output
    filter_scores = [(filter_output.at(join_url(filter_output.url, "scores")), "filter_output_path")] if filter_output is not None else []
    refuse_overlap(places.output, settings.file_paths, shard_urls, settings.file_extensions, places.inputs, filter_scores)
    return shard_urls


def _locations(settings: Any) -> tuple[Any, DedupLocations]:
    """Settings whose URLs carry no credentials (tasks/io/locations.py), and the run's locations: the one place
    the storage options (the Secret block's, and those the URLs carried) are read; nothing below takes them."""
    names = ("file_paths", "output_path", "cache_path", "filter_output_path", "clip_pretrained")
    *urls, storage_options = resolve_url_credentials(
        *(getattr(settings, name) for name in names), storage_options=storage_options_from_secret(settings.storage_options_secret)
    )
    settings = settings.model_copy(update=dict(zip(names, urls)))
    clip_pretrained = settings.clip_pretrained
    return settings, DedupLocations(
        inputs=input_location(settings.file_paths, storage_options),
        output=Location(normalise_output_path(settings.output_path), storage_options),
        cache=Location(settings.cache_path or default_cache_path(), storage_options),
        filter_output=Location(settings.filter_output_path, storage_options) if settings.filter_output_path else None,
        clip_pretrained=Location(clip_pretrained, storage_options) if is_remote(clip_pretrained) else clip_pretrained,
    )


def preflight(parameters: dict[str, Any]) -> None:
    """Check parameters, inputs and output outside Prefect (the CLI's fast, traceback-free check); raises UserError."""
    settings, places = _locations(validate_settings(parameters, DedupSettings))
    _listed_shards(settings, places)


# The signature's ranges reach the deployment's schema (the UI form and the API refuse bad values); the first line
# checks them again with one sentence for calls that skip that schema, so Prefect's own multi-line check is off.
@flow(name="image-dedup", flow_run_name=dedup_run_name, log_prints=False, validate_parameters=False)
def image_dedup(
    file_paths: Union[str, list[str]],
    output_path: Annotated[str, Field(min_length=1)],
    similarity_threshold: Annotated[float, Field(gt=0, le=1)] = 0.99,
    clip_model: Annotated[str, Field(min_length=1)] = "ViT-L-14",
    clip_pretrained: Annotated[str, Field(min_length=1)] = "openai",
    model_dir: Optional[str] = None,
    cache_path: Optional[str] = None,
    file_extensions: Annotated[list[str], Field(min_length=1)] = [".tar"],  # noqa: B006 - Prefect shows the default in the form; never mutated
    method: Literal["auto", "exact", "clustered", "out-of-core"] = "auto",
    bucket_rows: Annotated[int, Field(ge=2)] = 250000,  # tasks/dedup/out_of_core.py DEFAULT_BUCKET_ROWS (a literal: the command line reads it)
    in_memory_max_rows: Annotated[Optional[int], Field(ge=0)] = None,
    task_runner: Literal["threads", "ray"] = "threads",
    ray_address: Optional[str] = None,
    embedding_identity: Annotated[Optional[str], Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] = None,  # a store folder name
    embed_missing: bool = False,
    write_dataset: bool = False,
    filter_output_path: Optional[str] = None,
    images_per_tar: Annotated[int, Field(ge=1)] = 1000,
    storage_options_secret: Optional[str] = None,
    take_over_output: bool = False,
    decode_mode: Literal["exact", "reduced", "gpu"] = "exact",
) -> dict:
    """Find near-duplicate images of a dataset from its cached CLIP embeddings (CLIP is never loaded).

    Args:
        file_paths: The dataset's shards, as given to nsfw-filter: a directory or prefix, a list of shard URLs, or brace notation.
        output_path: Where duplicates.parquet, kept.parquet, skipped.parquet, summary.json (and shards/ with write_dataset) go.
        similarity_threshold: Two images are near-duplicates when the cosine similarity of their embeddings is at least this (NeMo Curator's eps = 1 - this).
        clip_model: The open_clip model name (or model-config JSON) the embeddings were made with.
        clip_pretrained: The pretrained tag or checkpoint the embeddings were made with.
        model_dir: Where model weights live; only needed with embed_missing.
        cache_path: Root of the embedding store the filter flow wrote; default $NSFW_CURATOR_CACHE_PATH or ~/.cache/nsfw-curator/embeddings.
        file_extensions: Which files under file_paths are shards.
        method: exact (all pairs, in blocks), clustered (k-means clusters, pairs within them), out-of-core (clusters written as bucket files, searched one bucket at a time), or auto (in memory while the embeddings fit: exact up to 50,000 images on CPU, 400,000 on a GPU, then clustered; out-of-core beyond).
        bucket_rows: Out-of-core: about this many rows per bucket (peak memory is about 6 KB per bucket row at 768 dimensions).
        in_memory_max_rows: With auto, the most images searched in memory; default from the machine's memory (half of it at about 5 KB per 768-d row).
        task_runner: Out-of-core: where unit and bucket tasks run, threads (this machine: two units, then one bucket at a time) or ray (a local Ray, or the cluster at ray_address).
        ray_address: The Ray cluster for task_runner=ray; a local Ray when empty.
        embedding_identity: The store identity to read (summary.json of a filter run names it under models); found automatically when empty.
        embed_missing: Embed shards missing from the store first (needs the CLIP weights in model_dir or clip_pretrained); otherwise missing shards are an error.
        write_dataset: Also write a deduplicated copy of the dataset under output_path/shards, members byte for byte.
        filter_output_path: With write_dataset, copy only the samples this nsfw-filter run kept (its output_path).
        images_per_tar: Samples per shard of the deduplicated copy.
        storage_options_secret: Name of a Prefect Secret block holding fsspec storage options as JSON.
        take_over_output: Replace the outputs of an earlier run over other inputs in output_path (otherwise refused).
        decode_mode: The decode_mode the embeddings were made with (exact, reduced or gpu, as given to nsfw-filter).
    """
    settings = validate_settings(dict(locals()), DedupSettings)
    clear_stop()  # a stop of an earlier run in this process (a notebook) is not this run's
    logger = get_run_logger()
    settings, places = _locations(settings)
    shard_urls = _listed_shards(settings, places)
    output, inputs = places.output, places.inputs
    store = EmbeddingStore(places.cache)

    missing: list[str] = []
    try:
        identity = find_embedding_identity(store, shard_urls, settings.clip_model, places.clip_pretrained, settings.model_dir,
                                           settings.embedding_identity, settings.decode_mode, inputs=inputs)
        missing = missing_shards(store, identity, shard_urls, inputs)
    except UserError:
        if not settings.embed_missing:
            raise
        missing = list(shard_urls)
    if missing:
        if not settings.embed_missing:
            listed = ", ".join(redacted(url) for url in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise UserError(
                f"{len(missing)} of {len(shard_urls)} shards have no embeddings in the store ({listed}); fill the store with "
                f"`nsfw-curator filter --file-paths ... --cache-path {redacted(store.cache_path)}` or pass --embed-missing."
            )
    # Claimed once the inputs are known to be usable, before anything is written.
    copies = len(shard_urls) if settings.write_dataset else 0
    owner = input_owner(DEDUP_FLOW, settings.file_paths, settings.file_extensions, shard_urls, copies, inputs)
    copy_mark = claim_output(output, owner, settings.take_over_output).partitions
    earlier = earlier_copies(output)  # read before this run rewrites summary.json
    if missing:
        logger.info("embedding %d shards missing from the store", len(missing))
        identity = embed_missing_task(
            missing, settings.clip_model, places.clip_pretrained, settings.model_dir, store, inputs, settings.decode_mode
        )

    chosen, sizes, fingerprints = settings.method, None, []
    if chosen in ("auto", "out-of-core"):
        fingerprints = [shard_fingerprint(shard_location(inputs, url)) for url in shard_urls]
        sizes = entry_sizes(store, identity, shard_urls, fingerprints)
        limit = settings.in_memory_max_rows if settings.in_memory_max_rows is not None else default_in_memory_max_rows(sizes.dim)
        if chosen == "auto" and sum(sizes.rows) > limit:
            chosen = "out-of-core"
    if chosen == "out-of-core":
        assert sizes is not None
        layout = plan_layout(_output_file(output, WORK_FOLDER), identity, shard_urls, fingerprints, sizes,
                             similarity_threshold=settings.similarity_threshold, bucket_rows=settings.bucket_rows)
        logger.info("%d embeddings of %d shards from %s: out-of-core search in %d buckets", sum(sizes.rows), len(shard_urls), identity, layout.num_buckets)
        outcome = search_out_of_core(store, layout, output, settings)
        duplicates, skipped, kept_rows, stats = outcome.duplicates, outcome.skipped, outcome.kept_rows, outcome.stats
        files = {"duplicates": write_frame(_output_file(output, "duplicates.parquet"), duplicates),
                 "kept": outcome.kept_url,
                 "skipped": write_frame(_output_file(output, "skipped.parquet"), skipped)}
    else:
        stored = load_embeddings_task(store, identity, shard_urls, inputs)
        logger.info("%d embeddings of %d shards from %s", len(stored.key), len(shard_urls), identity)
        result = find_duplicates_task(stored, settings.similarity_threshold, chosen)
        del stored
        files = write_outputs_task(result, output)
        duplicates, skipped, kept_rows, stats = result.duplicates, result.skipped, len(result.kept), result.stats
    copied: list[str] = []
    if settings.write_dataset:
        passed = passed_samples(places.filter_output) if places.filter_output is not None else None
        copied = write_deduplicated_copy(shard_urls, removed_samples(duplicates, skipped), output, settings.images_per_tar,
                                         passed=passed, inputs=inputs)
    remove_stale_copies(output, copied, earlier, copies, copy_mark)
    summary: dict[str, Any] = {
        "embedding_identity": identity,
        "shards": len(shard_urls),
        "stats": asdict(stats),
        "files": files,
        "deduplicated_shards": copied,
    }
    write_dedup_summary(output, summary)
    if chosen == "out-of-core":
        remove_work(layout)
    settle_owner(output, copies)
    remove_leftover_temp_files(output)
    create_table_artifact(
        key="image-dedup-counts",
        table=[
            {"what": "embeddings read", "count": stats.rows},
            {"what": "compared", "count": stats.compared_rows},
            {"what": "skipped (no embedding)", "count": stats.skipped_rows},
            {"what": "duplicate groups", "count": stats.groups},
            {"what": "duplicates removed", "count": stats.duplicates},
        ],
        description=f"image-dedup at cosine similarity >= {stats.similarity_threshold} ({stats.method} search)",
    )
    logger.info("%d duplicates in %d groups among %d images (%s search)", stats.duplicates, stats.groups, stats.compared_rows, stats.method)
    return {"summary": join_url(output.url, "summary.json"), "duplicates": stats.duplicates, "groups": stats.groups, "kept": kept_rows}


# The flow's parameters as a model (types, ranges and defaults from the signature above), for checks outside Prefect.
DedupSettings = settings_model(image_dedup.fn, "DedupSettings")
