"""What the dedup flow reads and writes: embeddings from the store (never CLIP), results, a deduplicated copy.

Finding the embeddings without the CLIP weights: the store names each identity `{model_name}-{hash}` and
every entry's footer records what the identity covers (pretrained tag, weights SHA-256, preprocessing,
decoding). So the identity of a dataset's embeddings is, in order of preference:

1. `embedding_identity` given explicitly (a filter run's summary.json records it under models);
2. computed from the CLIP weights when they are on this machine or at a URL (exactly as the filter flow does);
3. found in the store: the identities of `clip_model` whose entries record `clip_pretrained` as their
   pretrained tag (or weights SHA-256; any weights when it is a checkpoint path not on this machine) and
   hold an entry for the dataset's first shard; exactly one must remain.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.io.atomic import atomic_output, write_bytes_atomic
from tasks.io.locations import Location, redacted
from tasks.models.clip_resolve import clip_identity, resolve_clip, safe_name
from tasks.errors import UserError
from tasks.io.decode import decode_mode_of
from tasks.io.read import DEFAULT_DECODE_MODE, DecodeOptions, iter_samples
from tasks.store.entries import METADATA_KEY, EmbeddingStore, embedding_matrix, shard_fingerprint
from tasks.io.write import FilteredShardWriter, join_url, output_shard_name, partitions_with_outputs, remove_stale_outputs
from tasks.stop import raise_if_stopped


def shard_location(inputs: Location | None, shard_url: str) -> Location:
    """Where a listed shard is read from: reached as the input listing is (`inputs`, the flow's; None: the
    environment's credentials)."""
    return inputs.at(shard_url) if inputs is not None else Location(shard_url)


def _entry_record(store: EmbeddingStore, identity_dir: str) -> dict | None:
    """The footer record of one entry of an identity folder, or None when it has no readable entry."""
    fs, root = store.location.filesystem()
    for path in sorted(fs.glob(f"{root.rstrip('/')}/{identity_dir}/*.parquet"))[:1]:
        try:
            with fs.open(path, "rb") as handle:
                metadata = pq.ParquetFile(handle).schema_arrow.metadata or {}
            return json.loads(metadata[METADATA_KEY])
        except (OSError, KeyError, ValueError, pa.ArrowException):
            return None
    return None


def find_embedding_identity(
    store: EmbeddingStore,
    shard_urls: Sequence[str],
    clip_model: str,
    clip_pretrained: str | Location,
    model_dir: str | None,
    embedding_identity: str | None = None,
    decode_mode: str = DEFAULT_DECODE_MODE,
    inputs: Location | None = None,
) -> str:
    """The identity of the dataset's embeddings in the store, without loading (or needing) CLIP.

    `clip_pretrained` is a tag, a local path, or the Location of a checkpoint URL (read like the shards);
    the shards are reached as `inputs` (`shard_location`).
    """
    if embedding_identity:
        return embedding_identity
    try:
        weights = resolve_clip(clip_model, clip_pretrained, model_dir)
        return clip_identity(weights, DecodeOptions.for_model(weights.image_size, decode_mode).identity())
    except UserError:
        pass  # no weights here: look the identity up in the store
    model_name = clip_model.rsplit("/", 1)[-1].removesuffix(".json").replace("/", "-")
    clip_pretrained = str(clip_pretrained)
    fs, root = store.location.filesystem()
    prefix = f"{root.rstrip('/')}/{safe_name(model_name)}-"
    folders = sorted(path.rsplit("/", 1)[-1] for path in fs.glob(prefix + "*") if fs.isdir(path))
    tag = clip_pretrained.rsplit("/", 1)[-1]
    # A checkpoint path that is not on this machine cannot be fingerprinted: any weights of the model match.
    is_path = "/" in clip_pretrained or clip_pretrained.lower().endswith((".safetensors", ".bin", ".pt", ".pth"))
    first = shard_urls[0]
    fingerprint = shard_fingerprint(shard_location(inputs, first))
    matches = []
    for folder in folders:
        record = _entry_record(store, folder)
        if record is None or not (is_path or tag in (record.get("pretrained_tag"), record.get("weights_fingerprint"))):
            continue
        if decode_mode_of(str(record.get("decode"))) != decode_mode:
            continue  # made with the other decode mode
        if store.has(folder, first, fingerprint):
            matches.append(folder)
    if len(matches) == 1:
        return matches[0]
    where = redacted(store.cache_path)
    if not matches:
        raise UserError(
            f"no embeddings of {model_name} ({clip_pretrained}) for {redacted(first)} are in the store at {where}; "
            f"run `nsfw-curator filter` on this dataset with the same --cache-path first, or pass --embed-missing."
        )
    raise UserError(
        f"the store at {where} holds several embeddings of {model_name} ({clip_pretrained}): {', '.join(matches)}; "
        f"pass --embedding-identity with the one the filter run's summary.json names."
    )


@dataclass
class StoredEmbeddings:
    embeddings: np.ndarray  # float32 [N, D]; NaN rows for samples that were not embedded
    key: list[str | None]
    shard: list[str]


def missing_shards(store: EmbeddingStore, identity: str, shard_urls: Sequence[str], inputs: Location | None = None) -> list[str]:
    return [url for url in shard_urls if not store.has(identity, url, shard_fingerprint(shard_location(inputs, url)))]


def load_embeddings(store: EmbeddingStore, identity: str, shard_urls: Sequence[str], inputs: Location | None = None) -> StoredEmbeddings:
    """Every sample's embedding of the shards (reached as `inputs`), in shard order; rows without a key (damaged tars) left out."""
    matrices, keys, shards = [], [], []
    for url in shard_urls:
        table = store.read_table(identity, url, shard_fingerprint(shard_location(inputs, url)))
        if table is None:
            raise UserError(f"the store entry for {redacted(url)} disappeared or is unreadable; run the flow again to re-embed it.")
        has_key = np.array([k is not None for k in table.column("key").to_pylist()], dtype=bool)
        matrices.append(embedding_matrix(table)[has_key])
        keys.extend(k for k in table.column("key").to_pylist() if k is not None)
        shards.extend([url] * int(has_key.sum()))
    dim = matrices[0].shape[1] if matrices else 0
    embeddings = np.concatenate(matrices) if matrices else np.zeros((0, dim), np.float32)
    return StoredEmbeddings(embeddings, keys, shards)


def write_frame(location: Location, frame) -> str:
    with atomic_output(location) as handle:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), handle)
    return location.url


