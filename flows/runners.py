"""Task runners: threads on one machine, or Ray (a local Ray, or an existing cluster) through prefect-ray."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.models.gpu import gpu_count, simulated_gpu_count, slots_per_gpu
from tasks.stop import clear_stop, request_stop

# Settings of this project that Ray worker processes must see as the driver does.
_FORWARDED_ENV_PREFIX = "NSFW_CURATOR_"


def default_max_workers(num_gpus_per_worker: float) -> int:
    """Partitions in flight on one machine: every GPU slot busy plus one partition writing; 4 on CPU.

    Small tasks spend much of their time waiting on storage and the Prefect API, so a few in flight
    hide that latency; CLIP itself is shared by the threads of a worker (one model in memory).
    """
    gpus = gpu_count()
    return gpus * slots_per_gpu(num_gpus_per_worker) + 1 if gpus else 4


def ray_task_runner(ray_address: str | None) -> TaskRunner:
    from prefect_ray import RayTaskRunner

    if ray_address:
        return RayTaskRunner(address=ray_address)
    env_vars = {name: value for name, value in os.environ.items() if name.startswith(_FORWARDED_ENV_PREFIX)}
    init_kwargs: dict = {"runtime_env": {"env_vars": env_vars}, "include_dashboard": False}
    if simulated_gpu_count():
        init_kwargs["num_gpus"] = simulated_gpu_count()
    return RayTaskRunner(init_kwargs=init_kwargs)


@contextlib.contextmanager
def open_task_runner(kind: str, ray_address: str | None, max_workers: int | None, num_gpus_per_worker: float) -> Iterator[TaskRunner]:
    runner = ray_task_runner(ray_address) if kind == "ray" else ThreadPoolTaskRunner(max_workers=max_workers or default_max_workers(num_gpus_per_worker))
    clear_stop()
    with runner:
        try:
            yield runner
        except BaseException as interrupt:
            if not isinstance(interrupt, (Exception, GeneratorExit)):
                # Ctrl-C or SIGTERM: running tasks stop at their next batch instead of being waited for.
                request_stop()
            raise


@contextlib.contextmanager
def gpu_remote_options(runner: TaskRunner, num_gpus_per_worker: float) -> Iterator[None]:
    """On Ray with GPUs, each embedding task asks Ray for `num_gpus_per_worker` of a GPU."""
    if runner.__class__.__name__ != "RayTaskRunner" or gpu_count() == 0:
        yield
        return
    from prefect_ray.context import remote_options

    with remote_options(num_gpus=num_gpus_per_worker):
        yield
