"""A task's inputs do not grow with the run: a partition of a 5,000-partition run hands its tasks as
many bytes as a partition of a 5-partition run, and none of them names another partition's shard.
Partition sizing: blocksize groups shards by bytes, and a run of many small partitions gets advice."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from flows.nsfw_filter import embed_parameters, filter_parameters, preflight, read_parameters
from tasks.filter.reading import read_partition
from tests.support.tars import shard_of_good_samples, tar_bytes


def plan_of(root: Path, shards: int, tiny_clip_768, laion_dir: Path, **parameters):
    config_path, checkpoint_path = tiny_clip_768
    input_dir = root / "in"
    input_dir.mkdir(parents=True)
    # One real (tiny) tar written under many names: every shard is a real file the planner lists and checks.
    data = tar_bytes(shard_of_good_samples(["k0"], size=(8, 8)))
    for index in range(shards):
        (input_dir / f"part-{index:06d}.tar").write_bytes(data)
    return preflight(
        {
            "file_paths": str(input_dir),
            "output_path": str(root / "out"),
            "cache_path": str(root / "cache"),
            "clip_model": str(config_path),
            "clip_pretrained": str(checkpoint_path),
            "nsfw_weights": str(laion_dir / "vit_l_14.safetensors"),
            **parameters,
        }
    )


def first_task_inputs(run) -> tuple[bytes, bytes, bytes]:
    """The pickled parameters the flow submits for partition 0's read, embedding and filter tasks."""
    partition = run.partitions[0]
    read = read_partition(partition, run.filter)
    fingerprints = read.lookup.shard_fingerprints
    entry_urls = [run.embed.store.entry_url(run.embed.embedding_identity, url, fp) for url, fp in zip(partition.shard_urls, fingerprints)]
    reading = pickle.dumps(read_parameters(run, partition))
    embed = pickle.dumps(embed_parameters(run, partition, read))
    scoring = pickle.dumps(filter_parameters(run, partition, read, entry_urls))
    return reading, embed, scoring


def test_task_inputs_do_not_grow_with_the_number_of_partitions(tmp_path, tiny_clip_768, laion_dir):
    small = plan_of(tmp_path / "small", 5, tiny_clip_768, laion_dir)
    large = plan_of(tmp_path / "large", 5_000, tiny_clip_768, laion_dir)
    assert len(small.partitions) == 5 and len(large.partitions) == 5_000

    small_inputs = first_task_inputs(small)
    large_inputs = first_task_inputs(large)
    # Same partition, paths differing only in the run's folder name ("small" vs "large"): a few bytes apart.
    for small_task, large_task in zip(small_inputs, large_inputs):
        assert abs(len(large_task) - len(small_task)) < 300, (len(small_task), len(large_task))
        for other in (large.partitions[1], large.partitions[-1]):
            assert other.shard_urls[0].encode() not in large_task


def test_blocksize_sizes_partitions_and_small_partitions_get_advice(tmp_path, tiny_clip_768, laion_dir):
    from tasks.errors import UserError
    from tasks.filter.plan import small_partitions_advice

    run = plan_of(tmp_path / "one-per-shard", 200, tiny_clip_768, laion_dir)
    shard_bytes = (tmp_path / "one-per-shard" / "in" / "part-000000.tar").stat().st_size
    assert len(run.partitions) == 200 and run.input_bytes == 200 * shard_bytes
    advice = small_partitions_advice(len(run.partitions), run.input_bytes)
    assert advice is not None and advice.startswith("200 partitions of 0.0 MB on average") and "blocksize='512MB'" in advice
    # Few partitions, or big ones, get no advice.
    assert small_partitions_advice(20, 20 * shard_bytes) is None
    assert small_partitions_advice(200, 200 * (64 << 20)) is None

    grouped = plan_of(tmp_path / "grouped", 200, tiny_clip_768, laion_dir, blocksize=str(10 * shard_bytes))
    assert [len(p.shard_urls) for p in grouped.partitions] == [10] * 20
    assert small_partitions_advice(len(grouped.partitions), grouped.input_bytes) is None
    with pytest.raises(UserError, match="^files_per_partition and blocksize both size partitions; pass one of them.$"):
        plan_of(tmp_path / "both", 3, tiny_clip_768, laion_dir, blocksize="1MB", files_per_partition=2)
