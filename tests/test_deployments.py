"""The deployments of deployments/, run the way the README says: a real server, the pool, `prefect deploy`, workers.

One Prefect server (`prefect server start` on 127.0.0.1, its own home and SQLite database) serves the
whole module. The README's commands run as subprocesses from the repository root: create the work
pool, deploy everything in deployments/prefect.yaml, start the workers (the script's, and a plain
`prefect worker start` without a run limit). Then two flow runs are created at once through the REST
route the UI's "Run" button calls, on real tars, a tiny random-weight CLIP and the real LAION head, and
the tests check the outputs, run and task names, progress and artifacts, that the two runs never held
the (simulated) GPU at once, the GPU's global concurrency limit, the dedup run the completion triggers,
the nightly schedule, the refusal of out-of-range parameters, `nsfw-curator serve`, the Kubernetes
variant, and (with Chromium) the UI's pages. Everything started is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flows.gpu_limits import gpu_limit_name
from flows.serve import DEDUP_DEPLOYMENT, FILTER_DEPLOYMENT, dedup_after_filter_trigger
from tasks.models.gpu import GPU_JOURNAL_ENV, SIMULATED_GPUS_ENV
from tests.support.filter_parameters import local_filter_parameters
from tests.support.prefect_server import PrefectServer, prefect_server, wait_for
from tests.support.tars import output_shard_keys, shard_of_good_samples, write_tar

pytestmark = pytest.mark.deployments

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"
KUBERNETES_FILE = REPO_ROOT / "deployments" / "kubernetes" / "prefect.yaml"
CHROMIUM = Path("/usr/bin/chromium")

# The README's "Deployments" commands, run from the repository root in this order.
CREATE_POOL = ["prefect", "work-pool", "create", "gpu-pool", "--type", "process"]
DEPLOY = ["prefect", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"]
START_WORKERS = ["deployments/start-workers.sh"]
PLAIN_WORKER = ["prefect", "worker", "start", "--pool", "gpu-pool", "--name", "plain"]  # no --limit: the deployment's limit must hold
# The Kubernetes variant's commands (no cluster here: the pool and the deployments are checked as the server holds them).
CREATE_K8S_POOL = ["prefect", "work-pool", "create", "gpu-k8s", "--type", "kubernetes", "--base-job-template", "deployments/kubernetes/gpu-job-template.json"]
DEPLOY_K8S = ["prefect", "deploy", "--all", "--prefect-file", "deployments/kubernetes/prefect.yaml"]

# Test-only server settings: the scheduler and the worker look for work every 2 s instead of 60 s / 10 s. SQLite's
# lock is waited for up to 60 s (not 10 s): two workers, their runs and the server share one database file on a busy host.
FAST_LOOPS = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_WORKER_QUERY_SECONDS": "2",
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
}
RUN_TIMEOUT_S = 240
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Deployed:
    server: PrefectServer
    filter_id: str
    dedup_id: str
    deployed_at: float  # time.monotonic() when `prefect deploy` returned
    gpu_journal: Path  # one line per GPU slot use by the workers' flow runs (tasks/models/gpu.py)
    finished_runs: dict  # flow runs later tests look at, by what they were


def pool_name() -> str:
    return yaml.safe_load(PREFECT_FILE.read_text())["definitions"]["work_pools"]["gpu_pool"]["name"]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Deployed:
    if not (REPO_ROOT / "flows" / "dedup.py").exists():
        pytest.skip("flows/dedup.py (the image-dedup flow deployments/prefect.yaml deploys) is not in this checkout yet")
    root = tmp_path_factory.mktemp("prefect-deployments")
    journal = root / "gpu-journal.txt"
    # The workers' runs see one (simulated) GPU and journal every use of it.
    gpu_env = {SIMULATED_GPUS_ENV: "1", GPU_JOURNAL_ENV: str(journal)}
    with prefect_server(root / "server", settings=FAST_LOOPS) as server:
        server.run(CREATE_POOL, cwd=REPO_ROOT)
        output = server.run(DEPLOY, cwd=REPO_ROOT)
        deployed_at = time.monotonic()
        assert "nsfw-filter/nsfw-filter-gpu" in output and "image-dedup/image-dedup-gpu" in output, output
        server.start("workers", START_WORKERS, cwd=REPO_ROOT, extra_env=gpu_env)
        server.start("plain-worker", PLAIN_WORKER, cwd=REPO_ROOT, extra_env=gpu_env)
        filter_id = server.get("/deployments/name/nsfw-filter/nsfw-filter-gpu")["id"]
        dedup_id = server.get("/deployments/name/image-dedup/image-dedup-gpu")["id"]
        wait_for(
            lambda: len(server.post(f"/work_pools/{pool_name()}/workers/filter", {"workers": {"status": {"any_": ["ONLINE"]}}})) == 2,
            90,
            "both workers on the pool to come online",
            logs=server.logs(),
        )
        yield Deployed(server, filter_id, dedup_id, deployed_at, journal, {})


def flow_runs(server: PrefectServer, deployment_id: str, auto_scheduled: bool | None = None) -> list[dict]:
    """The deployment's flow runs, earliest first; only those the scheduler made (or did not) when asked."""
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return [run for run in server.post("/flow_runs/filter", body) if auto_scheduled is None or run["auto_scheduled"] is auto_scheduled]


