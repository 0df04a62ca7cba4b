"""Cluster buckets of the out-of-core search: centroids from a sample, rows streamed into bucket files.

The dataset's rows never sit in memory together. The layout of a run (`BucketLayout`) fixes the
canonical order (shards sorted by URL, rows of a shard by key, rows without a valid embedding left
out of the positions), the centroids and how clusters map to buckets:

1. `train_centroids`: spherical k-means (tasks/dedup/clusters.py) on the rows of a seeded random choice
   of shards, on residuals from their mean direction; written to `centroids.parquet`.
2. `assign_unit`: a *unit* (a run of consecutive shards) is read from the embedding store, each valid row
   assigned to its `clusters_per_point` nearest centroids, and written once per cluster (unit length, in
   float16: `BUCKET_ROW_DTYPE`) to
   `units/unit-NNNNNN.parquet`, one row group per bucket (cluster c lies in bucket c mod num_buckets),
   beside `units/keys-NNNNNN.parquet` (every keyed row's key and why it was skipped, if it was; for
   inspection only: the resolution takes keys from the store entries, not from a shared output's file).
3. `read_bucket`: one bucket's rows from every unit file (a row group each), validated.

Everything read back is validated (schema, dtype, shape, finite, unit length, ranges); nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.dedup.clusters import SAMPLES_PER_CENTROID, mean_direction, nearest_centroids, residual_block, residuals, spherical_kmeans
from tasks.dedup.compute import all_cpu_threads
from tasks.dedup.search import MATMUL_DTYPES, row_validity
from tasks.errors import UserError
from tasks.io.atomic import atomic_output
from tasks.io.locations import Location, redacted
from tasks.io.write import join_url
from tasks.store.entries import NORM_TOLERANCE, EmbeddingStore, embedding_matrix

LAYOUT_KEY = b"nsfw_curator_buckets"
# Skip codes of keys-*.parquet: 0 compared, 1 missing or non-finite, 2 all zeros (as tasks/dedup/search.py).
_REASON_CODES = (0, 1, 2)
_ASSIGN_ROWS = 4096
# Rows are assigned to clusters in the space of their residuals' top principal components (found on the
# centroids' sample): near-duplicates stay near there, and assigning costs D*P + P*K per row instead of D*K.
PROJECTION_DIM = 128
# Bucket rows are the unit-length rows rounded to float16: half the bytes of float32, so half the disk and I/O
# of the three copies of every row. They are only screened; exact similarities come from the store (resolve).
BUCKET_ROW_DTYPE = "<f2"


@dataclass(frozen=True)
class BucketLayout:
    """Everything that fixes a run's buckets; its fingerprint names the run's work folder contents."""

    work: Location  # the run's work folder, with the storage options that reach it
    identity: str
    shard_urls: tuple[str, ...]  # sorted: the canonical shard order
    shard_fingerprints: tuple[str, ...]
    units: tuple[tuple[int, int], ...]  # [start, stop) shard indices of each unit
    dim: int
    num_clusters: int
    clusters_per_point: int
    num_buckets: int
    similarity_threshold: float
    matmul_dtype: str
    seed: int
    bucket_rows_format: str = "unit-length float16"  # how unit files hold bucket rows (BUCKET_ROW_DTYPE)
    projection_dim: int = PROJECTION_DIM  # rows are clustered on this many principal components of their residuals

    def fingerprint(self) -> str:
        found = self.__dict__.get("_fingerprint")  # every file read checks it: computed once (the shard list is long)
        if found is None:
            fields = {name: value for name, value in asdict(self).items() if name != "work"}
            found = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
            object.__setattr__(self, "_fingerprint", found)
        return found

    @property
    def work_url(self) -> str:
        return self.work.url

    def at(self, url: str) -> Location:
        """A file of the work folder (one of the URLs below), reached as the work folder is."""
        return self.work.at(url)

    def centroids_url(self) -> str:
        return join_url(self.work_url, "centroids.parquet")

    def unit_url(self, unit: int) -> str:
        return join_url(self.work_url, f"units/unit-{unit:06d}.parquet")

    def keys_url(self, unit: int) -> str:
        return join_url(self.work_url, f"units/keys-{unit:06d}.parquet")

    def links_url(self, bucket: int) -> str:
        return join_url(self.work_url, f"links/bucket-{bucket:06d}.parquet")

    def torch_dtype(self) -> torch.dtype:
        return MATMUL_DTYPES[self.matmul_dtype]


@dataclass(frozen=True)
class Centroids:
    direction: torch.Tensor  # float32 [D], unit (or zero)
    basis: torch.Tensor  # float32 [P, D]: orthonormal rows, the residuals' principal directions
    centroids: torch.Tensor  # float32 [K, P], unit rows, in the basis' coordinates

    def nearest(self, residual_rows: torch.Tensor, count: int) -> torch.Tensor:
        """Indices [n, count] of the nearest centroids of unit residual rows (by cosine, once projected)."""
        return nearest_centroids(project(residual_rows, self.basis), self.centroids.to(residual_rows.dtype), count)[0]


def principal_basis(rows: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` principal directions of `rows` (uncentred: unit residuals already have no common direction),
    as orthonormal float32 rows [count, D], the strongest first."""
    second_moment = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for start in range(0, rows.shape[0], _ASSIGN_ROWS):
        block = rows[start : start + _ASSIGN_ROWS].double()
        second_moment += block.T @ block
    _, vectors = torch.linalg.eigh(second_moment)
    return vectors[:, -count:].flip(1).T.contiguous().float()


