"""How tasks meet Prefect: the embedding task's cache (the embedding store's identity) and storage retries.

The cache key of a partition is the hash of its store entries' URLs (store root, model/weights/
preprocessing identity, each shard's content fingerprint), so Prefect shows the task as Cached exactly
when the store would hit. Task results (the entry URLs) live beside the store, under
`{cache_path}/_prefect_results`, so any machine that shares the store shares the cache.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem
from prefect.tasks import exponential_backoff

from tasks.errors import UserError
from tasks.run_plan import FilterRun
from tasks.store import partition_embedding_identity, shard_fingerprint

RESULTS_FOLDER = "_prefect_results"


def embedding_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    run: FilterRun = parameters["run"]
    identity = partition_embedding_identity(parameters["partition"].shard_urls, run.embedding_identity, run.store, run.storage_options)
    return f"embed-{identity}"


def partition_in_store(run: FilterRun, shard_urls: tuple[str, ...]) -> bool:
    """True when every shard of the partition has a readable store entry for this run's identity."""
    return all(run.store.has(run.embedding_identity, url, shard_fingerprint(url, run.storage_options)) for url in shard_urls)


def embedding_result_storage(run: FilterRun) -> WritableFileSystem:
    """A saved filesystem block at `{cache_path}/_prefect_results` (Prefect wants result storage saved).

    The block holds only the location: credentials stay in the environment of each worker.
    """
    root = f"{run.store.cache_path}/{RESULTS_FOLDER}"
    if "://" in root and not root.startswith("file://"):
        block: WritableFileSystem = RemoteFileSystem(basepath=root)
    else:
        block = LocalFileSystem(basepath=root.removeprefix("file://"))
    name = "nsfw-curator-results-" + hashlib.sha256(root.encode()).hexdigest()[:16]
    block.save(name, overwrite=True)
    return block


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry storage hiccups; a UserError (missing weights, bad input) is final and fails fast."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


# Task options for steps that touch storage: transient errors retry with backoff, user errors fail fast.
STORAGE_RETRIES: dict[str, Any] = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_unless_user_error,
)
