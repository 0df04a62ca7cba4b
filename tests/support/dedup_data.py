"""Synthetic embeddings with planted near-duplicate groups, for dedup tests and benchmarks.

Background rows are random unit vectors (in high dimension nearly orthogonal to each other, so they
never match by accident), or, with `topics`, rows scattered around topic centres of Zipf-distributed
sizes (two rows of a topic have cosine about `topic_cosine`), which is closer to CLIP embeddings and
makes k-means clusters uneven. A planted group is laid out on consecutive rows and is one of:
- a star: a hub `u` and leaves `c*u + sqrt(1-c^2)*z` (z a unit vector orthogonal to u), c drawn from
  `leaf_similarity`, so every leaf matches the hub and leaves may or may not match each other;
- a chain: `cos(k*t)*u + sin(k*t)*v` for k = 0, 1, ..., cos(t) drawn from `chain_step_similarity`, so
  neighbours match and rows two steps apart do not (when cos(2t) is below the threshold).
Rows are generated in float32, chunk by chunk, into one preallocated array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK_ROWS = 65536
_GROUPS_PER_STEP = 4096


@dataclass(frozen=True)
class PlantedDuplicates:
    embeddings: np.ndarray  # float32 [N, D], unit rows
    group: np.ndarray  # int64 [N]: planted group id, -1 for background rows
    key: np.ndarray  # object [N]: distinct keys, scattered so (shard, key) order differs from row order
    shard: np.ndarray  # object [N]

    def planted_groups(self, rows: np.ndarray | None = None) -> set[frozenset[tuple[str, str]]]:
        """Planted groups as sets of (shard, key), optionally restricted to whole groups among `rows`."""
        rows = np.arange(self.group.shape[0]) if rows is None else rows
        in_group = rows[self.group[rows] >= 0]
        groups: dict[int, set[tuple[str, str]]] = {}
        for row in in_group:
            groups.setdefault(int(self.group[row]), set()).add((self.shard[row], self.key[row]))
        return {frozenset(members) for members in groups.values()}


def unit_rows(rng: np.random.Generator, num_rows: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((num_rows, dim), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def _orthogonal_unit(direction: np.ndarray, base: np.ndarray) -> np.ndarray:
    """`direction` made orthogonal to `base` (both [..., D], base unit) and normalised."""
    direction = direction - np.sum(direction * base, axis=-1, keepdims=True) * base
    return direction / np.linalg.norm(direction, axis=-1, keepdims=True)


def planted_duplicates(
    num_rows: int,
    dim: int,
    *,
    duplicate_fraction: float = 0.1,
    group_sizes: tuple[int, ...] = (2, 3, 4, 5),
    chain_fraction: float = 0.3,
    leaf_similarity: tuple[float, float] = (0.9905, 0.9995),
    chain_step_similarity: tuple[float, float] = (0.9905, 0.9940),
    rows_per_shard: int = 1000,
    topics: int = 0,
    topic_cosine: float = 0.5,
    seed: int = 0,
) -> PlantedDuplicates:
    """`num_rows` unit embeddings of which about `duplicate_fraction` sit in planted groups."""
    rng = np.random.default_rng(seed)
    embeddings = np.empty((num_rows, dim), dtype=np.float32)
    if topics:
        centres = unit_rows(rng, topics, dim)
        weights = 1.0 / np.arange(1, topics + 1)
        topic_of_row = rng.choice(topics, size=num_rows, p=weights / weights.sum())
    for start in range(0, num_rows, _CHUNK_ROWS):
        chunk = unit_rows(rng, min(_CHUNK_ROWS, num_rows - start), dim)
        if topics:
            chunk = np.sqrt(topic_cosine) * centres[topic_of_row[start : start + chunk.shape[0]]] + np.sqrt(1 - topic_cosine) * chunk
            chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        embeddings[start : start + _CHUNK_ROWS] = chunk

    # layout: groups and background rows interleaved at random, each group on consecutive rows
    mean_size = float(np.mean(group_sizes))
    num_groups = int(num_rows * duplicate_fraction / mean_size)
    sizes = rng.choice(np.asarray(group_sizes), size=num_groups)
    while sizes.sum() > num_rows:
        sizes = sizes[:-1]
    units = np.concatenate([sizes, np.ones(num_rows - int(sizes.sum()), dtype=sizes.dtype)])
    is_group = np.concatenate([np.ones(sizes.shape[0], dtype=bool), np.zeros(units.shape[0] - sizes.shape[0], dtype=bool)])
    order = rng.permutation(units.shape[0])
    units, is_group = units[order], is_group[order]
    unit_start = np.concatenate([[0], np.cumsum(units)[:-1]])
    group_start, group_size = unit_start[is_group], units[is_group]
    is_chain = rng.random(group_start.shape[0]) < chain_fraction

    group = np.full(num_rows, -1, dtype=np.int64)
    for size in np.unique(group_size):
        for chain in (False, True):
            starts = group_start[(group_size == size) & (is_chain == chain)]
            for step in range(0, starts.shape[0], _GROUPS_PER_STEP):
                batch = starts[step : step + _GROUPS_PER_STEP]
                rows = batch[:, None] + np.arange(size)[None, :]
                hub = embeddings[batch].astype(np.float64)[:, None, :]
                if chain:
                    direction = _orthogonal_unit(embeddings[batch + 1].astype(np.float64), hub[:, 0])[:, None, :]
                    angle = np.arccos(rng.uniform(*chain_step_similarity, size=(batch.shape[0], 1)))
                    turn = angle * np.arange(size)[None, :]
                    members = np.cos(turn)[..., None] * hub + np.sin(turn)[..., None] * direction
                else:
                    noise = _orthogonal_unit(embeddings[rows[:, 1:]].astype(np.float64), hub)
                    similarity = rng.uniform(*leaf_similarity, size=(batch.shape[0], size - 1, 1))
                    leaves = similarity * hub + np.sqrt(1 - similarity**2) * noise
                    members = np.concatenate([hub, leaves], axis=1)
                embeddings[rows] = members.astype(np.float32)
    group_ids = np.repeat(np.arange(group_start.shape[0]), group_size)
    group_rows = np.concatenate([np.arange(s, s + n) for s, n in zip(group_start, group_size)]) if group_start.size else np.zeros(0, dtype=np.int64)
    group[group_rows] = group_ids

    scattered = rng.permutation(num_rows)
    key = np.array([f"{index:09d}" for index in scattered], dtype=object)
    shard = np.array([f"shard-{index // rows_per_shard:05d}.tar" for index in scattered], dtype=object)
    return PlantedDuplicates(embeddings=embeddings, group=group, key=key, shard=shard)


def write_planted_store(data: PlantedDuplicates, shards_dir, store, identity: str, *, members: bool = True) -> list[str]:
    """Write `data` as a dataset under `shards_dir` (a path, URL or Location) and its embedding-store entries:
    one tar per shard name (a tiny image and a caption per key, or with `members=False` one small member
    naming the shard) and its entry of every row's embedding. Returns the shard URLs."""
    from tasks.io.atomic import write_bytes_atomic
    from tasks.io.locations import as_location
    from tasks.store.entries import embedding_table
    from tests.support.tars import Member, drawn_image, encode, tar_bytes

    image = encode(drawn_image(16, 16, seed=0), "JPEG")
    shards = as_location(shards_dir)

    order = np.argsort(data.shard, kind="stable")
    names = data.shard[order]
    starts = np.flatnonzero(np.r_[True, names[1:] != names[:-1]])
    ends = np.append(starts[1:], names.shape[0])
    urls = []
    for start, end in zip(starts, ends):
        rows = order[start:end]
        url = f"{shards.url.rstrip('/')}/{names[start]}"
        keys = [str(key) for key in data.key[rows]]
        if members:
            entries = [member for key in keys for member in (Member(f"{key}.jpg", image), Member(f"{key}.txt", f"caption of {key}".encode()))]
        else:
            entries = [Member("shard.txt", url.encode())]
        write_bytes_atomic(shards.at(url), tar_bytes(entries))
        store.write(identity, url, embedding_table(keys, url, data.embeddings[rows], [None] * len(keys)))
        urls.append(url)
    return urls
