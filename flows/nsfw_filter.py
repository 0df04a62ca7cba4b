"""The `nsfw-filter` flow: shards -> CLIP embeddings (cached) -> LAION NSFW scores -> filtered outputs.

Reads top to bottom like the pipeline. The work lives in plain functions under `tasks/`; the Prefect
tasks here only add retries, caching, GPU slots and logging around them.
"""

from __future__ import annotations

import queue
from typing import Annotated, Any, Literal, Optional, Union

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from flows.parameters import settings_model, validate_settings
from flows.run_names import dataset_name, filter_run_name, partition_task_run_name
from flows.progress import ProgressReport
from flows.gpu_limits import hold_gpu
from flows.prefect_cache import EMBEDDING_CACHE, STORAGE_RETRIES, embedding_result_storage, shard_reembedder
from flows.runners import default_max_workers, gpu_remote_options, open_task_runner
from tasks.models.embed import embed_partition
from tasks.errors import UserError
from tasks.filter.reading import PartitionRead, read_partition
from tasks.filter.stage import clean_partitions_beyond, filter_partition
from tasks.io.spool import remove_copies, remove_run_folder
from tasks.io.partition import Partition
from flows.artifacts import publish_location, publish_review_artifacts
from tasks.review.sheet import remove_review_sheet, write_review_sheet
from tasks.filter.plan import EmbedStage, FilterRun, FilterStage, plan_filter_run, small_partitions_advice
from tasks.io.write import PartitionResult, RunSummary, remove_leftover_temp_files, write_run_quarantine
from tasks.signals.schema import Policy, SignalSpec


def _plan(settings: Any) -> FilterRun:
    return plan_filter_run(settings, storage_options_from_secret(settings.storage_options_secret))


def preflight(parameters: dict[str, Any]) -> FilterRun:
    """Validate and plan a run outside Prefect (the CLI's fast, traceback-free check); raises UserError."""
    return _plan(validate_settings(parameters, FilterSettings))


def storage_options_from_secret(block_name: str | None) -> dict:
    """fsspec storage options (e.g. key, secret, endpoint_url) from a Prefect Secret block holding JSON."""
    if not block_name:
        return {}
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except ValueError:
        raise UserError(f"Prefect Secret block {block_name!r} was not found; create it with the storage options as JSON.") from None
    if not isinstance(value, dict):
        raise UserError(f"Prefect Secret block {block_name!r} must hold a JSON object of fsspec storage options.")
    return value


def _dataset_task_run_name(parameters: dict[str, Any]) -> str:
    return f"partition-{dataset_name(parameters['settings'].file_paths)}"


@task(
    name="partition-shards",
    task_run_name=_dataset_task_run_name,
    **STORAGE_RETRIES,  # listing is the first request of a run: a storage hiccup there is retried like any other
    cache_policy=NO_CACHE,
    persist_result=False,
)
def partition_shards_task(settings: Any) -> FilterRun:
    """List the shards, group them into partitions and resolve the run's stages (tasks/filter/plan.py)."""
    return _plan(settings)


@task(
    name="read-partition",
    task_run_name=partition_task_run_name("read"),
    **STORAGE_RETRIES,
    cache_policy=NO_CACHE,  # asks the store and the output afresh each run
    persist_result=False,
)
def read_partition_task(partition: Partition, stage: FilterStage) -> PartitionRead:
    """Fingerprint the partition's shards, look them up in the store, check its earlier outputs and copy
    the remote shards it must read to this machine's disk (tasks/filter/reading.py)."""
    return read_partition(partition, stage)


