"""Task runners: threads on one machine, or Ray (a local Ray, or an existing cluster) through prefect-ray.

On Ray, whether local or the cluster at `ray_address`, every worker gets what the flow process has
(`ray_runtime_env`, the job's runtime_env):

- the project's code: the `flows` and `tasks` package directories as `py_modules` (caches left out), so
  cluster nodes need this project's dependencies installed, not the project itself;
- its settings: every `NSFW_CURATOR_*` variable of the flow process, and `PREFECT_API_URL` set to the API
  this flow run reports to (a server, or the temporary local server Prefect started in this process), so
  task runs on workers are recorded in the run's own API and no worker starts a Prefect server of its own.

Embedding tasks ask Ray for `num_gpus_per_worker` of a GPU whenever the *cluster* has GPUs, whatever the
flow process sees (`gpu_remote_options`), so they run only on GPU nodes. A Ray without any GPU is refused
for embedding in one sentence unless the run allows CPUs (`allow_cpu`); the threads runner never refuses.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from prefect.logging import get_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.errors import UserError
from tasks.models.gpu import gpu_count, simulated_gpu_count, slots_per_gpu
from tasks.stop import clear_stop, request_stop

# Settings of this project that Ray worker processes must see as the driver does.
_FORWARDED_ENV_PREFIX = "NSFW_CURATOR_"
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)
# The project's packages, shipped to Ray workers: this file's folder and its sibling.
PROJECT_PACKAGES = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "tasks")
# Never uploaded with them (gitignore patterns, relative to each package folder).
PACKAGE_EXCLUDES = ["__pycache__/", "*.pyc", "*.pyo", ".pytest_cache/"]
# ray.init's address for a new Ray of this process: without one, Ray joins the latest cluster started on this
# machine (`ray start`, /tmp/ray/ray_current_cluster) instead of starting its own.
_LOCAL_RAY_ADDRESS = "local"


# GPUs of the cluster an open Ray runner connected to, read once when it connected (None: no runner open).
_connected_cluster_gpus: float | None = None


def ray_cluster_gpus() -> float:
    """GPUs the connected Ray cluster declares, over all its nodes (0 when none); as read on connecting while a runner is open."""
    if _connected_cluster_gpus is not None:
        return _connected_cluster_gpus
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def default_max_workers(num_gpus_per_worker: float) -> int:
    """Partitions in flight: every GPU slot busy plus one partition writing; 4 on CPU.

    With a Ray connection in this process (task_runner="ray"), the slots are the cluster's: its GPUs'
    slots, or its CPUs when it has no GPU, so a CPU-only flow process keeps a GPU cluster busy. Small tasks
    spend much of their time waiting on storage and the Prefect API, so a few in flight hide that latency;
    CLIP itself is shared by the threads of a worker (one model in memory).
    """
    if _ray_connected():
        import ray

        cluster_gpus = ray_cluster_gpus()
        if cluster_gpus:
            return int(cluster_gpus) * slots_per_gpu(num_gpus_per_worker) + 1
        return int(ray.cluster_resources().get("CPU", 1)) + 1
    gpus = gpu_count()
    return gpus * slots_per_gpu(num_gpus_per_worker) + 1 if gpus else 4


def _ray_connected() -> bool:
    # Only a process that imported Ray can hold a connection; importing it here would cost seconds.
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def flow_api_url() -> str | None:
    """The Prefect API this process's flow run reports to: its client's, else PREFECT_API_URL, else Prefect's local server.

    Without PREFECT_API_URL, Prefect starts a temporary local server in a subprocess (`SubprocessASGIServer`,
    one per process, key None) and its clients talk to that one; a Ray worker would start another of its own.
    """
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    context = FlowRunContext.get()
    if context is not None and context.client is not None:
        return str(context.client.api_url).rstrip("/")
    if PREFECT_API_URL.value():
        return str(PREFECT_API_URL.value()).rstrip("/")
    from prefect.server.api.server import SubprocessASGIServer

    local_server = SubprocessASGIServer._instances.get(None)
    return local_server.api_url if local_server is not None and local_server.running else None


def forwarded_env(api_url: str | None) -> dict[str, str]:
    """The environment every Ray worker gets: this process's NSFW_CURATOR_* settings and the run's Prefect API.

    Secrets are not forwarded: a runtime_env is shown by Ray's dashboard and job API, so the store's signing
    key (NSFW_CURATOR_STORE_KEY) must be in each node's own environment."""
    env_vars = {name: value for name, value in os.environ.items() if name.startswith(_FORWARDED_ENV_PREFIX) and not _SECRET_NAME.search(name)}
    if api_url:
        env_vars["PREFECT_API_URL"] = api_url
    return env_vars