def project(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows in the basis' coordinates, re-normalised (zero where a row is orthogonal to it), in the rows' dtype."""
    return torch.nn.functional.normalize(rows.float() @ basis.T, dim=1).to(rows.dtype)


@dataclass(frozen=True)
class BucketRows:
    """One bucket's rows: canonical positions (ascending, distinct), float32 rows, and each cluster's members."""

    positions: np.ndarray  # int64 [n]
    embeddings: np.ndarray  # float32 [n, D]: unit-length rows as rounded to float16 in the unit files
    clusters: np.ndarray  # int64 [m]: the bucket's clusters, ascending
    members: list[np.ndarray]  # per cluster: ascending local row indices


def _embedding_column(embeddings: np.ndarray, dtype: str = "<f4") -> pa.FixedSizeBinaryArray:
    """Rows as fixed-size binary values of little-endian float32 or float16 (`dtype`; Parquet writes a list
    column value by value, far slower)."""
    data = np.ascontiguousarray(embeddings, dtype=dtype)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(data.itemsize * embeddings.shape[1]), data.shape[0], [None, pa.py_buffer(data)])


def _with_record(table: pa.Table, record: dict) -> pa.Table:
    return table.replace_schema_metadata({LAYOUT_KEY: json.dumps(record, sort_keys=True)})


def _write_table(location: Location, table: pa.Table, row_groups: list[pa.Table] | None = None) -> str:
    # embeddings neither compress nor repeat: compressing and dictionary-encoding them only costs time
    options = dict(compression="none", use_dictionary=False)
    with atomic_output(location) as handle:
        if row_groups is None:
            pq.write_table(table, handle, **options)
        else:
            with pq.ParquetWriter(handle, table.schema, **options) as writer:
                for group in row_groups:
                    writer.write_table(group.replace_schema_metadata(table.schema.metadata), row_group_size=max(1, group.num_rows))
    return location.url


def _damaged(url: str, why: str) -> UserError:
    return UserError(f"the bucket file {redacted(url)} is damaged ({why}); delete it and run again to rebuild it.")


def _record_of(url: str, schema: pa.Schema, layout: BucketLayout) -> dict | None:
    """The file's layout record when it belongs to this layout; None when it was written for another run."""
    try:
        record = json.loads((schema.metadata or {})[LAYOUT_KEY])
    except (KeyError, UnicodeDecodeError, ValueError) as error:
        raise _damaged(url, "no readable layout record") from error
    if not isinstance(record, dict):
        raise _damaged(url, "layout record is not an object")
    return record if record.get("layout") == layout.fingerprint() else None


def open_parquet(location: Location) -> pq.ParquetFile | None:
    """The Parquet file at `location` (footer read), or None when there is none."""
    url = location.url
    fs, path = location.filesystem()
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        return None
    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as error:
        raise _damaged(url, f"{type(error).__name__}: {error}") from error


def check_unit_rows(url: str, embeddings: np.ndarray) -> None:
    """Rows read back must be finite and of unit length, as the store wrote them (bucket rows as they were rounded)."""
    if not np.isfinite(embeddings).all():
        raise _damaged(url, "non-finite embedding values")
    norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64))
    if embeddings.shape[0] and np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        raise _damaged(url, "an embedding is not of unit length")