@task(
    name="embed-partition",
    task_run_name=partition_task_run_name("embed"),
    **STORAGE_RETRIES,
    **EMBEDDING_CACHE,  # cache records are data only (entry URLs as JSON), checked when read back
    tags=["gpu"],
)
def embed_partition_task(partition: Partition, read: PartitionRead, stage: EmbedStage) -> list[str]:
    """Store entries for the partition's shards, running CLIP only for the shards the store misses.

    `read` is what the partition's read task found: the fingerprints name the entries and make the cache
    key (the hash of the entry URLs); its local copies are read instead of storage where they are usable.
    """
    logger = get_run_logger()
    with hold_gpu(stage.num_gpus_per_worker) as device:
        entry_urls = embed_partition(
            partition.shard_urls,
            stage,
            device=device,
            shard_fingerprints=read.lookup.shard_fingerprints,
            # A retry asks the store again: the failed attempt may have written some of the missing entries.
            shards_in_store=read.lookup.shards_in_store if is_first_attempt() else None,
            local_copies=read.copies_here(),
        )
    if stage.verbose:
        logger.info("partition %d: %d store entries on %s", partition.index, len(entry_urls), device)
    return entry_urls


@task(
    name="filter-partition",
    task_run_name=partition_task_run_name("filter"),
    **STORAGE_RETRIES,
    cache_policy=NO_CACHE,  # idempotent through its manifest; nothing for Prefect to hash or store
    persist_result=False,
)
def filter_partition_task(partition: Partition, read: PartitionRead, entry_urls: list[str], stage: FilterStage) -> PartitionResult:
    """Score the partition's embeddings (the entries its embedding task returned) and write its scores, filtered shards and manifest."""
    logger = get_run_logger()
    result = filter_partition(
        partition,
        stage,
        entry_urls,
        read.lookup.shard_fingerprints,
        log=logger.info if stage.verbose else None,
        log_always=logger.warning,
        reembed_shard=shard_reembedder(stage.embedding),  # an entry found unusable while scoring is embedded again, not a failure
        read=read,
    )
    remove_copies(read.local_copies)  # the partition is written: its copies are read no more
    return result


def is_first_attempt() -> bool:
    """False in a task run that Prefect is retrying."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    return context is None or context.task_run.run_count <= 1


def read_parameters(run: FilterRun, partition: Partition) -> dict[str, Any]:
    """What a read task receives: its partition and the filter stage's settings."""
    return {"partition": partition, "stage": run.filter}


def embed_parameters(run: FilterRun, partition: Partition, read: PartitionRead) -> dict[str, Any]:
    """What an embedding task receives: its partition, what its read task found and the stage settings, never the run's other partitions."""
    return {"partition": partition, "read": read, "stage": run.embed}


def filter_parameters(run: FilterRun, partition: Partition, read: PartitionRead, entry_urls: Any) -> dict[str, Any]:
    """What a filter task receives: its partition, what its read and embedding tasks returned and the stage settings."""
    return {"partition": partition, "read": read, "entry_urls": entry_urls, "stage": run.filter}


def submission_window(max_workers: int | None, num_gpus_per_worker: float) -> int:
    """Tasks in flight at once: enough to keep every worker busy, few enough that 100k partitions hold no 100k futures."""
    return 4 * (max_workers or default_max_workers(num_gpus_per_worker))


