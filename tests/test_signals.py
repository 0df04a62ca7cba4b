"""SIGTERM and SIGINT stop a command-line run within seconds; nothing survives it and a re-run completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support.tars import Member, good_sample_members, shard_of_good_samples, write_tar
from tests.support.tiny_clip import make_tiny_clip

REPO_ROOT = Path(__file__).resolve().parents[1]
BIG_SHARD_SAMPLES = 3000  # tens of seconds of embedding per shard: an unstopped run could not end in time


def build_dataset(root: Path) -> dict[str, list[str]]:
    """A small first shard (embedded within seconds) and two big ones (still embedding when the signal comes)."""
    keys = {"part-000000.tar": [f"000/{j:04d}" for j in range(5)]}
    write_tar(root / "in" / "part-000000.tar", shard_of_good_samples(keys["part-000000.tar"], size=(320, 240)))
    template = good_sample_members("x", size=(320, 240))
    for shard in (1, 2):
        name = f"part-{shard:06d}.tar"
        keys[name] = [f"{shard:03d}/{j:05d}" for j in range(BIG_SHARD_SAMPLES)]
        members = [Member(f"{key}.{m.name.split('.', 1)[1]}", m.data) for key in keys[name] for m in template]
        write_tar(root / "in" / name, members)
    return keys


def cli_command(root: Path, clip: tuple[Path, Path], laion_dir: Path) -> list[str]:
    config_path, checkpoint_path = clip
    return [sys.executable, "-m", "flows.cli", "filter", "--file-paths", str(root / "in"), "--output-path", str(root / "out"),
            "--clip-model", str(config_path), "--clip-pretrained", str(checkpoint_path),
            "--nsfw-weights", str(laion_dir / "vit_l_14.safetensors"), "--cache-path", str(root / "cache"),
            "--task-batch-size", "4", "--max-workers", "3", "--images-per-tar", "500"]


def cli_environment(root: Path) -> dict[str, str]:
    """No PREFECT_API_URL: the run starts Prefect's local API server as its own child process."""
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(root / "prefect-home")
    return env


def live_processes_of(run_pid: int) -> list[int]:
    """Processes (not zombies) in the run's process group or whose parent is the run."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_file.read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        state, parent, group = fields[0], int(fields[1]), int(fields[2])
        if state != "Z" and (group == run_pid or parent == run_pid):
            found.append(int(stat_file.parent.name))
    return found


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def stop_midway(root: Path, command: list[str], signum: int) -> subprocess.CompletedProcess:
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=cli_environment(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        small_entry = lambda: any((root / "cache").glob("*/part-000000-*.parquet"))  # noqa: E731
        wait_for(lambda: small_entry() or process.poll() is not None, 600, "the first shard is embedded")
        assert process.poll() is None, process.communicate()[1][-3000:]
        started = time.monotonic()
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert took < 30, f"the run took {took:.1f} s to stop"
    # nothing of the run survives it: its Prefect API server and any other child process are gone
    wait_for(lambda: not live_processes_of(process.pid), 10, "the run's child processes are gone")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def check_complete(root: Path, keys: dict[str, list[str]]) -> None:
    rows = [row for path in sorted((root / "out" / "scores").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    assert [(Path(row["shard"]).name, row["key"]) for row in rows] == [(name, key) for name, shard_keys in keys.items() for key in shard_keys]
    assert all(row["error"] is None and row["nsfw_score"] is not None for row in rows)
    written: list[str] = []
    for shard in sorted((root / "out" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            written.extend(member.name.split(".", 1)[0] for member in tar if member.name.endswith(".jpg"))
    assert sorted(written) == sorted(row["key"] for row in rows if row["passed"])
    assert len(list((root / "out" / "_manifests").glob("*.json"))) == 3


@pytest.mark.parametrize("signum, exit_status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_run_quickly_and_a_rerun_completes(tmp_path, laion_dir, signum, exit_status):
    keys = build_dataset(tmp_path)
    clip = make_tiny_clip(tmp_path / "clip", embed_dim=768)
    command = cli_command(tmp_path, clip, laion_dir)
    stopped = stop_midway(tmp_path, command, signum)
    assert stopped.returncode == exit_status, stopped.stderr[-3000:]
    assert f"nsfw-curator: stopped by {signal.Signals(signum).name}; finished work is kept" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    # the big shards were stopped mid-way, not finished: no store entry was written for them
    assert not list((tmp_path / "cache").glob("*/part-000001-*.parquet")) and not list((tmp_path / "cache").glob("*/part-000002-*.parquet"))
    if signum == signal.SIGINT:
        return  # the re-run is the same as after SIGTERM
    rerun = subprocess.run(command, cwd=REPO_ROOT, env=cli_environment(tmp_path), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_complete(tmp_path, keys)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
