"""The any-host variant (deployments/any-host/prefect.yaml): a worker on a host without the deploying checkout.

A bare copy of this repository's HEAD, reached over file://, stands in for the remote every host clones
from; a clone of it at another path is the deploying checkout, from which the README's commands create
the pool and deploy. The "second host" is a worker started from an unrelated directory, without
PYTHONPATH, in an environment that holds the project's dependencies but not the project (its
site-packages see this interpreter's packages except nsfw-curator's), so the code its runs execute can
only come from the deployment's pull steps. After deploying, a newer commit is pushed to the remote's
branch. The tests check what the server holds, that a tiny filter run on that worker completes with its
outputs, that the worker's environment then holds the deployed commit (not the branch's newer tip, not
this checkout), and that a deploy is refused, in one sentence, while the code has uncommitted or
unpushed changes. Everything started is stopped at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.parquet as pq
import pytest
import yaml

from flows.serve import dedup_after_filter_trigger
from tests.support.filter_parameters import local_filter_parameters
from tests.support.prefect_server import PrefectServer, prefect_server, wait_for
from tests.support.tars import shard_of_good_samples, write_tar

pytestmark = pytest.mark.deployments

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = Path("deployments") / "any-host" / "prefect.yaml"  # relative to a checkout's root
FILTER_DEPLOYMENT = "nsfw-filter-any-host"
DEDUP_DEPLOYMENT = "image-dedup-any-host"
BRANCH = "main"  # the remote's branch the deploying checkout tracks

# The README's commands for this variant, run from the deploying checkout's root.
CREATE_POOL = ["prefect", "work-pool", "create", "gpu-any-host", "--type", "process"]
DEPLOY = ["prefect", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)]

# Test-only settings: the worker looks for work every 2 s (not 10 s); SQLite's lock is waited for up to 60 s.
FAST_LOOPS = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_DATABASE_TIMEOUT": "60"}
RUN_TIMEOUT_S = 240
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# Commits the test makes are the same on every machine, whatever the user's git configuration.
GIT_IDENTITY = ["-c", "user.name=nsfw-curator tests", "-c", "user.email=tests@nsfw-curator.invalid", "-c", "commit.gpgsign=false"]


@dataclass
class SecondHost:
    server: PrefectServer
    remote_url: str  # file:// URL of the bare repository every host clones from
    deployer: Path  # the deploying checkout (another path than this one)
    deployed_sha: str  # the commit deployed: this repository's HEAD
    tip_sha: str  # the remote branch's newer commit, pushed after deploying
    environment: Path  # the worker's environment (dependencies, no project)
    elsewhere: Path  # the worker's working directory, unrelated to any checkout
    worker_env: dict[str, str]  # what differs in the worker's environment variables


def git(*args: str, cwd: Path, strip: bool = True) -> str:
    """What a git command printed (stripped unless told: file contents keep their last newline)."""
    result = subprocess.run(["git", *GIT_IDENTITY, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"git {' '.join(args)} exited with {result.returncode}:\n{result.stderr}"
    return result.stdout.strip() if strip else result.stdout


def make_remote(root: Path) -> tuple[Path, str]:
    """A bare copy of this repository whose `main` is this checkout's HEAD; (its path, HEAD)."""
    sha = git("rev-parse", "HEAD", cwd=REPO_ROOT)
    bare = root / "remote" / "nsfw-curator.git"
    git("clone", "--bare", "--quiet", str(REPO_ROOT), str(bare), cwd=root)
    git("update-ref", f"refs/heads/{BRANCH}", sha, cwd=bare)
    git("symbolic-ref", "HEAD", f"refs/heads/{BRANCH}", cwd=bare)
    return bare, sha