def passed_samples(filter_output: Location) -> set[tuple[str, str]]:
    """(shard, key) of the samples a filter run kept, from its scores Parquet."""
    filter_output_path = filter_output.url
    fs, root = filter_output.filesystem()
    passed: set[tuple[str, str]] = set()
    paths = sorted(fs.glob(f"{root.rstrip('/')}/scores/*.parquet"))
    if not paths:
        raise UserError(f"{redacted(filter_output_path)} has no scores/*.parquet; pass the output_path of a finished nsfw-filter run.")
    for path in paths:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=["shard", "key", "passed"])
        for shard, key, ok in zip(*(table.column(c).to_pylist() for c in ("shard", "key", "passed"))):
            if ok:
                passed.add((shard, key))
    return passed


def earlier_copies(output: Location) -> list[str]:
    """The deduplicated-copy tars an earlier run's summary.json names (validated; [] when there is none)."""
    fs, path = output.at(join_url(output.url, "summary.json")).filesystem()
    try:
        with fs.open(path, "rb") as handle:
            named = json.loads(handle.read()).get("deduplicated_shards")
    except (FileNotFoundError, ValueError, AttributeError, RecursionError):
        return []
    return [url for url in named if isinstance(url, str)] if isinstance(named, list) else []


def remove_stale_copies(output: Location, written: Sequence[str], earlier: Sequence[str], run_shards: int, mark: int) -> list[str]:
    """Delete copy tars of earlier runs this run did not rewrite, for input shard numbers below the output's
    recorded `mark`: those `earlier` names and those a killed run wrote in sequence after them. Shard numbers
    past this run's `run_shards` are found by one listing of `shards/`, so the work never grows with `mark`
    (read back from storage)."""
    written_per_shard: dict[int, int] = {}
    earlier_per_shard: dict[int, list[str]] = {}
    for url in written:
        name = output_shard_name(url)
        assert name is not None
        written_per_shard[name[0]] = written_per_shard.get(name[0], 0) + 1
    for url in earlier:
        name = output_shard_name(url)
        if name is not None:
            earlier_per_shard.setdefault(name[0], []).append(url)
    removed: list[str] = []
    beyond = partitions_with_outputs(output, run_shards, mark) if mark > run_shards else []
    for index in sorted(set(range(run_shards)) | set(earlier_per_shard) | set(beyond)):
        raise_if_stopped()
        removed += remove_stale_outputs(output, index, written_per_shard.get(index, 0), earlier_per_shard.get(index, ()))
    return removed


def removed_samples(*frames: pd.DataFrame) -> dict[str, set[str]]:
    """Keys per shard of the rows a deduplicated copy leaves out (duplicates and skipped rows): a structure
    the size of what is removed, not of the dataset."""
    removed: dict[str, set[str]] = {}
    for frame in frames:
        for shard, keys in frame.groupby("shard", sort=False)["key"]:
            removed.setdefault(str(shard), set()).update(keys)
    return removed


def write_deduplicated_copy(
    shard_urls: Sequence[str],
    removed: dict[str, set[str]],
    output: Location,
    images_per_tar: int,
    passed: set[tuple[str, str]] | None = None,
    inputs: Location | None = None,
) -> list[str]:
    """Copy the samples of the input shards (reached as `inputs`) not in `removed` (and, when given, in
    `passed`), members byte for byte, into `{output}/shards/`, one shard at a time."""
    written: list[str] = []
    for index, url in enumerate(shard_urls):
        left_out = removed.get(url, set())
        with FilteredShardWriter(output, index, images_per_tar) as writer:
            for sample in iter_samples(shard_location(inputs, url), decode=None):
                if sample.key is None or sample.error is not None or sample.key in left_out:
                    continue
                if passed is None or (url, sample.key) in passed:
                    writer.add(sample)
        written.extend(writer.written)
    return written


def write_dedup_summary(output: Location, summary: dict) -> str:
    url = join_url(output.url, "summary.json")
    write_bytes_atomic(output.at(url), json.dumps(summary, indent=2, default=lambda o: asdict(o)).encode())
    return url