def wait_until_final(server: PrefectServer, flow_run_id: str) -> dict:
    def final() -> dict | None:
        run = server.get(f"/flow_runs/{flow_run_id}")
        return run if run["state_type"] in TERMINAL_STATES else None

    run = wait_for(final, RUN_TIMEOUT_S, f"flow run {flow_run_id} to finish", interval_s=2, logs=server.logs())
    if run["state_type"] != "COMPLETED":
        logs = server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"})
        text = "\n".join(entry["message"] for entry in logs)[-6000:]
        raise AssertionError(f"flow run {run['name']} ended {run['state_type']}: {run['state']['message']}\n{text}")
    return run


def build_dataset(root: Path) -> dict[str, list[str]]:
    """Three shards of four good samples; sample j of every shard shows the same picture (near-duplicates for dedup)."""
    keys = {}
    for s in range(3):
        shard_keys = [f"{s:03d}/{j:04d}" for j in range(4)]
        keys[str(write_tar(root / f"part-{s:06d}.tar", shard_of_good_samples(shard_keys, size=(80, 64))))] = shard_keys
    return keys


def test_deployments_are_declared_for_the_gpu_pool(deployed):
    server = deployed.server
    pool = server.get(f"/work_pools/{pool_name()}")
    assert pool["type"] == "process"
    for deployment_id, flow_name in ((deployed.filter_id, "nsfw-filter"), (deployed.dedup_id, "image-dedup")):
        deployment = server.get(f"/deployments/{deployment_id}")
        assert server.get(f"/flows/{deployment['flow_id']}")["name"] == flow_name
        assert deployment["work_pool_name"] == pool["name"]
        assert deployment["job_variables"]["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        # a worker's own CUDA_VISIBLE_DEVICES (one GPU per worker) must not be overridden by the deployment
        assert "CUDA_VISIBLE_DEVICES" not in deployment["job_variables"]["env"]
        # the code comes from this checkout, not from a clone or an upload
        assert deployment["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}]
        # one run of each at a time, whichever worker polls; the API checks parameters against the schema
        assert deployment["global_concurrency_limit"]["limit"] == 1 and deployment["enforce_parameter_schema"] is True
        schema = deployment["parameter_openapi_schema"]
        assert {"file_paths", "output_path", "cache_path", "clip_model"} <= set(schema["properties"])
        assert all(schema["properties"][name].get("description") for name in ("file_paths", "output_path", "cache_path"))
        assert deployment["parameters"]["file_paths"] and deployment["parameters"]["output_path"]  # a filled form
    filter_deployment = server.get(f"/deployments/{deployed.filter_id}")
    threshold = filter_deployment["parameter_openapi_schema"]["properties"]["score_threshold"]
    assert (threshold["minimum"], threshold["maximum"]) == (0, 1)  # the range the UI form and the API enforce
    # The policy and the signals are typed structures: the UI draws a form of rules and signals from their definitions.
    definitions = filter_deployment["parameter_openapi_schema"]["definitions"]
    assert {"Policy", "Rule", "Condition", "SignalSpec"} <= set(definitions)
    assert set(definitions["Rule"]["properties"]) == {"signal", "at_least", "below", "matched", "name", "when"}
    [schedule] = filter_deployment["schedules"]
    assert schedule["active"] is False and schedule["schedule"]["cron"] == "0 2 * * *"


def journal_intervals(journal: Path) -> dict[int, list[tuple[float, float]]]:
    """GPU slot uses by process: pid -> [(start, end)]."""
    uses: dict[int, list[tuple[float, float]]] = {}
    for line in journal.read_text().splitlines():
        _device, start, end, pid = line.split()
        uses.setdefault(int(pid), []).append((float(start), float(end)))
    return uses


def test_ui_run_on_a_worker_writes_outputs_and_starts_dedup(deployed, tmp_path, tiny_clip_768, laion_dir):
    server = deployed.server
    keys = build_dataset(tmp_path / "in")
    parameters = local_filter_parameters(tmp_path, tiny_clip_768, laion_dir, images_per_tar=3)
    # What the UI's "Run > Custom run" form posts: a bad value is refused before any run exists.
    refused = server.client.post(f"/deployments/{deployed.filter_id}/create_flow_run", json={"parameters": {**parameters, "score_threshold": 1.5}})
    assert refused.status_code == 409 and "score_threshold" in refused.text and "1.5" in refused.text, refused.text
    # Two runs submitted together (two workers poll the pool): the deployment's limit runs them one after the other.
    # (Each with its own embedding store, so both run CLIP on the GPU.)
    created = server.post(f"/deployments/{deployed.filter_id}/create_flow_run", {"parameters": parameters})
    other = server.post(f"/deployments/{deployed.filter_id}/create_flow_run", {"parameters": {**parameters, "output_path": str(tmp_path / "other"), "cache_path": str(tmp_path / "other-cache")}})
    run = wait_until_final(server, created["id"])
    other_run = wait_until_final(server, other["id"])
    assert run["parameters"]["file_paths"] == parameters["file_paths"]
    assert run["name"] == "in-t0.5"  # the dataset's folder and the threshold
    first, second = sorted((run, other_run), key=lambda r: r["start_time"])
    assert first["end_time"] <= second["start_time"]
    uses = journal_intervals(deployed.gpu_journal)
    assert len(uses) == 2  # both runs embedded on the GPU, each in its own process
    (first_uses, second_uses) = sorted(uses.values())
    assert max(end for _, end in first_uses) <= min(start for start, _ in second_uses)  # never the GPU at once
    deployed.finished_runs["filter"] = run

    # The card's four task kinds: the listing named by the dataset, the rest by partition and first shard.
    task_runs = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"})
    expected_names = ["partition-in", *(f"{stage}-p{i:05d}-part-{i:06d}" for stage in ("read", "embed", "filter") for i in range(3))]
    assert sorted(t["name"] for t in task_runs) == sorted(expected_names)
    # Progress reached 100%; the throughput table, the counts and the histogram are there; no link a browser refuses.
    artifacts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200})
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert [a["data"] for a in progress] == [100.0]
    by_key = {a["key"]: a for a in sorted(artifacts, key=lambda a: a["created"]) if a["key"]}  # a key's latest version
    throughput = {row["what"]: row["value"] for row in json.loads(by_key["nsfw-filter-throughput"]["data"])}
    assert throughput["partitions done"] == "3 of 3 (100%)" and throughput["images"] == "12" and throughput["ETA"] == "done"
    assert "← threshold" in by_key["nsfw-filter-histogram"]["data"]
    assert str(tmp_path / "out" / "summary.json") in by_key["nsfw-filter-summary"]["data"]
    assert not [a["key"] for a in artifacts if "file://" in json.dumps(a["data"])]
    # The GPU is a global concurrency limit the embedding tasks held (API's list of limits, the UI's Concurrency page).
    limits = {limit["name"]: limit for limit in server.post("/v2/concurrency_limits/filter", {})}
    gpu = limits[gpu_limit_name(0)]
    assert gpu["limit"] == 100 and gpu["active"] is True and gpu["active_slots"] == 0

    scores: dict[str, list] = {}
    for part in sorted((tmp_path / "out" / "scores").glob("*.parquet")):
        for column, values in pq.read_table(part).to_pydict().items():
            scores.setdefault(column, []).extend(values)
    assert list(zip(scores["shard"], scores["key"])) == [(url, key) for url, shard_keys in keys.items() for key in shard_keys]
    assert all(error is None and 0.0 <= score <= 1.0 for score, error in zip(scores["nsfw_score"], scores["error"]))
    assert scores["passed"] == [score < 0.5 for score in scores["nsfw_score"]]
    assert output_shard_keys(tmp_path / "out") == {key for key, passed in zip(scores["key"], scores["passed"]) if passed}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["samples"] == 12 and summary["passed"] == sum(scores["passed"])
    assert list((tmp_path / "cache").rglob("*.parquet"))  # the embedding store the dedup run reads

    # The completion trigger starts image-dedup/image-dedup-gpu on the same dataset, store and models (once per filter run).
    dedup_output = tmp_path / "out" / "dedup"

    def dedup_of_this_run() -> list[dict]:
        return [r for r in flow_runs(server, deployed.dedup_id) if r["parameters"].get("output_path") == str(dedup_output)]

    [dedup_run] = wait_for(dedup_of_this_run, 60, "the trigger to create an image-dedup run", logs=server.logs())
    expected = {name: parameters[name] for name in ("file_paths", "cache_path", "model_dir", "clip_model", "clip_pretrained")}
    expected |= {"output_path": str(dedup_output), "filter_output_path": parameters["output_path"], "write_dataset": True}
    assert {name: dedup_run["parameters"].get(name) for name in expected} == expected
    assert wait_until_final(server, dedup_run["id"])["name"] == "in-sim0.99"

    # Sample j of every shard is the same picture: the survivors are shard 0's, the rest are duplicates,
    # and the deduplicated copy holds the survivors the filter kept.
    shard_urls = list(keys)
    kept = pq.read_table(dedup_output / "kept.parquet").to_pydict()
    duplicates = pq.read_table(dedup_output / "duplicates.parquet").to_pydict()
    assert set(kept["shard"]) == {shard_urls[0]}
    assert {(url, key) for url in shard_urls[1:] for key in keys[url]} <= set(zip(duplicates["shard"], duplicates["key"]))
    passed = {(url, key) for url, key, ok in zip(scores["shard"], scores["key"], scores["passed"]) if ok}
    assert output_shard_keys(dedup_output) == {key for url, key in zip(kept["shard"], kept["key"]) if (url, key) in passed}


