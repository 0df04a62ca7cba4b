"""The card's four task kinds (partitioning, reading, embedding, filtering) on a real Prefect API: each is a
task run worth retrying, named by what it works on; a cold run reads each remote shard's bytes once, through a
local copy that does not outlive the run; a disk without room costs a second read, never a row."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from tests.test_flow_filter import build_dataset, check_outputs, flow_run_task_runs, run_filter, upload_dir

pytestmark = pytest.mark.usefixtures("prefect_api")


class FlakyListingFileSystem(LocalFileSystem):
    """Local files behind `flaky://`, whose first two listings fail as a dropped connection would."""

    protocol = "flaky"
    listings_to_fail = 0

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        return super()._strip_protocol(path[len("flaky://"):] if path.startswith("flaky://") else path)

    def find(self, path, *args, **kwargs):
        if FlakyListingFileSystem.listings_to_fail > 0:
            FlakyListingFileSystem.listings_to_fail -= 1
            raise ConnectionError("connection reset by peer")
        return super().find(path, *args, **kwargs)


def test_four_task_kinds_and_a_listing_that_fails_twice_is_retried(tmp_path, tiny_clip_768, laion_dir):
    fsspec.register_implementation("flaky", FlakyListingFileSystem, clobber=True)
    dataset = build_dataset(tmp_path)
    FlakyListingFileSystem.listings_to_fail = 2
    state = run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, file_paths=f"flaky://{dataset.input_dir}", return_state=True)
    assert state.is_completed()
    assert FlakyListingFileSystem.listings_to_fail == 0
    check_outputs(dataset, tmp_path / "out", 0.5)
    runs = flow_run_task_runs(state.state_details.flow_run_id)
    by_kind: dict[str, list] = {}
    for run in runs:
        by_kind.setdefault(run.name.split("-", 1)[0], []).append(run)
    assert sorted(by_kind) == ["embed", "filter", "partition", "read"]
    (listing,) = by_kind["partition"]
    assert listing.name == "partition-in" and listing.run_count == 3 and listing.state.is_completed()  # failed twice, then listed
    partitions = len(by_kind["read"])
    assert partitions == len(by_kind["embed"]) == len(by_kind["filter"]) >= 2
    for kind in ("read", "embed", "filter"):
        names = sorted(run.name for run in by_kind[kind])
        assert names[0] == f"{kind}-p00000-part-000000" and all(run.state.is_completed() for run in by_kind[kind])


def test_a_cold_s3_run_reads_each_shard_once_through_a_local_copy_that_is_removed(
    tmp_path, s3_bucket, tiny_clip_768, laion_dir, monkeypatch
):
    import s3fs

    spool = tmp_path / "spool"
    monkeypatch.setenv("NSFW_CURATOR_SPOOL_DIR", str(spool))
    dataset = build_dataset(tmp_path)
    fs = s3fs.S3FileSystem()
    upload_dir(fs, dataset.input_dir, f"{s3_bucket}/in")
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, file_paths=f"s3://{s3_bucket}/in", output_path=f"s3://{s3_bucket}/out")
    assert spool.is_dir() and list(spool.iterdir()) == []  # copies were made, and none outlives the run
    local_out = tmp_path / "downloaded"
    fs.invalidate_cache()
    fs.get(f"{s3_bucket}/out", str(local_out), recursive=True)
    remote = {f"s3://{s3_bucket}/in/{Path(url).name}": keys for url, keys in dataset.keys.items()}
    check_outputs(type(dataset)(dataset.input_dir, remote, {f"s3://{s3_bucket}/in/{Path(u).name}": s for u, s in dataset.samples.items()},
                                dataset.bad_shard_name), local_out, 0.5)


def test_without_room_on_disk_the_shard_is_read_from_storage_and_keeps_every_row(tmp_path, s3_bucket, tiny_clip_768, laion_dir, monkeypatch):
    import s3fs

    from tasks.io import spool

    monkeypatch.setenv("NSFW_CURATOR_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setattr(spool, "SPOOL_RESERVE_BYTES", 1 << 60)  # no disk is that large: nothing may be copied
    dataset = build_dataset(tmp_path)
    fs = s3fs.S3FileSystem()
    upload_dir(fs, dataset.input_dir, f"{s3_bucket}/in-full")
    run_filter(dataset, tiny_clip_768, laion_dir, tmp_path, file_paths=f"s3://{s3_bucket}/in-full", output_path=str(tmp_path / "out"))
    remote = {f"s3://{s3_bucket}/in-full/{Path(url).name}": keys for url, keys in dataset.keys.items()}
    check_outputs(type(dataset)(dataset.input_dir, remote, {f"s3://{s3_bucket}/in-full/{Path(u).name}": s for u, s in dataset.samples.items()},
                                dataset.bad_shard_name), tmp_path / "out", 0.5)
    assert not list((tmp_path / "spool").glob("run-*/*"))  # nothing was copied; the run's folder is gone too


def test_a_spool_folder_another_user_could_write_is_never_used(tmp_path, s3_bucket):
    import s3fs

    from tasks.io.locations import Location
    from tasks.io.spool import copy_shard

    fs = s3fs.S3FileSystem()
    fs.pipe(f"{s3_bucket}/spool-check/x.tar", b"x" * 2048)
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o777)  # as /tmp is: someone else may have made (and filled) the spool folder first
    assert copy_shard(Location(f"s3://{s3_bucket}/spool-check/x.tar"), "etag-1", None, str(shared / "run-1")) is None
    linked = tmp_path / "linked"
    linked.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    assert copy_shard(Location(f"s3://{s3_bucket}/spool-check/x.tar"), "etag-1", None, str(linked / "run-1")) is None
    own = tmp_path / "own"
    copy = copy_shard(Location(f"s3://{s3_bucket}/spool-check/x.tar"), "etag-1", None, str(own / "run-1"))
    assert copy is not None and copy.usable() and Path(copy.path).read_bytes() == b"x" * 2048
    assert (own / "run-1").stat().st_mode & 0o777 == 0o700
