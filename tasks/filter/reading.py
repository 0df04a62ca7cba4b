"""The read stage of a partition: what its embedding and filter tasks need to know before they start.

For each shard, once per run: its content fingerprint (names its store entry), whether the store holds a
readable entry for it, and, when the partition's outputs must be written, a copy of a remote shard on this
machine's disk (tasks/io/spool.py) that the embedding and filter tasks read instead of storage, so a cold
run reads each shard's bytes from storage once. The partition's earlier manifest is read here too: when
its outputs are already complete for these shards and settings, nothing is copied and the filter task
keeps them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

from tasks.filter.plan import EmbedStage, FilterStage
from tasks.io.partition import Partition
from tasks.io.spool import LocalCopy, copy_shard, is_remote
from tasks.io.locations import Location
from tasks.io.write import PartitionResult, output_shard_url, read_manifest, scores_url
from tasks.stop import raise_if_stopped
from tasks.store.entries import shard_fingerprint_and_size


def settings_identity(
    shard_fingerprints: list[str],
    embedding_identity: str,
    head_fingerprint: str,
    signals_fingerprint: str,
    images_per_tar: int,
    hash_lists: dict | None = None,
) -> str:
    """What makes a partition's outputs what they are: its shards' content and the run's settings (the signals'
    weights and the policy among them: changing either redoes scoring and writing, never embedding)."""
    record = {
        "shards": shard_fingerprints,
        "embedding": embedding_identity,
        "nsfw_head": head_fingerprint,
        "signals": signals_fingerprint,
        "images_per_tar": int(images_per_tar),
        "hash_lists": hash_lists,  # the lists' content fingerprint and PDQ distance: a new list redoes the partition
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def stage_settings_identity(stage: FilterStage, shard_fingerprints: Sequence[str]) -> str:
    """The settings identity of a partition of these shards under this stage (read and filter tasks ask the same)."""
    embedding = stage.embedding
    return settings_identity(
        list(shard_fingerprints), embedding.embedding_identity, stage.head_fingerprint, stage.signals.fingerprint(), stage.images_per_tar,
        stage.hash_lists_identity,
    )


def completed_partition(output: Location, manifest: PartitionResult | None, partition: Partition, identity_of_settings: str) -> PartitionResult | None:
    """`manifest` (an earlier attempt's) when it has the same shards and settings, names this output's files
    for the partition and they all exist."""
    if manifest is None or manifest.partition_id != partition.partition_id or manifest.settings_identity != identity_of_settings:
        return None
    output_path = output.url
    expected = [scores_url(output_path, partition.index)] + [output_shard_url(output_path, partition.index, n) for n in range(len(manifest.output_shards))]
    if [manifest.scores_file, *manifest.output_shards] != expected:
        return None
    fs = output.fs
    for url in expected:
        if not fs.exists(output.at(url).path):
            return None
    return manifest


@dataclass(frozen=True)
class StoreLookup:
    """A partition's shards as the run found them, once: their fingerprints and which have a readable entry."""

    shard_fingerprints: tuple[str, ...]
    shards_in_store: tuple[bool, ...]
    shard_sizes: tuple[int | None, ...]  # bytes, from the same look as the fingerprint (None where storage does not say)

    @property
    def complete(self) -> bool:
        return all(self.shards_in_store)


def look_up_partition(stage: EmbedStage, shard_urls: tuple[str, ...]) -> StoreLookup:
    """Fingerprint each shard and ask the store for its entry: the only time a run asks either question."""
    looked = [shard_fingerprint_and_size(stage.shard(url)) for url in shard_urls]
    fingerprints = tuple(fingerprint for fingerprint, _ in looked)
    present = tuple(
        stage.store.has(stage.embedding_identity, url, fingerprint, embedding_dim=stage.clip_weights.embedding_dim)
        for url, fingerprint in zip(shard_urls, fingerprints)
    )
    return StoreLookup(fingerprints, present, tuple(size for _, size in looked))


@dataclass(frozen=True)
class PartitionRead:
    """What a partition's read task found (small values: a few strings and flags per shard)."""

    lookup: StoreLookup
    local_copies: tuple[LocalCopy | None, ...]  # per shard: its copy on the reading machine, or None (read from storage)
    earlier: PartitionResult | None  # the partition's manifest from an earlier attempt or run
    outputs_complete: bool  # `earlier` describes complete outputs for these shards and settings: nothing to write

    def copies_here(self) -> tuple[str | None, ...]:
        """The copies' paths where they are usable on this machine (None elsewhere, or where there is none)."""
        return tuple(copy.path if copy is not None and copy.usable() else None for copy in self.local_copies)


def read_partition(partition: Partition, stage: FilterStage) -> PartitionRead:
    """Fingerprint and look up the partition's shards, check its earlier outputs and copy what must be read."""
    embedding = stage.embedding
    lookup = look_up_partition(embedding, partition.shard_urls)
    identity_of_settings = stage_settings_identity(stage, lookup.shard_fingerprints)
    earlier = read_manifest(stage.output, partition.index)
    complete = completed_partition(stage.output, earlier, partition, identity_of_settings) is not None
    copies: list[LocalCopy | None] = []
    for shard_url, fingerprint, size in zip(partition.shard_urls, lookup.shard_fingerprints, lookup.shard_sizes):
        raise_if_stopped()
        shard = embedding.shard(shard_url)
        wanted = not complete and stage.spool_folder is not None and is_remote(shard)
        copies.append(copy_shard(shard, fingerprint, size, stage.spool_folder) if wanted else None)
    return PartitionRead(lookup, tuple(copies), earlier, complete)
