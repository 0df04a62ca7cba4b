"""A scan-bomb JPEG costs its own row within a bounded time, and no decoding process outlives its run.

A progressive JPEG's decode time grows with its number of scans (libjpeg walks every block of the image
again for each), so a few kilobytes of tiny scans decode for minutes. The bombs here are written marker by
marker: a greyscale progressive frame whose scans are AC refinement scans holding only end-of-band runs
(a few bytes each, the costliest scan per byte). Checked:
- the scan count is read from the markers before decoding: a bomb at MAX_JPEG_SCANS decodes, one scan
  more is refused at once, with stuffed 0xFF bytes and restart markers in the data (not counted as markers);
- in worker processes, a bomb under the limit is stopped at its decode deadline, and the rest of the shard
  is decoded as without it (the killed worker replaced);
- SIGTERM, SIGINT and `kill -9` of `nsfw-curator filter` while a worker decodes a bomb: the workers are
  gone within 5 s of the signal, a stopped run ends by itself well before its 20 s fallback, and no process
  of the run (forkserver, multiprocessing's resource tracker) is alive 5 s after the run itself.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from tasks.io.decode_workers import DEADLINE_REASON
from tasks.io.read import MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS, DecodeOptions, iter_batches
from tests.support.tars import Member, encode, good_sample_members, large_photo, write_tar

REPO_ROOT = Path(__file__).resolve().parents[1]
# Decodes for several seconds on one core (about 25 ms per scan at 4096 x 4096), at the scan limit.
SLOW_BOMB_SIDE = 4096
# Still decoding many seconds after the signal: 8192 x 8192 takes about 0.1 s per scan.
CLI_BOMB_SIDE = 8192
SHORT_DEADLINE_S = 1.0
EXIT_LIMIT_S = 5.0
# The run's own exit after a stop: Prefect reports the crash and the interpreter unwinds (about 3 s on an idle
# 2-core machine, twice that under load), well before the command line's 20 s fallback.
RUN_EXIT_LIMIT_S = 15.0


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _entropy_coded(bits: str) -> bytes:
    """Bits padded with ones to a whole byte, each 0xFF byte stuffed with 0x00 (as in a scan's data)."""
    bits += "1" * (-len(bits) % 8)
    out = bytearray()
    for start in range(0, len(bits), 8):
        out.append(int(bits[start : start + 8], 2))
        if out[-1] == 0xFF:
            out.append(0x00)
    return bytes(out)


def _end_of_band_runs(blocks: int) -> str:
    """Huffman bits skipping `blocks` blocks: EOBr symbols (code r on 4 bits) with r extra bits, runs of at most 32767."""
    bits = ""
    while blocks:
        run = min(blocks, 32767)
        size = run.bit_length() - 1
        bits += format(size, "04b") + (format(run - (1 << size), f"0{size}b") if size else "")
        blocks -= run
    return bits


def scan_bomb(side: int, scans: int, restart_blocks: int = 0) -> bytes:
    """A side x side greyscale progressive JPEG of `scans` AC refinement scans (Ss=1, Se=63, Ah=1, Al=0), each
    only end-of-band runs over all its blocks; with `restart_blocks`, a restart marker after each that many blocks."""
    blocks = (-(-side // 8)) ** 2
    interval = restart_blocks or blocks
    data = b""
    for index, start in enumerate(range(0, blocks, interval)):
        if index:
            data += bytes([0xFF, 0xD0 + (index - 1) % 8])  # RSTn, n counting modulo 8
        data += _entropy_coded(_end_of_band_runs(min(interval, blocks - start)))
    # one AC table holding EOB0..EOB14, each coded by its number on 4 bits
    huffman = bytes([0x10]) + bytes([0, 0, 0, 15] + [0] * 12) + bytes(size << 4 for size in range(15))
    head = b"\xff\xd8" + _segment(0xDB, b"\x00" + b"\x01" * 64)
    head += _segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")  # SOF2: progressive, one component
    head += _segment(0xC4, huffman)
    if restart_blocks:
        head += _segment(0xDD, struct.pack(">H", restart_blocks))
    scan = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x10") + data
    return head + scan * scans + b"\xff\xd9"


def segment_bomb(segments: int) -> bytes:
    """A small real JPEG with `segments` empty comment segments before its frame."""
    photo = encode(Image.new("L", (16, 16), 100), "JPEG")
    return photo[:2] + _segment(0xFE, b"") * segments + photo[2:]


def pixels_transform() -> T.Compose:
    return T.Compose([T.Resize((16, 16)), T.ToTensor()])


def read_rows(shard: Path, decode: DecodeOptions, worker_processes: bool) -> dict[str, tuple[str | None, torch.Tensor | None]]:
    rows = {}
    for batch in iter_batches([str(shard)], task_batch_size=3, decode=decode, threads=2, transform=pixels_transform(),
                              worker_processes=worker_processes):
        rows.update((sample.key, (sample.error, sample.model_input)) for sample in batch)
    return rows


def expected_input(data: bytes) -> torch.Tensor:
    return pixels_transform()(Image.open(io.BytesIO(data)).convert("RGB"))


def test_scan_count_is_read_from_the_markers_before_decoding(tmp_path):
    at_limit = scan_bomb(512, MAX_JPEG_SCANS, restart_blocks=2047)
    over_limit = scan_bomb(512, MAX_JPEG_SCANS + 1, restart_blocks=2047)
    # the data holds what a marker walk must step over: stuffed bytes and restart markers
    assert b"\xff\x00" in at_limit and b"\xff\xd0" in at_limit and b"\xff\xd1" in at_limit
    assert Image.open(io.BytesIO(at_limit)).size == (512, 512)
    photo = encode(large_photo(640, 480), "JPEG", quality=95, progressive=True, restart_marker_blocks=7)
    members = [
        *good_sample_members("good-0", seed=0),
        Member("at-limit.jpg", at_limit),
        Member("over-limit.jpg", over_limit),
        Member("segments.jpg", segment_bomb(MAX_JPEG_SEGMENTS + 1)),
        Member("photo.jpg", photo),
        *good_sample_members("good-1", seed=1),
    ]
    shard = write_tar(tmp_path / "scans.tar", members)
    started = time.monotonic()
    rows = read_rows(shard, DecodeOptions(), worker_processes=False)  # threads: the header limits apply there too
    took = time.monotonic() - started
    assert list(rows) == ["good-0", "at-limit", "over-limit", "segments", "photo", "good-1"]
    assert rows["over-limit"] == (f"image 'over-limit.jpg' has over {MAX_JPEG_SCANS} JPEG scans (possible scan bomb: each scan decodes the whole image again)", None)
    assert rows["segments"] == (f"image 'segments.jpg' has over {MAX_JPEG_SEGMENTS} JPEG marker segments, the limit for reading it", None)
    images = {member.name: member.data for member in members}
    for key in ["good-0", "at-limit", "photo", "good-1"]:
        data = images[f"{key}.jpg"]
        error, model_input = rows[key]
        assert error is None and torch.equal(model_input, expected_input(data)), key
    assert took < 20, f"reading took {took:.1f} s"


def test_a_scan_bomb_is_stopped_at_its_deadline_and_the_rest_of_the_shard_is_decoded(tmp_path):
    slow = scan_bomb(SLOW_BOMB_SIDE, MAX_JPEG_SCANS)
    members = [*good_sample_members("good-0", seed=0), Member("slow.jpg", slow), Member("slow.txt", b"a scan bomb under the limit")]
    for index in range(1, 9):
        members += good_sample_members(f"good-{index}", seed=index)
    members.append(Member("over.jpg", scan_bomb(64, MAX_JPEG_SCANS + 1)))
    members += good_sample_members("good-9", seed=9)
    shard = write_tar(tmp_path / "bomb.tar", members)
    rows = read_rows(shard, DecodeOptions(decode_deadline_s=SHORT_DEADLINE_S), worker_processes=True)
    assert list(rows) == ["good-0", "slow", *(f"good-{index}" for index in range(1, 9)), "over", "good-9"]
    assert rows["slow"] == (DEADLINE_REASON.format(name="slow.jpg", seconds=SHORT_DEADLINE_S), None)
    assert rows["over"][0] == f"image 'over.jpg' has over {MAX_JPEG_SCANS} JPEG scans (possible scan bomb: each scan decodes the whole image again)"
    images = {member.name.split(".")[0]: member.data for member in members if member.name.endswith(".jpg")}
    for index in range(10):
        error, model_input = rows[f"good-{index}"]
        assert error is None and torch.equal(model_input, expected_input(images[f"good-{index}"])), index
    # the same bomb with no deadline to stop it: it is no quick image the deadline happened to catch
    started = time.monotonic()
    Image.open(io.BytesIO(slow)).load()
    assert time.monotonic() - started > 2 * SHORT_DEADLINE_S


# --- the command line, stopped or killed while a worker decodes a bomb ---


def _stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ... utime (11), stime (12)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def processes_in_group(group: int) -> list[int]:
    """Live processes (not zombies) of the process group: the run, and everything it started (they keep its group)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[2]) == group:
                found.append(int(entry.name))
    return found


def decoders_of(run_pid: int) -> dict[int, float]:
    """The processes the run's forkserver forked (its decoding workers), with their CPU seconds."""
    stats = {pid: fields for pid in processes_in_group(run_pid) if (fields := _stat(pid)) is not None}
    # the server is the run's child started with that command line; its workers are forks of it (same command line)
    servers = [pid for pid, fields in stats.items() if int(fields[1]) == run_pid and b"multiprocessing.forkserver" in _cmdline(pid)]
    return {pid: (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") for pid, fields in stats.items() if int(fields[1]) in servers}


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def wait_for(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"timed out waiting until {what}"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_process_of_the_run_survives_a_stop_or_kill_during_a_long_decode(tmp_path, tiny_clip_768, laion_dir, prefect_api, signum):
    members = [*good_sample_members("good-0", seed=0), Member("bomb.jpg", scan_bomb(CLI_BOMB_SIDE, MAX_JPEG_SCANS))]
    members += [member for index in range(1, 4) for member in good_sample_members(f"good-{index}", seed=index)]
    write_tar(tmp_path / "in" / "part-000000.tar", members)
    config_path, checkpoint_path = tiny_clip_768
    command = [sys.executable, "-m", "flows.cli", "filter", "--file-paths", str(tmp_path / "in"), "--output-path", str(tmp_path / "out"),
               "--clip-model", str(config_path), "--clip-pretrained", str(checkpoint_path),
               "--nsfw-weights", str(laion_dir / "vit_l_14.safetensors"), "--cache-path", str(tmp_path / "cache"),
               "--task-batch-size", "2", "--max-workers", "1"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO_ROOT)}  # no local API server: every process is the run's
    log_path = tmp_path / "stderr.log"
    with open(log_path, "w") as log:
        run = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        # a worker busy for a second can only be decoding the bomb (the other images take milliseconds)
        wait_for(lambda: max(decoders_of(run.pid).values(), default=0.0) >= 1.0 or run.poll() is not None, 300, "a worker decodes the bomb")
        assert run.poll() is None, log_path.read_text()[-3000:]
        decoders = list(decoders_of(run.pid))
        run.send_signal(signum)
        decoders_took = wait_for(lambda: not any(alive(pid) for pid in decoders), 60, "the decoding workers are gone")
        run_took = wait_for(lambda: run.poll() is not None, 60, "the run ends")
        rest_took = wait_for(lambda: not processes_in_group(run.pid), 60, "every process of the run is gone")
    finally:
        if processes_in_group(run.pid):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    name = signal.Signals(signum).name
    assert decoders_took < EXIT_LIMIT_S, f"the decoding workers were alive {decoders_took:.1f} s after {name}"
    # after the run itself: its forkserver and multiprocessing's resource tracker
    assert rest_took < EXIT_LIMIT_S, f"processes of the run were alive {rest_took:.1f} s after it ended"
    if signum != signal.SIGKILL:
        stderr = log_path.read_text()
        assert run.returncode == 128 + signum, stderr[-3000:]
        assert f"nsfw-curator: stopped by {name}; finished work is kept" in stderr
        assert "shutdown took too long" not in stderr  # it ended by itself, not by the 20 s fallback
        assert decoders_took + run_took < RUN_EXIT_LIMIT_S, f"the run ended {decoders_took + run_took:.1f} s after {name}"