def test_schedule_is_off_until_turned_on_then_schedules_runs(deployed):
    server = deployed.server
    [schedule] = server.get(f"/deployments/{deployed.filter_id}")["schedules"]
    # Let the scheduler loop (every 2 s here) pass several times over the inactive schedule.
    time.sleep(max(0.0, deployed.deployed_at + 10 - time.monotonic()))
    assert flow_runs(server, deployed.filter_id, auto_scheduled=True) == []

    # The UI's schedule toggle.
    server.patch(f"/deployments/{deployed.filter_id}/schedules/{schedule['id']}", {"active": True})
    scheduled = wait_for(
        lambda: flow_runs(server, deployed.filter_id, auto_scheduled=True), 60, "the scheduler to create runs", logs=server.logs()
    )
    deployment_parameters = server.get(f"/deployments/{deployed.filter_id}")["parameters"]
    for run in scheduled:
        assert run["state_type"] == "SCHEDULED"
        assert run["expected_start_time"].split("T")[1].startswith("02:00:00")  # 0 2 * * * in UTC
        assert run["parameters"] == deployment_parameters
    server.patch(f"/deployments/{deployed.filter_id}/schedules/{schedule['id']}", {"active": False})


def test_serve_runs_both_flows_without_a_pool(deployed, tmp_path, tiny_clip_768, laion_dir):
    server = deployed.server
    # `nsfw-curator serve` from the repository root, as the README says for one GPU host.
    server.start("serve", [sys.executable, "-m", "flows.cli", "serve"], cwd=REPO_ROOT)

    def served() -> tuple[dict, dict] | None:
        responses = [server.client.get(f"/deployments/name/{name}") for name in (f"nsfw-filter/{FILTER_DEPLOYMENT}", f"image-dedup/{DEDUP_DEPLOYMENT}")]
        return tuple(r.json() for r in responses) if all(r.status_code == 200 for r in responses) else None

    filter_deployment, dedup_deployment = wait_for(served, 120, "nsfw-curator serve to register its deployments", logs=server.logs())
    assert filter_deployment["work_pool_name"] is None and filter_deployment["global_concurrency_limit"]["limit"] == 1
    build_dataset(tmp_path / "in")
    parameters = local_filter_parameters(tmp_path, tiny_clip_768, laion_dir)
    created = server.post(f"/deployments/{filter_deployment['id']}/create_flow_run", {"parameters": parameters})
    wait_until_final(server, created["id"])
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["samples"] == 12
    # The served dedup deployment's trigger runs image-dedup on what the filter run kept.
    [dedup_run] = wait_for(lambda: flow_runs(server, dedup_deployment["id"]), 60, "the served trigger to create an image-dedup run", logs=server.logs())
    wait_until_final(server, dedup_run["id"])
    assert (tmp_path / "out" / "dedup" / "kept.parquet").is_file()