def embeddings_of(url: str, table: pa.Table, dim: int, name: str = "embedding", dtype: str = "<f4") -> np.ndarray:
    """A column of `_embedding_column` as [rows, dim] of `dtype` (read-only), after checking its type."""
    column = table.column(name).combine_chunks()
    itemsize = np.dtype(dtype).itemsize
    if column.type != pa.binary(itemsize * dim) or column.null_count:
        raise _damaged(url, f"{name} column is {column.type} with {column.null_count} nulls, not {dim} {np.dtype(dtype).name} values per row")
    if not len(column):
        return np.zeros((0, dim), dtype=dtype)
    return np.frombuffer(column.buffers()[1], dtype=dtype, count=len(column) * dim, offset=column.offset * itemsize * dim).reshape(len(column), dim)


def _int_column(url: str, table: pa.Table, name: str, low: int, high: int) -> np.ndarray:
    column = table.column(name)
    if not pa.types.is_integer(column.type) or column.null_count:
        raise _damaged(url, f"column {name} is not integers without nulls")
    values = column.to_numpy().astype(np.int64)
    if values.size and (values.min() < low or values.max() >= high):
        raise _damaged(url, f"column {name} holds values outside [{low}, {high})")
    return values


# ---------------------------------------------------------------------------------------------------
# Reading the store


def shard_rows(store: EmbeddingStore, layout: BucketLayout, shard: int) -> tuple[list[str], np.ndarray]:
    """A shard's keyed rows sorted by key: keys and float32 embeddings (NaN rows where none was made)."""
    url = layout.shard_urls[shard]
    table = store.read_table(layout.identity, url, layout.shard_fingerprints[shard], embedding_dim=layout.dim)
    if table is None:
        raise UserError(f"the store entry for {redacted(url)} disappeared or is unreadable; run the flow again to re-embed it.")
    keys = table.column("key").to_pylist()
    keyed = np.array([key is not None for key in keys], dtype=bool)
    matrix = embedding_matrix(table)[keyed]
    keys = [key for key in keys if key is not None]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    keys = [keys[index] for index in order]
    for previous, key in zip(keys, keys[1:]):
        if previous == key:
            raise UserError(
                f"(shard, key) ({url!r}, {key!r}) appears more than once; each embedding row must be a distinct sample (drop repeated rows first)."
            )
    return keys, matrix[np.asarray(order, dtype=np.int64)]


