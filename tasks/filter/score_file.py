"""Score embeddings a user already has (`.npy` [N, D], or Parquet with an `embedding` list column).

Serves embeddings computed elsewhere, such as clip-retrieval's `img_emb/*.npy` or its Parquet output.
Parquet input streams by record batch, so memory does not grow with the file; every input column is
carried over and `nsfw_score` (float32, null when not scored), each configured signal's score (and matched concept)
and `error` are added, plus `filtered_by` when a policy is given; an input that already has any of these columns
(an earlier output scored again) gets them replaced, with a warning.
Every input this cannot score (missing, unreadable, not numbers, wrong shape or dimension) and an output
that is a directory are a UserError of one sentence, raised before anything is written.
"""

from __future__ import annotations

import warnings
from pathlib import PurePosixPath
from typing import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.io.atomic import atomic_output
from tasks.io.locations import Location, resolve_url_credentials
from tasks.errors import UserError
from tasks.models.nsfw import NSFWHead
from tasks.signals.columns import NSFW
from tasks.signals.plan import SignalPlan
from tasks.signals.scoring import cached_scorer, filtered_by

READ_ROWS = 65536


def output_columns(signals: SignalPlan | None, with_policy: bool) -> tuple[str, ...]:
    """The columns this adds (and replaces in an input that has them), in order."""
    extra = [] if signals is None else [
        column for signal in signals.scored() if signal.name != NSFW for column in (signal.score_column, signal.concept_column) if column
    ]
    return ("nsfw_score", *extra, "error", *(("filtered_by",) if with_policy else ()))


def scored_columns(
    matrix: np.ndarray, reasons: list[str | None], head: NSFWHead, signals: SignalPlan | None, with_policy: bool, batch_size: int, device: str | None
) -> list[tuple[str, pa.Array]]:
    """The added columns for embeddings [N, D] (`reasons` names the rows that are no embedding; updated in place)."""
    result = head.score(matrix, batch_size=batch_size, device=device)
    for row, reason in result.unscored.items():
        reasons[row] = reasons[row] or reason
    scores: dict[str, np.ndarray] = {NSFW: np.asarray(result.nsfw_score, dtype=np.float32)}
    concepts: dict[str, list[str | None]] = {}
    scorable = np.array([reason is None for reason in reasons], dtype=bool)
    if signals is not None and signals.signals:
        values = cached_scorer(signals, head.embedding_dim).score(matrix[scorable])
        rows = np.flatnonzero(scorable).tolist()
        for name, column in values.scores.items():
            scores[name] = np.full(len(reasons), np.nan, dtype=np.float32)
            scores[name][scorable] = column
            for row in np.flatnonzero(scorable)[~np.isfinite(column)].tolist():
                reasons[row] = reasons[row] or f"signal {name} cannot score this embedding (zero length); not scored"
        for name, matched in values.concepts.items():
            concepts[name] = [None] * len(reasons)
            for row, concept in zip(rows, matched):
                concepts[name][row] = concept
    columns: list[tuple[str, pa.Array]] = []
    for signal in signals.scored() if signals is not None else ():
        if signal.name == NSFW:
            continue
        columns.append((signal.score_column, pa.array(scores[signal.name], type=pa.float32(), from_pandas=True)))
        if signal.concept_column:
            columns.append((signal.concept_column, pa.array(concepts[signal.name], type=pa.string())))
    columns.insert(0, ("nsfw_score", pa.array(scores[NSFW], type=pa.float32(), from_pandas=True)))
    columns.append(("error", pa.array(reasons, type=pa.string())))
    if with_policy:
        verdicts = filtered_by(signals.policy, scores, concepts, len(reasons))
        columns.append(("filtered_by", pa.array([v if ok else None for v, ok in zip(verdicts, scorable)], type=pa.string())))
    return columns


def _is_access_error(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, PermissionError) or bool(names & {"NoCredentialsError", "PartialCredentialsError", "ClientError"})


def _without_output_columns(table: pa.Table, output: Sequence[str]) -> pa.Table:
    replaced = [name for name in output if name in table.column_names]
    return table.drop_columns(replaced) if replaced else table


def _check_output(output_path: str) -> None:
    try:
        fs, path = fsspec.core.url_to_fs(output_path)
        is_directory = fs.isdir(path)
    except Exception:  # noqa: BLE001 - an unreachable output is reported when it is written
        return
    if is_directory:
        raise UserError(f"--output {output_path} is a directory; name the Parquet file to write, e.g. {output_path.rstrip('/')}/scores.parquet.")