def run_partitions(runner: Any, run: FilterRun, window: int) -> list[PartitionResult]:
    """Read, embed, then filter every partition with at most `window` tasks in flight; the manifests' contents in partition order.

    Each task is submitted once the one before it in its partition has finished, so no worker sits blocked
    on an upstream task. A failed partition does not stop the others; the run then fails with the first
    failure's own error. Progress (flows/progress.py) is reported as each partition's outputs are written.
    """
    logger = get_run_logger()
    progress = ProgressReport(len(run.partitions))
    embed = embed_partition_task.with_options(result_storage=embedding_result_storage(run.embed))
    # A partition missing from the store is (re)computed even if Prefect remembers an old result for it.
    embed_again = embed.with_options(refresh_cache=True)
    finished: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()
    in_flight: dict[PrefectFuture, tuple[str, int]] = {}  # future -> (stage, partition index)
    reads: dict[int, PartitionRead] = {}
    results: list[PartitionResult] = []
    failed: dict[str, list[PrefectFuture]] = {"read": [], "embed": [], "filter": []}
    in_store = 0
    upcoming = iter(run.partitions)
    exhausted = False

    def submit(stage: str, index: int, task: Any, parameters: dict[str, Any]) -> None:
        future = runner.submit(task, parameters)
        in_flight[future] = (stage, index)
        future.add_done_callback(finished.put)

    while True:
        while not exhausted and len(in_flight) < window:
            partition = next(upcoming, None)
            if partition is None:
                exhausted = True
                break
            submit("read", partition.index, read_partition_task, read_parameters(run, partition))
        if not in_flight:
            break
        future = finished.get()
        future.wait()  # the final state, not what the API last recorded
        stage, index = in_flight.pop(future)
        partition = run.partitions[index]
        if not future.state.is_completed():
            failed[stage].append(future)
            failed_read = reads.pop(index, None)
            if failed_read is not None:
                remove_copies(failed_read.local_copies)  # nothing will read them: free the disk now
        elif stage == "read":
            read = reads[index] = future.result()
            in_store += read.lookup.complete
            with gpu_remote_options(runner, run.embed.num_gpus_per_worker):
                submit("embed", index, embed if read.lookup.complete else embed_again, embed_parameters(run, partition, read))
        elif stage == "embed":
            submit("filter", index, filter_partition_task, filter_parameters(run, partition, reads[index], future))
        else:
            reads.pop(index)
            results.append(future.result())
            progress.partition_done(results[-1].samples)
    progress.finish()
    logger.info("%d of %d partitions were already in the embedding store", in_store, len(run.partitions))
    for stage, what in (("read", "read"), ("embed", "embedded"), ("filter", "scored and written")):
        if failed[stage]:
            logger.error("%d of %d partitions could not be %s", len(failed[stage]), len(run.partitions), what)
    for stage in ("read", "embed", "filter"):
        if failed[stage]:
            failed[stage][0].result()
    return sorted(results, key=lambda result: result.partition_index)


def publish_artifacts(summary: RunSummary, summary_url: str) -> None:
    """Counts (per policy rule) and one histogram per signal, in the run's Artifacts tab; never an image or a key."""
    create_table_artifact(
        key="nsfw-filter-counts",
        table=[
            {"what": "samples", "count": summary.samples},
            {"what": "passed", "count": summary.passed},
            {"what": "filtered by the policy", "count": summary.filtered},
            *({"what": f"filtered by {label}", "count": count} for label, count in summary.filtered_by.items()),
            {"what": "not scored (errors)", "count": summary.errors},
            *([{"what": "quarantined (hash-list matches)", "count": summary.quarantined}] if summary.quarantined else []),
            {"what": "partitions", "count": summary.partitions},
        ],
        description="nsfw-filter counts, per rule of the policy",
    )
    sections = [f"## {record['column']} histogram\n\n{summary.histogram_markdown(name)}\n" for name, record in summary.signals.items()]
    create_markdown_artifact(
        key="nsfw-filter-histogram",
        markdown="\n".join(sections) or f"## nsfw_score histogram\n\n{summary.histogram_markdown()}\n",
        description="distribution of each signal's score over all scored samples, the policy's thresholds marked",
    )
    publish_location("nsfw-filter-summary", summary_url, "run summary (summary.json)")
    publish_location("nsfw-filter-outputs", summary.output_path, "filtered shards and scores")