def environment_without_the_project(root: Path) -> Path:
    """A virtual environment that imports this interpreter's packages except nsfw-curator (a host's own env).

    A plain path in a .pth file adds the folder without running the .pth files in it, so this
    interpreter's editable install of the checkout is not active there.
    """
    environment = root / "host-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True, timeout=120)
    dependencies = root / "host-dependencies"
    dependencies.mkdir()
    for site_dir in dict.fromkeys(Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")):
        for entry in site_dir.iterdir():
            if entry.name.startswith(("__editable__", "nsfw_curator")) or entry.suffix == ".pth":
                continue
            link = dependencies / entry.name
            if not link.exists():
                link.symlink_to(entry)
    [site_packages] = (environment / "lib").glob("python*/site-packages")
    (site_packages / "host-dependencies.pth").write_text(f"{dependencies}\n")
    return environment


def run_in_environment(host: SecondHost, code: str) -> str:
    """Run Python code with the worker's interpreter, environment variables and working directory."""
    env = {**host.server.env, **host.worker_env}
    result = subprocess.run(
        [str(host.environment / "bin" / "python"), "-c", code], cwd=host.elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def second_host(tmp_path_factory) -> SecondHost:
    if not (REPO_ROOT / PREFECT_FILE).exists():
        pytest.skip(f"{PREFECT_FILE} is not in this checkout")
    root = tmp_path_factory.mktemp("any-host")
    bare, deployed_sha = make_remote(root)
    remote_url = bare.as_uri()
    deployer = root / "deployer"
    git("clone", "--quiet", "--branch", BRANCH, remote_url, str(deployer), cwd=root)
    environment = environment_without_the_project(root)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    test_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join([str(environment / "bin"), *(entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry != test_bin)])
    # The host's environment activated: its python first on PATH; nothing points at a checkout.
    worker_env = {"PATH": path, "VIRTUAL_ENV": str(environment), "PYTHONPATH": ""}
    with prefect_server(root / "server", settings=FAST_LOOPS) as server:
        server.run(CREATE_POOL, cwd=deployer)
        output = server.run(DEPLOY, cwd=deployer)
        assert f"nsfw-filter/{FILTER_DEPLOYMENT}" in output and f"image-dedup/{DEDUP_DEPLOYMENT}" in output, output
        # The branch moves on after deploying; runs must still execute the deployed commit.
        with (deployer / "flows" / "__init__.py").open("a") as module:
            module.write("# a commit pushed after deploying\n")
        git("commit", "--quiet", "-am", "A commit pushed after deploying", cwd=deployer)
        git("push", "--quiet", "origin", BRANCH, cwd=deployer)
        tip_sha = git("rev-parse", "HEAD", cwd=deployer)
        host = SecondHost(server, remote_url, deployer, deployed_sha, tip_sha, environment, elsewhere, worker_env)
        server.start("second-host-worker", [str(environment / "bin" / "python"), "-m", "prefect", "worker", "start", "--pool", "gpu-any-host", "--name", "second-host", "--limit", "1"], cwd=elsewhere, extra_env=worker_env)  # fmt: skip
        yield host


def test_deployments_clone_the_deployed_commit(second_host):
    server = second_host.server
    pool = server.get("/work_pools/gpu-any-host")
    assert pool["type"] == "process"
    for name in (f"nsfw-filter/{FILTER_DEPLOYMENT}", f"image-dedup/{DEDUP_DEPLOYMENT}"):
        deployment = server.get(f"/deployments/name/{name}")
        assert deployment["work_pool_name"] == "gpu-any-host" and deployment["global_concurrency_limit"]["limit"] == 1
        clone, install = deployment["pull_steps"]
        # The deployer's origin and HEAD, recorded when deploying; the clone's directory is known only at run time.
        assert clone["prefect.deployments.steps.git_clone"] == {
            "id": "clone", "repository": second_host.remote_url, "commit_sha": second_host.deployed_sha, "clone_directory_name": "nsfw-curator",
        }  # fmt: skip
        assert install["prefect.deployments.steps.run_shell_script"]["directory"] == "{{ clone.directory }}"
        assert "--no-deps" in install["prefect.deployments.steps.run_shell_script"]["script"]


def test_the_worker_without_a_checkout_runs_the_deployed_commit(second_host, tmp_path, tiny_clip_768, laion_dir):
    server = second_host.server
    # Before any run the worker's environment has no nsfw-curator: only the pull steps can bring it.
    probe = "import importlib.util as u; print([name for name in ('flows', 'tasks') if u.find_spec(name)])"
    assert run_in_environment(second_host, probe).strip() == "[]"

    shard_keys = [[f"{s:03d}/{j:04d}" for j in range(3)] for s in range(2)]
    for s, keys in enumerate(shard_keys):
        write_tar(tmp_path / "in" / f"part-{s:06d}.tar", shard_of_good_samples(keys, size=(64, 48)))
    parameters = local_filter_parameters(tmp_path, tiny_clip_768, laion_dir)
    # Only the filter run on this worker: the dedup run its completion would trigger is test_deployments.py's.
    [automation] = [a for a in server.post("/automations/filter", {}) if a["name"] == "image-dedup after nsfw-filter"]
    server.patch(f"/automations/{automation['id']}", {"enabled": False})
    deployment = server.get(f"/deployments/name/nsfw-filter/{FILTER_DEPLOYMENT}")
    created = server.post(f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})

    def final() -> dict | None:
        run = server.get(f"/flow_runs/{created['id']}")
        return run if run["state_type"] in TERMINAL_STATES else None

    run = wait_for(final, RUN_TIMEOUT_S, "the second host's flow run to finish", interval_s=2, logs=server.logs())
    logs = server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC"})
    log_text = "\n".join(entry["message"] for entry in logs)
    assert run["state_type"] == "COMPLETED", f"{run['state_type']}: {run['state']['message']}\n{log_text[-6000:]}"
    assert "Executing deployment step: git_clone" in log_text and "Executing deployment step: run_shell_script" in log_text

    scores: dict[str, list] = {}
    for part in sorted((tmp_path / "out" / "scores").glob("*.parquet")):
        for column, values in pq.read_table(part).to_pydict().items():
            scores.setdefault(column, []).extend(values)
    assert scores["key"] == [key for keys in shard_keys for key in keys]
    assert all(error is None and 0.0 <= score <= 1.0 for score, error in zip(scores["nsfw_score"], scores["error"]))
    kept = set()
    for shard in (tmp_path / "out" / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            kept |= {member.name.split(".", 1)[0] for member in tar.getmembers()}
    assert kept == {key for key, passed in zip(scores["key"], scores["passed"]) if passed}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["samples"] == 6

    # The run installed its clone into the worker's environment.
    where = (
        "import importlib.metadata as m, json, flows;"
        "print(json.dumps({'module': flows.__file__, 'direct_url': json.loads(m.distribution('nsfw-curator').read_text('direct_url.json'))['url']}))"
    )
    installed = json.loads(run_in_environment(second_host, where))
    module = Path(installed["module"])
    assert module.is_relative_to(second_host.environment), installed  # the worker's own environment, not a checkout
    source = Path(unquote(urlparse(installed["direct_url"]).path))
    assert source.name == "nsfw-curator"  # the pull step's clone (clone_directory_name) ...
    assert not source.is_relative_to(REPO_ROOT) and not source.is_relative_to(second_host.deployer)  # ... on the worker
    # The deployed commit's code, not the newer tip of the branch.
    assert module.read_text() == git("show", f"{second_host.deployed_sha}:flows/__init__.py", cwd=second_host.deployer, strip=False)
    assert module.read_text() != git("show", f"{second_host.tip_sha}:flows/__init__.py", cwd=second_host.deployer, strip=False)


def test_deploy_is_refused_while_the_code_is_not_pushed(second_host):
    server, deployer = second_host.server, second_host.deployer
    before = server.get(f"/deployments/name/nsfw-filter/{FILTER_DEPLOYMENT}")["pull_steps"]
    with (deployer / "tasks" / "__init__.py").open("a") as module:
        module.write("# an uncommitted change\n")
    with pytest.raises(AssertionError, match="flows/, tasks/ or pyproject.toml has uncommitted changes: commit and push them"):
        server.run(DEPLOY, cwd=deployer)
    git("commit", "--quiet", "-am", "A commit that is not pushed", cwd=deployer)
    short_sha = git("rev-parse", "--short", "HEAD", cwd=deployer)
    with pytest.raises(AssertionError, match=f"commit {short_sha} is on no branch of origin: push it"):
        server.run(DEPLOY, cwd=deployer)
    # Refused before anything reached the server: the deployment still clones the deployed commit.
    assert server.get(f"/deployments/name/nsfw-filter/{FILTER_DEPLOYMENT}")["pull_steps"] == before


def test_dedup_trigger_is_the_one_serve_declares():
    deployments = {d["name"]: d for d in yaml.safe_load((REPO_ROOT / PREFECT_FILE).read_text())["deployments"]}
    assert set(deployments) == {FILTER_DEPLOYMENT, DEDUP_DEPLOYMENT}
    assert deployments[DEDUP_DEPLOYMENT]["triggers"] == [dedup_after_filter_trigger(FILTER_DEPLOYMENT)]