def _screen_block(embeddings: np.ndarray, inverse_norm: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(embeddings * inverse_norm[:, None]).to(dtype)


# ---------------------------------------------------------------------------------------------------
# Centroids


def train_centroids(store: EmbeddingStore, layout: BucketLayout) -> str:
    """Train the centroids on the rows of randomly chosen shards (seeded) and write them; kept when already written."""
    if read_centroids(layout) is not None:
        return layout.centroids_url()
    generator = torch.Generator().manual_seed(layout.seed)
    wanted = layout.num_clusters * SAMPLES_PER_CENTROID
    blocks: list[torch.Tensor] = []
    sampled = 0
    for shard in torch.randperm(len(layout.shard_urls), generator=generator).tolist():
        _, embeddings = shard_rows(store, layout, shard)
        inverse_norm, reason = row_validity(embeddings)
        valid = reason == 0
        blocks.append(_screen_block(embeddings[valid], inverse_norm[valid], layout.torch_dtype()))
        sampled += int(valid.sum())
        if sampled >= wanted:
            break
    sample = torch.cat(blocks)
    if sample.shape[0] > wanted:
        sample = sample[torch.sort(torch.randperm(sample.shape[0], generator=generator)[:wanted]).values]
    num_clusters = min(layout.num_clusters, sample.shape[0])
    if num_clusters < layout.num_clusters:
        raise UserError(f"only {sample.shape[0]} embeddings to train {layout.num_clusters} clusters on; use the in-memory search for so few rows.")
    with all_cpu_threads():
        direction = mean_direction(sample)
        residual = residuals(sample, direction)
        del sample
        basis = principal_basis(residual, layout.projection_dim)
        centroids = spherical_kmeans(project(residual, basis), num_clusters, generator)
    # one column of D values per row: the direction, the basis, then the centroids padded with zeros
    padded = torch.zeros(num_clusters, layout.dim)
    padded[:, : layout.projection_dim] = centroids
    table = _with_record(
        pa.table({"centroid": _embedding_column(torch.cat([direction[None], basis, padded]).numpy())}),
        {"layout": layout.fingerprint()},
    )
    return _write_table(layout.at(layout.centroids_url()), table)


def read_centroids(layout: BucketLayout) -> Centroids | None:
    """The layout's centroids (direction first), validated; None when not written for this layout."""
    url = layout.centroids_url()
    parquet = open_parquet(layout.at(url))
    if parquet is None or _record_of(url, parquet.schema_arrow, layout) is None:
        return None
    table = parquet.read()
    basis_rows = layout.projection_dim
    if table.num_rows != 1 + basis_rows + layout.num_clusters:
        raise _damaged(url, f"{table.num_rows} rows, not {1 + basis_rows + layout.num_clusters}")
    values = embeddings_of(url, table, layout.dim, "centroid")
    if not np.isfinite(values).all():
        raise _damaged(url, "non-finite centroid values")
    norms = np.linalg.norm(values.astype(np.float64), axis=1)
    if np.abs(norms[1:] - 1.0).max(initial=0.0) > 1e-3 or not (norms[0] < 1e-3 or abs(norms[0] - 1.0) < 1e-3):
        raise _damaged(url, "centroids are not of unit length")
    if np.any(values[1 + basis_rows :, basis_rows:] != 0):
        raise _damaged(url, "centroids have values beyond the projection's dimensions")
    values = values.astype(np.float32)  # a writable copy
    return Centroids(direction=torch.from_numpy(values[0]), basis=torch.from_numpy(values[1 : 1 + basis_rows]),
                     centroids=torch.from_numpy(np.ascontiguousarray(values[1 + basis_rows :, :basis_rows])))


# ---------------------------------------------------------------------------------------------------
# Units


def unit_done(layout: BucketLayout, unit: int) -> bool:
    """Whether the unit's two files exist and were written for this layout (the unit file is written last)."""
    parquet = open_parquet(layout.at(layout.unit_url(unit)))
    return parquet is not None and _record_of(layout.unit_url(unit), parquet.schema_arrow, layout) is not None


def assign_unit(store: EmbeddingStore, layout: BucketLayout, unit: int) -> str:
    """Read the unit's shards, assign each valid row to its nearest clusters, write its keys and bucket rows."""
    if unit_done(layout, unit):
        return layout.unit_url(unit)
    found = read_centroids(layout)
    if found is None:
        raise UserError(f"{redacted(layout.centroids_url())} is missing; run the dedup flow again to train the centroids.")
    dtype = layout.torch_dtype()
    direction = found.direction
    start, stop = layout.units[unit]
    key_parts: list[pa.Table] = []
    rows: list[np.ndarray] = []
    nearest: list[np.ndarray] = []
    valid_rows = 0
    for shard in range(start, stop):
        keys, embeddings = shard_rows(store, layout, shard)
        inverse_norm, reason = row_validity(embeddings)
        key_parts.append(pa.table({"shard": pa.array(np.full(len(keys), shard, dtype=np.int32)), "key": pa.array(keys, pa.string()),
                                   "reason": pa.array(reason.astype(np.int8))}))
        valid = np.flatnonzero(reason == 0)
        valid_rows += valid.shape[0]
        rows.append((embeddings[valid] * inverse_norm[valid, None]).astype(BUCKET_ROW_DTYPE))
        with all_cpu_threads():
            for block in range(0, valid.shape[0], _ASSIGN_ROWS):
                chosen = valid[block : block + _ASSIGN_ROWS]
                residual = residual_block(_screen_block(embeddings[chosen], inverse_norm[chosen], dtype), direction)
                nearest.append(found.nearest(residual, layout.clusters_per_point).numpy())
    embeddings = np.concatenate(rows) if rows else np.zeros((0, layout.dim), BUCKET_ROW_DTYPE)
    clusters = np.concatenate(nearest) if nearest else np.zeros((0, layout.clusters_per_point), np.int64)
    record = {"layout": layout.fingerprint(), "unit": unit, "valid_rows": valid_rows}
    keys = pa.concat_tables(key_parts) if key_parts else pa.table({"shard": pa.array([], pa.int32()), "key": pa.array([], pa.string()),
                                                                    "reason": pa.array([], pa.int8())})
    _write_table(layout.at(layout.keys_url(unit)), _with_record(keys, record))

    # one entry per (row, cluster), grouped by bucket then cluster, rows ascending inside a cluster
    flat_cluster = clusters.reshape(-1)
    flat_row = np.repeat(np.arange(clusters.shape[0], dtype=np.int64), layout.clusters_per_point)
    bucket = flat_cluster % layout.num_buckets
    order = np.lexsort((flat_row, flat_cluster, bucket))
    flat_cluster, flat_row, bucket = flat_cluster[order], flat_row[order], bucket[order]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]]) if bucket.size else np.zeros(0, np.int64)
    ends = np.append(starts[1:], bucket.shape[0])
    groups, row_group_of = [], {}
    for index, (first, last) in enumerate(zip(starts, ends)):
        row_group_of[int(bucket[first])] = index
        groups.append(pa.table({
            "position": pa.array(flat_row[first:last]),
            "cluster": pa.array(flat_cluster[first:last].astype(np.int32)),
            "embedding": _embedding_column(embeddings[flat_row[first:last]], BUCKET_ROW_DTYPE),
        }))
    schema_table = pa.table({"position": pa.array([], pa.int64()), "cluster": pa.array([], pa.int32()),
                             "embedding": _embedding_column(np.zeros((0, layout.dim), BUCKET_ROW_DTYPE), BUCKET_ROW_DTYPE)})
    record["row_groups"] = {str(key): value for key, value in row_group_of.items()}
    return _write_table(layout.at(layout.unit_url(unit)), _with_record(schema_table, record), row_groups=groups)