# The signature's ranges reach the deployment's schema (the UI form and the API refuse bad values); the first line
# checks them again with one sentence for calls that skip that schema, so Prefect's own multi-line check is off.
@flow(name="nsfw-filter", flow_run_name=filter_run_name, log_prints=False, validate_parameters=False)
def nsfw_filter(
    file_paths: Union[str, list[str]],
    output_path: Annotated[str, Field(min_length=1)],
    files_per_partition: Annotated[int, Field(ge=1)] = 1,
    blocksize: Optional[str] = None,
    file_extensions: Annotated[list[str], Field(min_length=1)] = [".tar"],  # noqa: B006 - Prefect shows the default in the form; never mutated
    task_batch_size: Annotated[int, Field(ge=1)] = 100,
    model_dir: Optional[str] = None,
    clip_model: Annotated[str, Field(min_length=1)] = "ViT-L-14",
    clip_pretrained: Annotated[str, Field(min_length=1)] = "openai",
    nsfw_weights: Optional[str] = None,
    model_inference_batch_size: Annotated[int, Field(ge=1)] = 32,
    num_gpus_per_worker: Annotated[float, Field(gt=0, le=1)] = 0.25,
    score_threshold: Annotated[float, Field(ge=0, le=1)] = 0.5,
    signals: Optional[Union[list[SignalSpec], str]] = None,
    policy: Optional[Union[Policy, str]] = None,
    hash_lists: Optional[list[str]] = None,
    pdq_max_distance: Annotated[int, Field(ge=0, le=63)] = 31,
    cache_path: Optional[str] = None,
    images_per_tar: Annotated[int, Field(ge=1)] = 1000,
    verbose: bool = False,
    task_runner: Literal["threads", "ray"] = "threads",
    ray_address: Optional[str] = None,
    max_workers: Annotated[Optional[int], Field(ge=1)] = None,
    storage_options_secret: Optional[str] = None,
    review_samples: Annotated[int, Field(ge=0)] = 0,
    take_over_output: bool = False,
    decode_mode: Literal["exact", "reduced", "gpu"] = "exact",
    forward_pass: Literal["autocast", "half", "half-sdpa", "half-compiled"] = "autocast",
    allow_cpu: bool = False,
) -> dict:
    """Score every image of a WebDataset with LAION's CLIP-based NSFW detector and keep the safe ones.

    Args:
        file_paths: Shards to read: a directory or prefix (local, file://, s3://, any fsspec URL), a list of shard URLs, or brace notation like shards/part-{000000..000099}.tar.
        output_path: Where filtered shards, scores Parquet and the run summary go (local or object storage).
        files_per_partition: Tar shards per unit of work (one task pair per partition).
        blocksize: Instead of files_per_partition, group consecutive shards into partitions of about this size (e.g. 512MB, 1GiB); a bigger shard stands alone.
        file_extensions: Which files under file_paths are shards.
        task_batch_size: Images decoded per batch.
        model_dir: Where model weights live (CLIP under clip/, the NSFW head under nsfw/); default $NSFW_CURATOR_MODEL_DIR or ~/.cache/nsfw-curator/models.
        clip_model: An open_clip model name, or a path to an open_clip model-config JSON (model name = file stem).
        clip_pretrained: An open_clip pretrained tag resolved offline from model_dir, or a path to a checkpoint (.safetensors, .bin, .pt).
        nsfw_weights: Path to an NSFW-head safetensors file; default model_dir/nsfw/{clip_model}.safetensors.
        model_inference_batch_size: Batch size for CLIP and for the NSFW head.
        num_gpus_per_worker: Fraction of one GPU an embedding task holds; at most floor(1/f) such tasks share a GPU.
        score_threshold: Images with nsfw_score >= score_threshold are filtered out. Used when no policy is given.
        signals: Signals to score besides nsfw, from the same stored embedding: a list of {name, kind (aesthetic, prompts or concepts), weights} or a path/URL of a JSON or YAML file holding it. Each adds a {name}_score column (concepts: one per group).
        policy: Which signals drop a sample: {"rules": [{"signal": "aesthetic", "below": 4.5}, {"signal": "nsfw", "at_least": 0.1, "when": [{"signal": "concepts_special", "matched": true}]}]}, or a path/URL of a JSON or YAML file holding it; default drops nsfw_score >= score_threshold. The scores' filtered_by names the first rule that dropped each sample.
        hash_lists: Paths or URLs of known-abuse hash lists (one MD5, SHA-1 or PDQ hash per line, the kind told by its length); every image is matched in the pass that embeds it, and a matched sample is quarantined: never copied, shown or thumbnailed, recorded only in _quarantine/matches.jsonl.
        pdq_max_distance: PDQ hashes within this Hamming distance of a listed one match (31, Meta's recommendation).
        cache_path: Root of the embedding store (local directory or s3://...); default $NSFW_CURATOR_CACHE_PATH or ~/.cache/nsfw-curator/embeddings.
        images_per_tar: Samples per output shard.
        verbose: Log every partition's progress.
        task_runner: threads (one machine) or ray (a local Ray, or the cluster at ray_address).
        ray_address: Address of an existing Ray cluster (ray://host:10001 or auto); empty starts a local Ray.
        max_workers: Partitions processed at once with the threads runner; default from the GPUs (4 without GPU).
        storage_options_secret: Name of a Prefect Secret block holding fsspec storage options as JSON (credentials stay out of parameters).
        review_samples: When above 0, end the run by writing review/review.html under output_path (score histogram and this many thumbnails across score bands, denser around score_threshold, blurred at nsfw_score >= 0.5) for calibrating the threshold.
        take_over_output: Replace the outputs of an earlier run over other inputs in output_path (otherwise refused).
        decode_mode: exact decodes every pixel, so embeddings equal open_clip's own preprocess + encode_image; reduced decodes large JPEGs at 1/2-1/8 scale (never below the model's input size), several times faster to decode, embeddings within a cosine of about 0.9998; gpu decodes and resizes JPEGs in batches on the embedding device (nvJPEG on CUDA), every other image as exact, model input within 0.5/255 of exact on average. Part of the embedding identity.
        forward_pass: How CLIP runs on a CUDA GPU: autocast (fp16 autocast over the fp32 model), half (a half-precision copy of the image tower, fused attention), half-sdpa (open_clip's SDPA blocks), half-compiled (torch.compile for one padded batch shape). Measure with benchmarks/bench_gpu.py before leaving autocast; the CPU always runs fp32.
        allow_cpu: With task_runner ray, embed on a Ray that has no GPU at all (CLIP on CPUs, much slower); otherwise such a run is refused. A Ray with GPUs always runs embedding on GPU nodes; the threads runner uses the CPU when this machine has no GPU either way.
    """
    settings = validate_settings(dict(locals()), FilterSettings)
    logger = get_run_logger()
    run = partition_shards_task(settings)
    logger.info("%d shards in %d partitions; embeddings %s", sum(len(p.shard_urls) for p in run.partitions), len(run.partitions), run.embed.embedding_identity)
    advice = small_partitions_advice(len(run.partitions), run.input_bytes)
    if advice:
        logger.warning(advice)

    try:
        with open_task_runner(settings.task_runner, settings.ray_address, settings.max_workers, run.embed.num_gpus_per_worker,
                              embeds=True, allow_cpu=settings.allow_cpu) as runner:
            results = run_partitions(runner, run, submission_window(settings.max_workers, run.embed.num_gpus_per_worker))
    finally:
        remove_run_folder(run.filter.spool_folder)  # copies of partitions that failed, or were stopped

    clean_partitions_beyond(run.output, len(run.partitions))
    write_run_quarantine(run.output, results)  # the one record of hash-list matches, or none
    remove_leftover_temp_files(run.output)
    summary = RunSummary.from_partitions(
        results, run.filter.score_threshold, run.models(), run.output_path, run.filter.signals.scored(), run.filter.signals.policy.model_dump(mode="json")
    )
    summary_url = summary.write(run.output)
    publish_artifacts(summary, summary_url)
    if summary.quarantined and settings.review_samples == 0 and remove_review_sheet(run.output):
        logger.warning("the earlier review sheet was removed: it may show samples this run quarantined; write a new one with `nsfw-curator review`")
    if settings.review_samples > 0:
        # Opt-in threshold-calibration sheet (tasks/review/sheet.py); the run's outputs are complete before it starts.
        sheet = write_review_sheet(run.output, n=settings.review_samples)
        publish_review_artifacts(sheet)
        logger.info("review sheet with %d samples: %s", len(sheet.samples), sheet.sheet_url)
    logger.info("%d samples: %d passed, %d filtered, %d not scored", summary.samples, summary.passed, summary.filtered, summary.errors)
    if summary.quarantined:
        logger.warning("%d samples matched a hash list and are quarantined; see %s/_quarantine/matches.jsonl", summary.quarantined, run.output_path)
    return {
        "summary": summary_url, "samples": summary.samples, "passed": summary.passed, "filtered": summary.filtered, "errors": summary.errors,
        "quarantined": summary.quarantined,
    }


# The flow's parameters as a model (types, ranges and defaults from the signature above), for checks outside Prefect.
FilterSettings = settings_model(nsfw_filter.fn, "FilterSettings")