def embeddings_from_list_column(column: pa.Array | pa.ChunkedArray, embedding_dim: int) -> tuple[np.ndarray, list[str | None]]:
    """A float32 [N, D] matrix from a list<float> column; null or wrong-length rows become NaN with a reason."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)):
        raise UserError(f"the `embedding` column has type {column.type}; it must be a list of floats.")
    lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    good = valid & (lengths == embedding_dim)
    matrix = np.full((len(column), embedding_dim), np.nan, dtype=np.float32)
    if good.all():
        matrix[:] = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, embedding_dim)
    elif good.any():
        matrix[good] = np.stack([np.asarray(column[int(i)].as_py(), dtype=np.float32) for i in np.flatnonzero(good)])
    reasons: list[str | None] = [None] * len(column)
    for row in np.flatnonzero(~good):
        reasons[row] = "no embedding" if not valid[row] else f"embedding has {lengths[row]} values, expected {embedding_dim}"
    return matrix, reasons


def _check_parquet_dimension(column: pa.Array, head: NSFWHead, source: str) -> None:
    lengths = column.value_lengths().drop_null().to_numpy(zero_copy_only=False)
    if len(lengths) and not (lengths == head.embedding_dim).any():
        head.check_dimension(int(lengths[0]), source)


def _scored_batch(
    table: pa.RecordBatch | pa.Table, head: NSFWHead, batch_size: int, device: str | None, signals: SignalPlan | None, with_policy: bool
) -> pa.Table:
    matrix, reasons = embeddings_from_list_column(table.column("embedding"), head.embedding_dim)
    out = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
    out = _without_output_columns(out, output_columns(signals, with_policy))
    for name, column in scored_columns(matrix, reasons, head, signals, with_policy, batch_size, device):
        out = out.append_column(name, column)
    return out


def score_embedding_file(
    input_path: str,
    output_path: str,
    head: NSFWHead,
    batch_size: int = 32,
    device: str | None = None,
    signals: SignalPlan | None = None,
    with_policy: bool = False,
) -> int:
    """Score every row of `input_path` with the NSFW head and `signals` (and their policy's `filtered_by` when
    `with_policy`) and write Parquet to `output_path`; returns the number of rows."""
    output = output_columns(signals, with_policy)
    suffix = PurePosixPath(input_path.split("?")[0]).suffix.lower()
    if suffix not in (".npy", ".parquet", ".pq"):
        raise UserError(f"{input_path} is neither .npy nor .parquet; pass embeddings as a [N, D] .npy or Parquet with an `embedding` column.")
    _check_output(output_path)
    try:
        source = fsspec.open(input_path, "rb").open()
    except FileNotFoundError:
        raise UserError(f"{input_path} does not exist; pass an existing .npy or Parquet file of embeddings.") from None
    except IsADirectoryError:
        raise UserError(f"{input_path} is a directory; pass one .npy or Parquet file of embeddings.") from None
    except Exception as error:  # noqa: BLE001 - access problems are the user's to fix; anything else propagates
        if not _is_access_error(error):
            raise
        raise UserError(f"cannot read {input_path} ({type(error).__name__}); check that it exists and that storage credentials are set.") from None
    rows = 0
    with source, atomic_output(Location(*resolve_url_credentials(output_path))) as sink:
        if suffix == ".npy":
            try:
                embeddings = np.load(source, allow_pickle=False)
            except (ValueError, EOFError, OSError):
                raise UserError(f"{input_path} is not a readable .npy array of numbers; save the embeddings with numpy.save (no pickled objects).") from None
            if embeddings.ndim != 2:
                raise UserError(f"{input_path} holds an array of shape {embeddings.shape}; embeddings must be [N, D].")
            if embeddings.dtype.kind not in "fiu":
                raise UserError(f"{input_path} holds {embeddings.dtype} values; embeddings must be real numbers (float32 or float16).")
            head.check_dimension(int(embeddings.shape[1]), f"the embeddings in {input_path}")
            matrix = np.asarray(embeddings, dtype=np.float32)
            added = scored_columns(matrix, [None] * len(matrix), head, signals, with_policy, batch_size, device)
            table = pa.table({"row": pa.array(np.arange(len(embeddings), dtype=np.int64)), **dict(added)})
            pq.write_table(table, sink)
            return len(embeddings)
        try:
            parquet = pq.ParquetFile(source)
        except pa.ArrowInvalid as exc:
            raise UserError(f"{input_path} is not a readable Parquet file ({exc}).") from None
        if "embedding" not in parquet.schema_arrow.names:
            raise UserError(f"{input_path} has no `embedding` column (columns: {', '.join(parquet.schema_arrow.names)}); name the list-of-floats column `embedding`.")
        embedding_type = parquet.schema_arrow.field("embedding").type
        if pa.types.is_list(embedding_type) or pa.types.is_large_list(embedding_type) or pa.types.is_fixed_size_list(embedding_type):
            value_type = embedding_type.value_type
            if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
                raise UserError(f"{input_path}'s `embedding` column holds lists of {value_type}; it must hold lists of floats.")
        replaced = [name for name in output if name in parquet.schema_arrow.names]
        if replaced:
            warnings.warn(f"{input_path} already has {' and '.join(replaced)}; the output replaces them with new values.", stacklevel=2)
        writer = None
        for batch in parquet.iter_batches(batch_size=READ_ROWS):
            if rows == 0:
                _check_parquet_dimension(batch.column("embedding"), head, f"the embeddings in {input_path}")
            scored = _scored_batch(batch, head, batch_size, device, signals, with_policy)
            if writer is None:
                writer = pq.ParquetWriter(sink, scored.schema)
            writer.write_table(scored)
            rows += batch.num_rows
        if writer is None:  # empty input: keep the schema
            empty = _without_output_columns(parquet.schema_arrow.empty_table(), output)
            empty_matrix = np.zeros((0, head.embedding_dim), dtype=np.float32)
            for name, column in scored_columns(empty_matrix, [], head, signals, with_policy, batch_size, device):
                empty = empty.append_column(name, column)
            writer = pq.ParquetWriter(sink, empty.schema)
        writer.close()
    return rows
