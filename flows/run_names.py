"""Names of flow and task runs that a person can search for in the UI.

A flow run is named after its dataset and threshold (`webdataset-t0.5`, `webdataset-sim0.99`), a
partition's task run after the partition index and its first shard (`embed-p00012-shard-000012`), so
the task that failed or retried is found by the shard it read.
"""

from __future__ import annotations

import inspect
import posixpath
import re
from typing import Any, Callable, Union
from urllib.parse import urlsplit

SHARD_SUFFIX = re.compile(r"\.(tar|tgz|tar\.gz)$")


def path_stem(url: str) -> str:
    """The last component of a URL's path (no credentials, query or shard extension)."""
    parts = urlsplit(url) if "://" in url else None
    path = parts.path if parts else url
    name = posixpath.basename(path.rstrip("/"))
    if not name and parts:
        name = parts.hostname or ""
    return SHARD_SUFFIX.sub("", name)


def dataset_name(file_paths: Union[str, list[str]]) -> str:
    """The dataset's folder name: `webdataset` for `s3://bucket/webdataset/`, `.../webdataset/part-{0..9}.tar` or a list of its shards."""
    first = file_paths[0] if isinstance(file_paths, list) and file_paths else file_paths
    if not isinstance(first, str) or not first:
        return "dataset"
    trimmed = first.rstrip("/")
    last = posixpath.basename(urlsplit(trimmed).path if "://" in trimmed else trimmed)
    # A shard (or a brace pattern of shards) names its folder's dataset.
    if isinstance(file_paths, list) or "{" in last or SHARD_SUFFIX.search(last):
        trimmed = trimmed[: len(trimmed) - len(last)].rstrip("/") or trimmed
    return path_stem(trimmed) or "dataset"


def _flow_run_parameters() -> dict[str, Any]:
    """The current flow run's parameters, the flow's defaults filled in (a deployment's run carries only those it was given)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow is None:
        return {}
    defaults = {name: p.default for name, p in inspect.signature(context.flow.fn).parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **(context.parameters or {})}


def filter_run_name() -> str:
    """`{dataset}-t{score_threshold}` of the current flow run."""
    parameters = _flow_run_parameters()
    return f"{dataset_name(parameters.get('file_paths', ''))}-t{parameters.get('score_threshold')}"


def dedup_run_name() -> str:
    """`{dataset}-sim{similarity_threshold}` of the current flow run."""
    parameters = _flow_run_parameters()
    return f"{dataset_name(parameters.get('file_paths', ''))}-sim{parameters.get('similarity_threshold')}"


def partition_task_run_name(stage: str) -> Callable[..., str]:
    """A `task_run_name` for tasks given a `partition`: `{stage}-p{index:05d}-{first shard's name}`."""

    def name(parameters: dict[str, Any]) -> str:
        partition = parameters["partition"]
        first = partition.shard_urls[0] if partition.shard_urls else ""
        return f"{stage}-p{partition.index:05d}-{path_stem(first)}"

    name.__name__ = f"{stage}_task_run_name"
    return name