def test_kubernetes_variant_declares_image_gpus_and_a_clone(deployed):
    server = deployed.server
    server.run(CREATE_K8S_POOL, cwd=REPO_ROOT)
    server.run(DEPLOY_K8S, cwd=REPO_ROOT)
    pool = server.get("/work_pools/gpu-k8s")
    container = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}" and container["image"] == "{{ image }}"
    deployment = server.get("/deployments/name/nsfw-filter/nsfw-filter-k8s")
    assert deployment["job_variables"]["image"] and deployment["job_variables"]["gpus"] == 1
    [pull] = deployment["pull_steps"]
    assert pull["prefect.deployments.steps.git_clone"]["repository"].startswith("https://")
    assert deployment["global_concurrency_limit"]["limit"] == 1


@pytest.mark.parametrize("prefect_file", [PREFECT_FILE, KUBERNETES_FILE], ids=["process-pool", "kubernetes"])
def test_dedup_trigger_is_the_one_serve_declares(prefect_file):
    deployments = {d["name"]: d for d in yaml.safe_load(prefect_file.read_text())["deployments"]}
    [filter_name] = [name for name in deployments if name.startswith("nsfw-filter")]
    [dedup_name] = [name for name in deployments if name.startswith("image-dedup")]
    assert len(set(deployments)) == 2  # distinct names, so an automation names which one it runs
    assert deployments[dedup_name]["triggers"] == [dedup_after_filter_trigger(filter_name)]


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1400,2000", "--virtual-time-budget=15000",
]  # fmt: skip


