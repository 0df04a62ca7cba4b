"""Score a partition's cached embeddings and write its filtered outputs.

Reads the store entries the embedding stage wrote, scores every embedding with the NSFW head, streams
the shards once more without decoding images (raw members only) and hands (sample, score, error) in
input order to the writer. A partition whose manifest already records the same settings is skipped, so
a re-run after a crash only redoes the partitions that did not finish.

`filter_partition` takes what the embedding stage returned for the partition (its store entries, one per
shard, and the shards' fingerprints computed once per run) and the `FilterStage` settings; it neither
fingerprints the shards again nor lists any folder.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterator, Sequence

import numpy as np

from tasks.io.locations import LocationLike, as_location
from tasks.models.nsfw import NSFWHead
from tasks.io.partition import Partition
from tasks.io.read import iter_samples
from tasks.filter.plan import FilterStage, cached_nsfw_head
from tasks.store.entries import EmbeddingStore, embedding_matrix, keys_mismatch, shard_fingerprint
from tasks.io.ownership import earlier_partitions, settle_owner
from tasks.stop import raise_if_stopped
from tasks.signals.columns import NSFW
from tasks.signals.schema import Policy
from tasks.signals.scoring import SignalScorer, cached_scorer, filtered_by
from tasks.hashes.image_pass import hash_shard, with_hashes
from tasks.hashes.matching import HashMatch, loaded_matcher
from tasks.store.entries import METADATA_KEY, entry_hashes
from tasks.io.write import (
    PartitionResult,
    ScoredRow,
    quarantine_url,
    manifest_url,
    partitions_with_outputs,
    read_manifest,
    remove_stale_outputs,
    scores_url,
    write_filtered_partition,
)

from tasks.filter.reading import PartitionRead, completed_partition, stage_settings_identity


def entry_metadata(table) -> dict:
    """The footer record an entry was written with (the writer sets the identity fields again)."""
    return json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))


def shard_scores(
    table, head: NSFWHead, scorer: SignalScorer, policy: Policy, batch_size: int, matches: dict[int, HashMatch] | None = None
) -> tuple[list, list[ScoredRow]]:
    """The keys of a validated store entry and each row's scores, policy verdict and error; a row a hash list
    matched (`matches`) keeps its match only: no score, no verdict of the policy."""
    keys = table.column("key").to_pylist()
    errors = table.column("error").to_pylist()
    embeddings = embedding_matrix(table)
    valid = np.array([error is None for error in errors], dtype=bool)
    rows = len(keys)
    scores: dict[str, np.ndarray] = {NSFW: np.full(rows, np.nan, dtype=np.float32)}
    concepts: dict[str, list[str | None]] = {}
    if valid.any():
        result = head.score(embeddings[valid], batch_size=batch_size)
        valid_rows = np.flatnonzero(valid)
        scores[NSFW][valid] = result.nsfw_score
        for row, reason in result.unscored.items():
            errors[valid_rows[row]] = reason
        scorable = np.array([error is None for error in errors], dtype=bool)
        values = scorer.score(embeddings[scorable])
        for name, column in values.scores.items():
            scores[name] = np.full(rows, np.nan, dtype=np.float32)
            scores[name][scorable] = column
            for row in np.flatnonzero(scorable)[~np.isfinite(column)].tolist():
                errors[row] = errors[row] or f"signal {name} cannot score this embedding (zero length); not scored"
        for name, matched in values.concepts.items():
            concepts[name] = [None] * rows
            for row, concept in zip(np.flatnonzero(scorable).tolist(), matched):
                concepts[name][row] = concept
    for signal in scorer.plan.scored():  # a shard with no scorable row still has every column
        scores.setdefault(signal.name, np.full(rows, np.nan, dtype=np.float32))
        if signal.concept_column:
            concepts.setdefault(signal.name, [None] * rows)
    verdicts = filtered_by(policy, scores, concepts, rows)
    columns = [(signal.score_column, scores[signal.name]) for signal in scorer.plan.scored()]
    concept_columns = [(signal.concept_column, concepts[signal.name]) for signal in scorer.plan.scored() if signal.concept_column]
    scored_rows = []
    matches = matches or {}
    for row in range(rows):
        if row in matches:
            scored_rows.append(ScoredRow({}, matches[row].filtered_by, None, matches[row]))
            continue
        values = {column: float(value[row]) for column, value in columns}
        values.update({column: matched[row] for column, matched in concept_columns})
        scored_rows.append(ScoredRow(values, verdicts[row], errors[row]))
    return keys, scored_rows


def _scored_shard(
    shard: LocationLike,
    identity: str,
    store: EmbeddingStore,
    score_entry: Callable[[object], tuple[list, list[ScoredRow]]],
    embedding_dim: int,
    reembed_shard: Callable[[str], object] | None = None,
    fingerprint: str | None = None,
    local_copy: str | None = None,
) -> Iterator[tuple[object, ScoredRow]]:
    """(sample, scored row) for every sample of the shard, in order, from its validated store entry.

    An entry that is missing, fails validation, or whose keys are not the shard's (checked while streaming)
    is embedded again, once, with `reembed_shard` when given, and scoring goes on from the fresh entry.
    `fingerprint` is the shard's fingerprint when the caller has it (computed here otherwise).
    """
    shard = as_location(shard)
    shard_url = shard.url
    fingerprint = fingerprint or shard_fingerprint(shard)
    changed = f"{shard_url} no longer matches its cached embeddings; it changed during the run, run again"
    embedded_again = False

    def read_entry():
        return store.read_table(identity, shard_url, fingerprint, embedding_dim=embedding_dim)

    def embed_again():
        nonlocal embedded_again
        if embedded_again or reembed_shard is None:
            return None
        embedded_again = True
        reembed_shard(shard_url)
        return read_entry()

    def scored(table) -> tuple[list, list[ScoredRow]]:
        if table is None:
            raise RuntimeError(f"the embedding store has no usable entry for {shard_url}; the embedding stage must run first")
        return score_entry(table)

    def entry_matching(shard_keys: list) -> tuple[list, list[ScoredRow]]:
        """A fresh entry when the stored one's keys are not the shard's (a forged or stale entry)."""
        if embedded_again or reembed_shard is None:
            raise RuntimeError(changed)
        store.warn_unusable(identity, shard_url, fingerprint, keys_mismatch(keys, shard_keys) or "keys differ")
        fresh = scored(embed_again())
        if fresh[0][: len(shard_keys)] != shard_keys:
            raise RuntimeError(changed)  # the rows written so far came from another version of the shard
        return fresh

    stored = read_entry()
    keys, rows = scored(stored if stored is not None else embed_again())
    streamed_keys: list[str | None] = []
    for row, sample in enumerate(iter_samples(shard, decode=None, local_copy=local_copy)):
        if row >= len(keys) or sample.key != keys[row]:
            keys, rows = entry_matching([*streamed_keys, sample.key])
        scored_row = rows[row]
        if sample.error is not None and scored_row.error is None:
            scored_row = dataclasses.replace(scored_row, error=sample.error)  # a match stays a match
        yield sample, scored_row
        streamed_keys.append(sample.key)
    if len(streamed_keys) != len(keys):
        # Rows the shard does not have: what was written matches the shard; the entry is rewritten for next time.
        keys, _ = entry_matching(streamed_keys)
        if len(keys) != len(streamed_keys):
            raise RuntimeError(changed)


def filter_partition(
    partition: Partition,
    stage: FilterStage,
    entry_urls: Sequence[str],
    shard_fingerprints: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    log_always: Callable[[str], None] | None = None,
    reembed_shard: Callable[[str], object] | None = None,
    read: PartitionRead | None = None,
) -> PartitionResult:
    """Score and write one partition (or return its completed manifest); the manifest is the commit point.

    `entry_urls` are the partition's store entries as the embedding stage returned them, in shard order;
    `shard_fingerprints` the shards' fingerprints (computed here when not given).
    `reembed_shard(shard_url)` rewrites a shard's store entry; it is called for an entry found unusable here.
    `read` is what the partition's read task found (tasks/filter/reading.py): its earlier manifest, whether
    its outputs are complete, and local copies of its shards to read instead of storage.
    """
    embedding = stage.embedding
    store, identity = embedding.store, embedding.embedding_identity
    fingerprints = list(shard_fingerprints) if shard_fingerprints is not None else [shard_fingerprint(embedding.shard(url)) for url in partition.shard_urls]
    if len(entry_urls) != len(partition.shard_urls) or len(fingerprints) != len(partition.shard_urls):
        raise RuntimeError(f"partition {partition.index}: {len(entry_urls)} store entries for {len(partition.shard_urls)} shards")
    for shard_url, fingerprint, entry_url in zip(partition.shard_urls, fingerprints, entry_urls):
        # The entries read below are these ones (string building only, no storage request).
        if store.entry_url(identity, shard_url, fingerprint) != entry_url:
            raise RuntimeError(f"store entry {entry_url} is not the entry of {shard_url} for this run; run again")
    head = cached_nsfw_head(stage.nsfw_weights)
    scorer = cached_scorer(stage.signals, head.embedding_dim)
    output = stage.output
    identity_of_settings = stage_settings_identity(stage, fingerprints)
    if read is not None:
        earlier, done = read.earlier, read.earlier if read.outputs_complete else None
        local_copies = read.copies_here()
    else:
        earlier = read_manifest(output, partition.index)  # before writing: it names what to replace
        done = completed_partition(output, earlier, partition, identity_of_settings)
        local_copies = (None,) * len(partition.shard_urls)
    if done is not None:
        if log:
            log(f"partition {partition.index} already complete; kept")
        return done

    matcher = loaded_matcher(stage.hash_lists) if stage.hash_lists is not None else None
    hashed_now: list[str] = []

    def scorer_of(shard_url: str, fingerprint: str, local_copy: str | None) -> Callable[[object], tuple[list, list[ScoredRow]]]:
        def score_entry(table) -> tuple[list, list[ScoredRow]]:
            matches = None
            if matcher is not None:
                hashes = entry_hashes(table)
                if hashes is None:  # an entry from before image hashes: its images are hashed once, and it is rewritten
                    undecodable = {key for key, error in zip(table.column("key").to_pylist(), table.column("error").to_pylist()) if error}
                    try:
                        table = with_hashes(table, hash_shard(embedding.shard(shard_url), embedding.decode, local_copy, undecodable))
                    except ValueError:
                        raise RuntimeError(f"{shard_url} no longer matches its cached embeddings; it changed during the run, run again") from None
                    store.write(identity, shard_url, table, shard_fingerprint=fingerprint, metadata=entry_metadata(table))
                    hashed_now.append(shard_url)
                    hashes = entry_hashes(table)
                matches = matcher.match(hashes)
            return shard_scores(table, head, scorer, stage.signals.policy, embedding.model_inference_batch_size, matches)

        return score_entry

    def scored_samples() -> Iterator[tuple[object, ScoredRow]]:
        for shard_url, fingerprint, local_copy in zip(partition.shard_urls, fingerprints, local_copies):
            yield from _scored_shard(
                embedding.shard(shard_url), identity, store, scorer_of(shard_url, fingerprint, local_copy), head.embedding_dim,
                reembed_shard, fingerprint, local_copy,
            )
            if log:
                log(f"scored {shard_url}")

    result = write_filtered_partition(
        output,
        partition.index,
        partition.partition_id,
        partition.shard_urls,
        scored_samples(),
        stage.signals.scored(),
        stage.images_per_tar,
        identity_of_settings,
        earlier,
    )
    if hashed_now and log_always is not None:
        log_always(
            f"partition {partition.index}: {len(hashed_now)} store entries had no image hashes (written before hashing); "
            f"their images were decoded once to hash them, and the entries now hold the hashes"
        )
    return result


def clean_partitions_beyond(output: LocationLike, partition_count: int) -> list[str]:
    """Remove the outputs of partitions numbered `partition_count` and above that an earlier run over more
    shards (or a killed one) wrote here, up to the output's recorded partition mark, then lower the mark.

    Only this project's names are touched: each such partition's scores file, the tars its manifest names
    and those a killed attempt wrote in sequence, then its manifest. The partitions are those with a file
    in `shards/`, `scores/` or `_manifests/` (one listing each, names matched exactly, no glob), so a
    planted mark of 10**9 costs nothing; a stop request ends the loop.
    """
    output = as_location(output)
    fs = output.fs
    removed: list[str] = []
    mark = earlier_partitions(output)
    for index in partitions_with_outputs(output, partition_count, mark) if mark > partition_count else ():
        raise_if_stopped()
        manifest = read_manifest(output, index)
        removed += remove_stale_outputs(output, index, 0, manifest.output_shards if manifest else ())
        for url in (scores_url(output.url, index), quarantine_url(output.url, index), manifest_url(output.url, index)):
            path = output.at(url).path
            if fs.exists(path):
                fs.rm(path)
                removed.append(path)
    settle_owner(output, partition_count)
    return removed