def ray_runtime_env(api_url: str | None) -> dict[str, Any]:
    """The Ray job's runtime_env: the project's packages (zipped and uploaded once per content) and the forwarded environment."""
    return {
        "py_modules": [str(package) for package in PROJECT_PACKAGES],
        "excludes": list(PACKAGE_EXCLUDES),
        "env_vars": forwarded_env(api_url),
    }


def ray_task_runner(ray_address: str | None, api_url: str | None) -> TaskRunner:
    from prefect_ray import RayTaskRunner

    init_kwargs: dict[str, Any] = {"runtime_env": ray_runtime_env(api_url)}
    if ray_address:
        return RayTaskRunner(address=ray_address, init_kwargs=init_kwargs)
    init_kwargs.update(address=_LOCAL_RAY_ADDRESS, include_dashboard=False)
    if simulated_gpu_count():
        init_kwargs["num_gpus"] = simulated_gpu_count()
    return RayTaskRunner(init_kwargs=init_kwargs)


def refuse_cpu_only_ray(ray_address: str | None) -> None:
    """Refuse an embedding run on a Ray without GPUs: CLIP would run on every node's CPUs, hundreds of times slower."""
    import ray

    where = f"the Ray cluster at {ray_address}" if ray_address else "the local Ray started for this run"
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    cpus = int(ray.cluster_resources().get("CPU", 0))
    raise UserError(
        f"{where} has no GPU ({nodes} node(s), {cpus} CPUs), so CLIP would run on CPUs; "
        "add GPU nodes, or pass allow_cpu=True (--allow-cpu) to embed on CPUs anyway."
    )


def api_unreachable_warning(api_url: str | None) -> str | None:
    """A warning when the run's Prefect API listens on loopback only but Ray nodes run on other hosts (their task runs could not report)."""
    import ray
    from ray.util import get_node_ip_address

    host = urlsplit(api_url).hostname if api_url else None
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    here = get_node_ip_address()
    elsewhere = sorted({node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")} - {here, "127.0.0.1"})
    if not elsewhere:
        return None
    return (f"the run reports to the Prefect API at {api_url}, which only this machine reaches, but Ray nodes run on {', '.join(elsewhere[:3])}: "
            "start a Prefect server they reach and set PREFECT_API_URL to it for the flow process.")


def _warn(message: str) -> None:
    """To the flow run's log (the UI) inside a run, else to this module's logger."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        get_logger(__name__).warning(message)


@contextlib.contextmanager
def _reporting_to(api_url: str | None) -> Iterator[None]:
    """PREFECT_API_URL = the run's API in this process's settings, which prefect-ray sends with every task to its worker."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not api_url or PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


@contextlib.contextmanager
def open_task_runner(
    kind: str, ray_address: str | None, max_workers: int | None, num_gpus_per_worker: float, embeds: bool = False, allow_cpu: bool = False
) -> Iterator[TaskRunner]:
    """The run's task runner, started; on Ray, connected with the project's runtime_env and reporting to the run's API.

    `embeds`: the runner will run embedding tasks, so a Ray without any GPU is refused unless `allow_cpu`.
    """
    api_url = flow_api_url() if kind == "ray" else None
    runner = ray_task_runner(ray_address, api_url) if kind == "ray" else ThreadPoolTaskRunner(max_workers=max_workers or default_max_workers(num_gpus_per_worker))
    clear_stop()
    global _connected_cluster_gpus
    with _reporting_to(api_url), runner:
        try:
            if kind == "ray":
                # One question to the cluster per run, not one per submitted task; the refusal and every GPU request follow it.
                _connected_cluster_gpus = ray_cluster_gpus()
                if embeds and not allow_cpu and _connected_cluster_gpus == 0:
                    refuse_cpu_only_ray(ray_address)
                warning = api_unreachable_warning(api_url)
                if warning:
                    _warn(warning)
            yield runner
        except BaseException as interrupt:
            if not isinstance(interrupt, (Exception, GeneratorExit)):
                # Ctrl-C or SIGTERM: running tasks stop at their next batch instead of being waited for.
                request_stop()
            raise
        finally:
            _connected_cluster_gpus = None


@contextlib.contextmanager
def gpu_remote_options(runner: TaskRunner, num_gpus_per_worker: float) -> Iterator[None]:
    """On a Ray cluster with GPUs, each embedding task asks Ray for `num_gpus_per_worker` of a GPU, so only GPU nodes run it."""
    if runner.__class__.__name__ != "RayTaskRunner" or ray_cluster_gpus() == 0:
        yield
        return
    from prefect_ray.context import remote_options

    with remote_options(num_gpus=num_gpus_per_worker):
        yield
