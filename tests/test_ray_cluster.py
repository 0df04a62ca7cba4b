"""Ray as clusters are deployed: the flow on a head node without GPU, embedding only on the node that declares one.

A real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, as Ray's own multi-node tests do):
the head declares no GPU and runs the flow, the other node declares `num_gpus=1` (Ray schedules by declared
resources; the work itself runs on the CPU). Inputs, store and outputs are on moto's S3. The flow reports to
the test's Prefect API as a command-line run reports to its local one (no PREFECT_API_URL anywhere), so the
workers can only find that API through what the flow sends them. Ray's state API says where each task ran;
the Prefect API says what it recorded; /proc says which Prefect servers ran.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.nsfw_filter import nsfw_filter
from tasks.errors import UserError
from tests.test_flow_filter import build_dataset, flow_run_task_runs, upload_dir

pytestmark = pytest.mark.usefixtures("prefect_api")

PREFECT_SERVER_APP = "prefect.server.api.server:create_app"  # what a temporary Prefect server runs (uvicorn --factory)


def _descendants(root_pid: int) -> dict[int, str]:
    """Processes below `root_pid` (from /proc), pid -> command line."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                commands[int(entry)] = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry))
    found: dict[int, str] = {}
    stack = list(children.get(root_pid, []))
    while stack:
        pid = stack.pop()
        found[pid] = commands.get(pid, "")
        stack.extend(children.get(pid, []))
    return found


class PrefectServerWatch:
    """Every Prefect server process started below this process while it watches (sampled every 0.1 s)."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            self.seen.update({pid: command for pid, command in _descendants(os.getpid()).items() if PREFECT_SERVER_APP in command})

    def __enter__(self) -> PrefectServerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture()
def two_node_cluster(s3_endpoint, monkeypatch) -> Iterator[tuple[str, str]]:
    """(address, GPU node id) of a Ray cluster: a head with one CPU and no GPU, and a node with one CPU and one declared GPU."""
    from ray.cluster_utils import Cluster

    # The nodes' processes inherit this environment (S3 endpoint and credentials, as a real node has its own), but
    # no Prefect API: the workers must get the run's from the flow.
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": True, "dashboard_port": 0})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster.address, gpu_node.node_id
    finally:
        cluster.shutdown()


def s3_outputs(fs, prefix: str) -> tuple[dict[str, list], dict[str, bytes]]:
    """The run's scores (all rows, in partition order) and its filtered shards' bytes by name."""
    rows: dict[str, list] = {}
    for path in sorted(fs.glob(f"{prefix}/scores/*.parquet")):
        with fs.open(path, "rb") as handle:
            for name, values in pq.read_table(handle).to_pydict().items():
                rows.setdefault(name, []).extend(values)
    shards = {Path(path).name: fs.cat_file(path) for path in sorted(fs.glob(f"{prefix}/shards/*.tar"))}
    return rows, shards


def shipped_code_and_api(address: str, api_url: str) -> dict[str, str]:
    """Where a worker given the runner's runtime_env imports the project from, and the Prefect API it is told."""
    import ray

    from flows.runners import ray_runtime_env

    @ray.remote(num_cpus=0)
    def probe() -> dict[str, str]:
        import flows
        import tasks

        return {"flows": flows.__file__, "tasks": tasks.__file__, "api": os.environ.get("PREFECT_API_URL", ""),
                "weights_cache": os.environ.get("NSFW_CURATOR_WEIGHTS_CACHE", "")}

    ray.init(address=address, runtime_env=ray_runtime_env(api_url))
    try:
        return ray.get(probe.remote())
    finally:
        ray.shutdown()