def require_chromium() -> None:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a missing browser there is a broken setup, not a reason to skip
        pytest.skip(message)


def chromium(page: str, profiles: Path, *mode: str) -> str:
    """Headless Chromium on `page` in `mode` (--dump-dom or --screenshot=FILE); what it printed."""
    profile = profiles / f"profile-{mode[0].lstrip('-').split('=')[0]}"
    result = subprocess.run(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *mode, page], capture_output=True, text=True, timeout=120, start_new_session=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_ui_renders_the_run_form(deployed, tmp_path_factory):
    require_chromium()
    server = deployed.server
    page = f"{server.url}/deployments/deployment/{deployed.filter_id}/run"
    shots = tmp_path_factory.mktemp("ui")
    dom = chromium(page, shots, "--dump-dom")
    for name in ("file_paths", "output_path", "score_threshold", "cache_path"):
        assert name in dom, f"{name} is not on the run form"
    assert "Where filtered shards, scores Parquet and the run summary go" in dom  # a docstring description
    screenshot = shots / "nsfw-filter-run-form.png"
    chromium(page, shots, f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000
    shutil.copy(screenshot, tmp_path_factory.getbasetemp() / screenshot.name)  # kept with pytest's temp files, never in git


def test_ui_shows_named_tasks_progress_and_histogram(deployed, tmp_path_factory):
    require_chromium()
    run = deployed.finished_runs.get("filter")
    if run is None:
        pytest.skip("the worker run of test_ui_run_on_a_worker_writes_outputs_and_starts_dedup did not finish")
    server = deployed.server
    shots = tmp_path_factory.mktemp("ui-run")
    run_page = f"{server.url}/runs/flow-run/{run['id']}"
    run_dom = chromium(run_page, shots, "--dump-dom")
    # The run page names its task runs: the card's four kinds, the partitions' by partition and first shard.
    for name in ("partition-in", "read-p00000-part-000000", "embed-p00000-part-000000", "filter-p00000-part-000000"):
        assert name in run_dom, f"{name} is not on the run page"
    artifacts = {a["key"]: a for a in server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "CREATED_DESC", "limit": 200})[::-1]}
    histogram_page = f"{server.url}/artifacts/artifact/{artifacts['nsfw-filter-histogram']['id']}"
    histogram = chromium(histogram_page, shots, "--dump-dom")
    assert "nsfw_score histogram" in histogram and "← threshold" in histogram  # rendered inline, no image to fetch
    assert "100%" in chromium(f"{server.url}/artifacts/artifact/{artifacts['nsfw-filter-progress']['id']}", shots, "--dump-dom")
    for name, page in (("nsfw-filter-run.png", run_page), ("nsfw-filter-histogram.png", histogram_page)):
        chromium(page, shots, f"--screenshot={shots / name}")
        shutil.copy(shots / name, tmp_path_factory.getbasetemp() / name)  # kept with pytest's temp files, never in git