def _unit_file(layout: BucketLayout, unit: int) -> tuple[str, pq.ParquetFile, dict]:
    """The unit file's URL, footer and layout record; UserError when it is missing or of another run."""
    url = layout.unit_url(unit)
    parquet = open_parquet(layout.at(url))
    record = None if parquet is None else _record_of(url, parquet.schema_arrow, layout)
    if parquet is None or record is None:
        raise UserError(f"{redacted(url)} is missing; run the dedup flow again to assign its rows.")
    return url, parquet, record


def unit_valid_rows(layout: BucketLayout, unit: int) -> int:
    url, _, record = _unit_file(layout, unit)
    valid_rows = record.get("valid_rows")
    if not isinstance(valid_rows, int) or valid_rows < 0:
        raise _damaged(url, "valid_rows is not a count")
    return valid_rows


def unit_offsets(layout: BucketLayout) -> np.ndarray:
    """Canonical position of each unit's first valid row, and the total at the end ([units + 1])."""
    counts = [unit_valid_rows(layout, unit) for unit in range(len(layout.units))]
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def read_bucket(layout: BucketLayout, bucket: int, offsets: np.ndarray) -> BucketRows:
    """The bucket's rows from every unit file: distinct rows by position and each of its clusters' members.

    Positions and clusters are read first, then each unit's embeddings straight into the bucket's array,
    so memory holds the bucket's distinct rows and one unit's share of them.
    """
    positions, clusters, parts = [], [], []
    for unit in range(len(layout.units)):
        url, parquet, record = _unit_file(layout, unit)
        row_groups = record.get("row_groups")
        if not isinstance(row_groups, dict):
            raise _damaged(url, "no row-group map")
        group = row_groups.get(str(bucket))
        if group is None:
            continue
        if not isinstance(group, int) or not 0 <= group < parquet.num_row_groups:
            raise _damaged(url, f"row group {group!r} of bucket {bucket} does not exist")
        table = parquet.read_row_group(group, columns=["position", "cluster"])
        cluster = _int_column(url, table, "cluster", 0, layout.num_clusters)
        if np.any(cluster % layout.num_buckets != bucket):
            raise _damaged(url, f"rows of other buckets in bucket {bucket}")
        valid_rows = int(offsets[unit + 1] - offsets[unit])
        positions.append(_int_column(url, table, "position", 0, valid_rows) + offsets[unit])
        clusters.append(cluster)
        parts.append((url, parquet, group, table.num_rows))
    if not positions:
        return BucketRows(np.zeros(0, np.int64), np.zeros((0, layout.dim), np.float32), np.zeros(0, np.int64), [])
    position, cluster = np.concatenate(positions), np.concatenate(clusters)
    distinct, first, local = np.unique(position, return_index=True, return_inverse=True)
    rows = np.empty((distinct.shape[0], layout.dim), dtype=np.float32)
    start = 0
    for url, parquet, group, count in parts:
        wanted = np.flatnonzero((first >= start) & (first < start + count))
        block = embeddings_of(url, parquet.read_row_group(group, columns=["embedding"]), layout.dim, dtype=BUCKET_ROW_DTYPE)
        if block.shape[0] != count:
            raise _damaged(url, f"row group {group} changed while read")
        rows[wanted] = block[first[wanted] - start]
        check_unit_rows(url, rows[wanted])
        start += count
    order = np.lexsort((position, cluster))
    cluster_sorted = cluster[order]
    starts = np.flatnonzero(np.r_[True, cluster_sorted[1:] != cluster_sorted[:-1]])
    ends = np.append(starts[1:], order.shape[0])
    members = [local[order[first_entry:last_entry]] for first_entry, last_entry in zip(starts, ends)]
    return BucketRows(distinct, rows, cluster_sorted[starts], members)


def plan_units(row_counts: list[int], unit_rows: int) -> tuple[tuple[int, int], ...]:
    """Consecutive runs of shards of about `unit_rows` rows each (at least one shard)."""
    units, start, rows = [], 0, 0
    for shard, count in enumerate(row_counts):
        rows += count
        if rows >= unit_rows:
            units.append((start, shard + 1))
            start, rows = shard + 1, 0
    if start < len(row_counts):
        units.append((start, len(row_counts)))
    return tuple(units)


def num_buckets_for(num_rows: int, clusters_per_point: int, num_clusters: int, bucket_rows: int) -> int:
    return max(1, min(num_clusters, math.ceil(num_rows * clusters_per_point / max(1, bucket_rows))))