def test_embedding_runs_on_the_gpu_node_and_every_task_run_reports_to_the_runs_api(tmp_path, s3_bucket, two_node_cluster, tiny_clip_768, laion_dir,
                                                                                   monkeypatch):
    import s3fs
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from ray.util.state import list_tasks

    address, gpu_node_id = two_node_cluster
    dataset = build_dataset(tmp_path, good_shards=1, per_shard=4)  # 3 shards: good, every bad case, truncated
    fs = s3fs.S3FileSystem()
    upload_dir(fs, dataset.input_dir, f"{s3_bucket}/in")
    # The weights too are in the bucket (the config JSON stays local: it is the model's name); every machine fetches its own copy.
    config_path, checkpoint_path = tiny_clip_768
    fs.put_file(str(checkpoint_path), f"{s3_bucket}/weights/{checkpoint_path.name}")
    fs.put_file(str(laion_dir / "vit_l_14.safetensors"), f"{s3_bucket}/weights/vit_l_14.safetensors")
    parameters = dict(file_paths=f"s3://{s3_bucket}/in", files_per_partition=1, task_batch_size=4, clip_model=str(config_path),
                      clip_pretrained=f"s3://{s3_bucket}/weights/{checkpoint_path.name}", nsfw_weights=f"s3://{s3_bucket}/weights/vit_l_14.safetensors",
                      images_per_tar=3, model_dir=str(tmp_path / "models"), num_gpus_per_worker=0.5)
    # Set after the nodes started, so their workers see it only if the runner forwards it.
    monkeypatch.setenv("NSFW_CURATOR_WEIGHTS_CACHE", str(tmp_path / "weights-cache"))

    # No PREFECT_API_URL in this process either: the flow run reports to Prefect's local server (the test's API is
    # registered as it), as a command-line run without a configured API does.
    api_server = SubprocessASGIServer._instances[None]
    # Ray puts the flow process's working directory on its workers' paths (it assumes every node has it); here it
    # holds no project, so workers import only the code the runner shipped, as on separate machines.
    monkeypatch.chdir(tmp_path)
    with PrefectServerWatch() as servers, temporary_settings(restore_defaults={PREFECT_API_URL}):
        state = nsfw_filter(**parameters, output_path=f"s3://{s3_bucket}/out-ray", cache_path=f"s3://{s3_bucket}/cache-ray",
                            task_runner="ray", ray_address=address, return_state=True)
    assert state.is_completed(), state.message
    assert set(servers.seen) <= {api_server.server_process.pid}, f"Prefect servers started beside the run's API: {servers.seen}"

    # Every embedding task ran on the GPU node; the head, where the flow ran, ran none.
    embedding = list_tasks(address=address, filters=[("name", "=", "embed-partition")], detail=True, raise_on_missing_output=False)
    assert len(embedding) == 3 and {task.node_id for task in embedding} == {gpu_node_id}
    filtering = list_tasks(address=address, filters=[("name", "=", "filter-partition")], detail=True, raise_on_missing_output=False)
    assert len(filtering) == 3 and all(task.state == "FINISHED" for task in embedding + filtering)
    # What the runner gives its workers: the shipped packages, not this checkout, and the run's API.
    shipped = shipped_code_and_api(address, api_server.api_url)
    checkout = Path(__file__).resolve().parents[1]
    assert all(not Path(shipped[name]).is_relative_to(checkout) and Path(shipped[name]).parts[-2:] == (name, "__init__.py") for name in ("flows", "tasks"))
    assert shipped["api"] == api_server.api_url and shipped["weights_cache"] == str(tmp_path / "weights-cache")

    # Every task run is in the run's own API with its final state.
    task_runs = flow_run_task_runs(state.state_details.flow_run_id)
    names = [run.name.split("-", 1)[0] for run in task_runs]
    assert names.count("embed") == 3 and names.count("filter") == 3
    assert all(run.state is not None and run.state.is_completed() for run in task_runs), [(run.name, run.state) for run in task_runs]

    # The threads runner, on this process, gives the same outputs.
    nsfw_filter(**parameters, output_path=f"s3://{s3_bucket}/out-threads", cache_path=f"s3://{s3_bucket}/cache-threads")
    ray_scores, ray_shards = s3_outputs(fs, f"{s3_bucket}/out-ray")
    threads_scores, threads_shards = s3_outputs(fs, f"{s3_bucket}/out-threads")
    assert len(ray_scores["key"]) == sum(len(keys) for keys in dataset.keys.values())
    for column in ("key", "shard", "passed", "error", "output_shard"):
        assert ray_scores[column] == [value.replace("out-threads", "out-ray") if isinstance(value, str) else value for value in threads_scores[column]], column
    np.testing.assert_allclose(np.array(ray_scores["nsfw_score"], dtype=float), np.array(threads_scores["nsfw_score"], dtype=float), atol=1e-6)
    assert ray_shards == threads_shards and ray_shards


def test_an_embedding_run_on_a_ray_without_gpus_is_refused_unless_cpus_are_allowed(tmp_path, tiny_clip_768, laion_dir, monkeypatch):
    from ray.cluster_utils import Cluster

    from flows.parameters import read_flow_signature

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dataset = build_dataset(tmp_path, good_shards=1, per_shard=2)
    config_path, checkpoint_path = tiny_clip_768
    parameters = dict(file_paths=[url for url in dataset.keys][:1], clip_model=str(config_path), clip_pretrained=str(checkpoint_path),
                      nsfw_weights=str(laion_dir / "vit_l_14.safetensors"), model_dir=str(tmp_path / "models"), task_runner="ray")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        with pytest.raises(UserError, match=r"^the Ray cluster at \S+ has no GPU \(1 node\(s\), 1 CPUs\), so CLIP would run on CPUs; .*--allow-cpu"):
            nsfw_filter(**parameters, output_path=str(tmp_path / "refused"), cache_path=str(tmp_path / "cache"), ray_address=cluster.address)
        assert not (tmp_path / "refused" / "scores").exists() and not (tmp_path / "cache").exists()  # refused before any task ran
        result = nsfw_filter(**parameters, output_path=str(tmp_path / "allowed"), cache_path=str(tmp_path / "cache"), ray_address=cluster.address,
                             allow_cpu=True)
    finally:
        cluster.shutdown()
    assert result["samples"] == 2 and result["errors"] == 0
    # The command line offers it (read from the flow's signature), off by default.
    allow_cpu = next(parameter for parameter in read_flow_signature("flows.nsfw_filter", "nsfw_filter").parameters if parameter.name == "allow_cpu")
    assert allow_cpu.annotation is bool and allow_cpu.default is False
