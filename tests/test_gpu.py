"""GPU slots: floor(1/f) tasks per GPU, nothing waits without a GPU."""

from __future__ import annotations

import threading
import time

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
