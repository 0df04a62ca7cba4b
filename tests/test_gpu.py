"""GPU slots: floor(1/f) tasks per GPU, nothing waits without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tasks.models.gpu import GPU_JOURNAL_ENV, SIMULATED_GPUS_ENV, GpuSlots, max_overlap, slots_per_gpu


@pytest.mark.parametrize("fraction, slots", [(1.0, 1), (0.5, 2), (0.34, 2), (1 / 3, 3), (0.25, 4), (0.1, 10)])
def test_slots_per_gpu(fraction, slots):
    assert slots_per_gpu(fraction) == slots


def run_tasks(slots: GpuSlots, fraction: float, n: int, seconds: float) -> list[torch.device]:
    devices = []

    def work():
        with slots.hold(fraction) as device:
            devices.append(device)
            time.sleep(seconds)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return devices


@pytest.mark.parametrize("gpus, fraction", [(1, 0.5), (2, 0.25), (1, 1.0)])
def test_simulated_gpus_bound_overlap(tmp_path, monkeypatch, gpus, fraction):
    journal = tmp_path / "gpu.journal"
    monkeypatch.setenv(SIMULATED_GPUS_ENV, str(gpus))
    monkeypatch.setenv(GPU_JOURNAL_ENV, str(journal))
    devices = run_tasks(GpuSlots(), fraction, n=12, seconds=0.05)
    assert all(d.type == "cpu" for d in devices)
    peaks = max_overlap(journal.read_text().splitlines())
    assert sorted(peaks) == list(range(gpus))
    assert all(peak == slots_per_gpu(fraction) for peak in peaks.values()), peaks


def test_no_gpu_means_no_waiting(tmp_path, monkeypatch):
    monkeypatch.delenv(SIMULATED_GPUS_ENV, raising=False)
    monkeypatch.setenv(GPU_JOURNAL_ENV, str(tmp_path / "gpu.journal"))
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    barrier = threading.Barrier(8, timeout=10)  # all 8 must be inside at once, or this raises
    slots = GpuSlots()

    def work():
        with slots.hold(1.0) as device:
            assert device.type == "cpu"
            barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not barrier.broken
    assert not (tmp_path / "gpu.journal").exists()


# --- benchmarks/bench_gpu.py: the stage it times is the flow's, and it runs its CPU path here -----------


def test_gpu_benchmark_times_the_flow_stage_and_its_embeddings_are_open_clips(tmp_path):
    import numpy as np

    from benchmarks._photos import write_photo_shards
    from benchmarks.bench_gpu import decode_modes, run_stage
    from tasks.io.read import iter_samples
    from tasks.models.clip_resolve import clip_identity, resolve_clip
    from tasks.store.entries import EmbeddingStore, embedding_matrix
    from tests.support.tiny_clip import make_tiny_clip, open_clip_reference

    shard_urls = write_photo_shards(tmp_path / "shards", images=5, per_shard=3, sizes=[(160, 96), (80, 120)])
    config_path, checkpoint_path = make_tiny_clip(tmp_path / "clip")
    weights = resolve_clip(str(config_path), str(checkpoint_path), tmp_path)
    exact = decode_modes(weights)["exact"]
    result = run_stage(shard_urls, weights, tmp_path / "store", exact, torch.device("cpu"), batch_size=2)

    assert result.images == 5 and len(result.entries) == 2 and result.peak_gpu_mib is None
    assert 0 < result.input_wait_s + result.model_s <= result.wall_s
    store = EmbeddingStore(tmp_path / "store")
    identity = clip_identity(weights, exact.identity())
    stored = np.concatenate([embedding_matrix(store.read_table(identity, url)) for url in shard_urls])
    images = [sample.image for url in shard_urls for sample in iter_samples(url, exact)]
    reference = open_clip_reference(config_path, checkpoint_path, images)
    assert stored.shape == reference.shape and ((stored * reference).sum(axis=1) >= 0.99999).all()


def test_gpu_benchmark_without_cuda_says_so_and_imports_no_orchestration(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    code = (
        "import sys, benchmarks.bench_gpu as bench; rc = bench.main([]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'webdataset', 's3fs'))); sys.exit(rc)"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "bench_gpu: torch sees no CUDA GPU on this machine; nothing to measure (--device cpu --tiny checks the script).", "[]"]


def figure_lines(stdout: str) -> dict[tuple[str, str, str], str]:
    """The benchmark's `section | subject | figure: value` lines, by (section, subject, figure) -> value."""
    figures = {}
    for line in stdout.splitlines():
        parts = line.split(" | ")
        if len(parts) == 3 and ": " in parts[2]:
            figure, value = parts[2].split(": ", 1)
            figures[parts[0], parts[1], figure] = value
    return figures


def test_gpu_benchmark_runs_end_to_end_on_the_cpu_and_prints_every_figure(tmp_path):
    from tasks.io.read import DECODE_MODES
    from tasks.models.forward import FORWARD_PASSES

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "figures.json"
    command = [sys.executable, str(repo / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--tiny", "--compile-backend", "aot_eager",
               "--workdir", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = figure_lines(done.stdout)

    assert done.stdout.startswith("setup | ")
    for name in FORWARD_PASSES:
        mean, least = map(float, figures["cosine", name, "vs fp32 CPU, mean and min of 8 images"].split())
        assert 1.0 + 1e-6 >= mean >= least >= 0.999
        assert float(figures["model alone", f"{name} batch 4", "images/s"].split()[0]) > 0
        assert figures["model alone", f"{name} batch 4", "peak device MiB"] == "n/a (no GPU)"
    [(chosen, chosen_batch)] = [tuple(figure.split(" batch ")) for section, _, figure in figures if section == "choice"]
    assert chosen in FORWARD_PASSES and chosen_batch == "4"
    stage_figures = ("images/s", "model in stage images/s", "GPU busy %", "input wait", "host CPU ms/image", "peak device MiB")
    for kind in ("512px", "photos"):
        for mode in DECODE_MODES:
            for forward in {"autocast", chosen}:
                subject = f"{kind} {mode} {forward} (fp32) batch 4"
                assert " (8 images in " in figures["stage", subject, "images/s"], subject
                assert all(("stage", subject, figure) in figures for figure in stage_figures), subject
                assert float(figures["stage", subject, "host CPU ms/image"]) > 0
    for kind in ("512px", "photos"):  # the gpu mode's embeddings against the exact mode's (here TorchCodec's CPU decode)
        mean, least = map(float, figures["fidelity", f"{kind} gpu mode", "cosine to exact decoding, mean and min of 4 images"].split())
        assert 0.999 <= least <= mean <= 1.0 + 1e-6, (kind, mean, least)
    assert "| shards | decode | forward | precision |" in done.stdout
    saved = json.loads(out.read_text())
    assert len(saved["figures"]) == sum(section != "setup" for section, _, _ in figures)
    assert len(saved["stages"]) == 2 * len(DECODE_MODES) * len({"autocast", chosen}) and all(stage["images"] == 8 for stage in saved["stages"])
