"""Convert LAION's Keras/AutoKeras NSFW-detector zip to the safetensors head format, without TensorFlow.

The zip is a Keras 2.8 SavedModel directory. Each tensor of the head comes from one of its files, read
with a small protobuf wire-format decoder, a LevelDB-table reader and numpy:

- `keras_metadata.pb`: the layer graph as JSON. It must be InputLayer -> MultiCategoryEncoding ->
  Normalization -> (Dense, ReLU, Dropout*)... -> Dense(1) -> sigmoid; its `encoding` list names the
  categorical ("int") columns, and each column's StringLookup config fixes the OOV index.
- `variables/variables.index` + `variables.data-00000-of-00001`: a TensorFlow tensor bundle (a LevelDB
  SSTable of BundleEntryProto -> raw little-endian bytes, each checked by size and masked CRC32C) with
  the normalisation mean/variance and the dense kernels [in, out] and biases.
- `saved_model.pb`: the vocabularies. Keras empties `token_counts` once `adapt` has built the lookup
  table, so the checkpoint holds none; the table survives as the two constants (tokens, indices) its
  initializer function captures, found through the SavedObjectGraph: root -> layer_with_weights-0 ->
  encoding_layers -> {column} -> lookup_table -> _initialize -> bound inputs.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tasks.io.atomic import write_bytes_atomic
from tasks.errors import UserError

LAION_REPOSITORY = "LAION-AI/CLIP-based-NSFW-Detector"
LAION_URL = f"https://github.com/{LAION_REPOSITORY}"
LICENSE = "MIT"
# Keras's Normalization floors the standard deviation at backend.epsilon().
NORM_EPSILON = 1e-7

_TABLE_MAGIC = 0xDB4775248B80FB57
_TABLE_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5
_CRC_MASK_DELTA = 0xA282EAD8
_MAX_MEMBER_BYTES = 1 << 30
# TensorFlow DataType enum values we read, and their numpy layout in a little-endian bundle.
_DT_STRING, _DT_INT64 = 7, 9
_BUNDLE_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", _DT_INT64: "<i8"}
# printf("%f") of a finite number: optional sign, digits, exactly six decimals.
_PERCENT_F = re.compile(rb"(-?)(\d+)\.(\d{6})")
# "%f" of NaN or inf: only non-finite inputs produce these, and the head never scores those.
_NON_FINITE_TOKENS = {b"nan", b"-nan", b"inf", b"-inf"}


class _CorruptError(Exception):
    """The zip's bytes are damaged or not what their format promises."""


class _UnsupportedError(Exception):
    """A well-formed Keras model, but not the architecture of LAION's detector."""


# -- CRC32C (Castagnoli), as TensorFlow and LevelDB mask it -------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (pure Python: about 15 MB/s, plenty for a 1 MB checkpoint)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


# -- protobuf wire format -----------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _CorruptError("a varint runs past the end of its buffer")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _CorruptError("a varint is longer than 10 bytes")


def _message(buf: bytes) -> dict[int, list]:
    """A protobuf message's fields by number: ints for varint/fixed fields, bytes for the rest."""
    if not isinstance(buf, bytes):
        raise _CorruptError("a protobuf message field has the wrong wire type")
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire_type == 2:
            size, pos = _varint(buf, pos)
            value = buf[pos : pos + size]
            pos += size
        else:
            raise _CorruptError(f"protobuf wire type {wire_type} is not used by these files")
        if pos > len(buf):
            raise _CorruptError("a protobuf field runs past the end of its message")
        fields.setdefault(number, []).append(value)
    return fields


def _first(fields: dict[int, list], number: int, default: int | bytes):
    """A field's last value (protobuf's rule for scalars), which must have the default's type."""
    values = fields.get(number)
    if not values:
        return default
    if type(values[-1]) is not type(default):
        raise _CorruptError(f"protobuf field {number} has the wrong wire type")
    return values[-1]


def _submessage(fields: dict[int, list], number: int) -> dict[int, list]:
    return _message(_first(fields, number, b""))


def _packed_ints(values: list) -> list[int]:
    """A repeated integer field, whether packed (bytes) or not (ints)."""
    result = []
    for value in values:
        if isinstance(value, int):
            result.append(value)
            continue
        pos = 0
        while pos < len(value):
            number, pos = _varint(value, pos)
            result.append(number)
    return result


def _text(raw: bytes) -> str:
    """A name field; damaged bytes become U+FFFD (and then a clear "not found") instead of raising."""
    if not isinstance(raw, bytes):
        raise _CorruptError("a protobuf string field has the wrong wire type")
    return raw.decode("utf-8", "replace")


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shape(shape_proto: bytes) -> list[int]:
    """TensorShapeProto -> dims; `dim` is field 2, each Dim's `size` field 1."""
    dims = [_int64(_first(_message(dim), 1, 0)) for dim in _message(shape_proto).get(2, [])]
    if any(size < 0 for size in dims):
        raise _CorruptError(f"a tensor has an unknown dimension in shape {dims}")
    return dims


# -- tensor bundle: the variables checkpoint ----------------------------------------------------------


def _table_block(table: bytes, handle: bytes) -> bytes:
    """The block a BlockHandle (offset, size) points to, after checking its trailer's type and CRC."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + _BLOCK_TRAILER_SIZE > len(table) - _TABLE_FOOTER_SIZE:
        raise _CorruptError("variables.index is truncated")
    compression = table[end]
    if compression != 0:
        raise _CorruptError(f"variables.index uses block compression {compression}; TensorFlow writes none")
    if _masked_crc32c(table[offset : end + 1]) != int.from_bytes(table[end + 1 : end + 5], "little"):
        raise _CorruptError("variables.index fails its block checksum")
    return table[offset:end]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Key/value pairs of a LevelDB block: prefix-compressed keys, then restart offsets, then their count."""
    if len(block) < 4:
        raise _CorruptError("variables.index has a block shorter than its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * restarts
    if limit < 0:
        raise _CorruptError("variables.index has a block with more restart points than bytes")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_size > limit:
            raise _CorruptError("variables.index has a malformed block entry")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_size]
        pos += value_size


def _bundle_entries(index: bytes) -> dict[str, dict[int, list]]:
    """Checkpoint key -> BundleEntryProto fields, from the index SSTable (two-level: index block -> data blocks)."""
    if len(index) < _TABLE_FOOTER_SIZE or int.from_bytes(index[-8:], "little") != _TABLE_MAGIC:
        raise _CorruptError("variables.index is not a TensorFlow tensor-bundle index")
    footer = index[-_TABLE_FOOTER_SIZE:-8]
    _, pos = _varint(footer, 0)  # the metaindex handle: offset, then size (unused: no filters)
    _, pos = _varint(footer, pos)
    raw_entries = {}
    for _, handle in _block_entries(_table_block(index, footer[pos:])):
        raw_entries.update(_block_entries(_table_block(index, handle)))
    header = _message(raw_entries.pop(b"", b""))
    if _first(header, 1, 0) != 1:
        raise _CorruptError("the checkpoint is not a single-shard tensor bundle")
    if _first(header, 2, 0) != 0:
        raise _UnsupportedError("the checkpoint was written on a big-endian machine")
    return {_text(key): _message(value) for key, value in raw_entries.items()}


def _bundle_tensor(entries: dict[str, dict[int, list]], data: bytes, key: str) -> np.ndarray:
    """A numeric tensor of the checkpoint, checked against the size and masked CRC32C its entry records."""
    entry = entries.get(key)
    if entry is None:
        raise _UnsupportedError(f"the checkpoint has no {key}")
    dtype = _BUNDLE_DTYPES.get(_first(entry, 1, 0))
    if dtype is None or _first(entry, 3, 0) != 0 or entry.get(7):
        raise _UnsupportedError(f"{key} is not a plain numeric tensor in shard 0")
    shape = _shape(_first(entry, 2, b""))
    offset, size = _first(entry, 4, 0), _first(entry, 5, 0)
    if size != np.dtype(dtype).itemsize * math.prod(shape):
        raise _CorruptError(f"{key} records {size} bytes for shape {shape}")
    raw = data[offset : offset + size]
    if len(raw) != size:
        raise _CorruptError(f"the variables data file is truncated before the end of {key}")
    if _masked_crc32c(raw) != _first(entry, 6, 0):
        raise _CorruptError(f"{key} fails its checksum in the variables data file")
    return np.frombuffer(raw, dtype).reshape(shape).astype(dtype[1:])


# -- SavedModel: the vocabularies ---------------------------------------------------------------------


def _tensor_proto(proto: dict[int, list]) -> np.ndarray | list[bytes]:
    """A TensorProto as numpy int64 or a list of byte strings (the only kinds the vocabularies use)."""
    dtype, count = _first(proto, 1, 0), math.prod(_shape(_first(proto, 2, b"")))
    if dtype == _DT_STRING:
        values = proto.get(8, [])
        if len(values) != count:
            raise _CorruptError(f"a string constant holds {len(values)} values for {count} elements")
        return values
    if dtype != _DT_INT64:
        raise _UnsupportedError(f"a lookup-table constant has TensorFlow dtype {dtype}")
    content = _first(proto, 4, b"")
    if content:
        if len(content) != 8 * count:
            raise _CorruptError(f"an int64 constant holds {len(content)} bytes for {count} elements")
        return np.frombuffer(content, "<i8").astype(np.int64)
    values = [_int64(v) for v in _packed_ints(proto.get(10, []))]
    # A TensorProto may store fewer values than elements: the last one repeats.
    values += values[-1:] * (count - len(values))
    return np.array(values[:count], dtype=np.int64)


def _graph_constants(graph_def: dict[int, list]) -> dict[str, dict[int, list]]:
    """Name -> TensorProto fields of every top-level Const node of a GraphDef."""
    constants = {}
    for raw_node in graph_def.get(1, []):
        node = _message(raw_node)
        if _first(node, 2, b"") != b"Const":
            continue
        for raw_attr in node.get(5, []):  # map<string, AttrValue> entries
            attr = _message(raw_attr)
            if _first(attr, 1, b"") == b"value":
                constants[_text(_first(node, 1, b""))] = _submessage(_submessage(attr, 2), 8)
    return constants


def _vocabularies(saved_model: bytes, columns: list[int]) -> dict[int, tuple[list[bytes], np.ndarray]]:
    """Column -> (tokens, indices) of its StringLookup table, as the table's initializer captured them."""
    meta_graphs = _message(saved_model).get(2, [])
    if len(meta_graphs) != 1:
        raise _CorruptError(f"saved_model.pb holds {len(meta_graphs)} meta graphs instead of 1")
    meta_graph = _message(meta_graphs[0])
    constants = _graph_constants(_submessage(meta_graph, 2))
    object_graph = _submessage(meta_graph, 7)
    objects = object_graph.get(1, [])
    functions = {}
    for raw_item in object_graph.get(2, []):  # map<string, SavedConcreteFunction> entries
        item = _message(raw_item)
        functions[_text(_first(item, 1, b""))] = _submessage(item, 2)

    def saved_object(node_id: int) -> dict[int, list]:
        if not 0 <= node_id < len(objects):
            raise _CorruptError(f"the SavedModel object graph has no node {node_id}")
        return _message(objects[node_id])

    def child(node_id: int, name: str) -> int:
        for raw_reference in saved_object(node_id).get(1, []):
            reference = _message(raw_reference)
            if _first(reference, 2, b"") == name.encode():
                return _first(reference, 1, 0)
        raise _UnsupportedError(f"the SavedModel object graph has no {name!r} under node {node_id}")

    encoding_layers = child(child(0, "layer_with_weights-0"), "encoding_layers")
    vocabularies = {}
    for column in columns:
        initialize = child(child(child(encoding_layers, str(column)), "lookup_table"), "_initialize")
        function_names = _submessage(saved_object(initialize), 6).get(1, [])
        if not function_names or _text(function_names[0]) not in functions:
            raise _UnsupportedError(f"column {column}'s lookup table has no saved initializer function")
        captured = []
        for node_id in _packed_ints(functions[_text(function_names[0])].get(2, [])):
            constant = saved_object(node_id).get(9)  # SavedConstant: the Const op's name
            if constant:
                operation = _text(_first(_message(constant[0]), 1, b""))
                if operation not in constants:
                    raise _CorruptError(f"saved_model.pb has no constant {operation}")
                captured.append(_tensor_proto(constants[operation]))
        tokens = [c for c in captured if isinstance(c, list)]
        indices = [c for c in captured if isinstance(c, np.ndarray)]
        if len(tokens) != 1 or len(indices) != 1 or len(tokens[0]) != len(indices[0]):
            raise _UnsupportedError(f"column {column}'s lookup table is not one (tokens, indices) pair")
        vocabularies[column] = (tokens[0], indices[0])
    return vocabularies


def _micro(token: bytes) -> int:
    """A "%f" string times 10^6 as an exact integer ("-0.062683" -> -62683), with no float rounding."""
    match = _PERCENT_F.fullmatch(token)
    if match is None:
        raise _UnsupportedError(f"vocabulary token {token[:20]!r} is not a number printed with %f")
    sign, whole, fraction = match.groups()
    micro = int(whole) * 1_000_000 + int(fraction)
    return -micro if sign else micro


def _vocabulary_tensors(column: int, tokens: list[bytes], indices: np.ndarray) -> dict[str, np.ndarray]:
    """keys_micro (ascending) and values for one column; non-finite tokens are dropped (never scored)."""
    # IndexLookup numbers its V tokens 1..V (index 0 is the single OOV index, there is no mask).
    if not np.array_equal(np.sort(indices), np.arange(1, len(indices) + 1)):
        raise _CorruptError(f"column {column}'s vocabulary indices are not 1..{len(indices)}")
    kept = [i for i, token in enumerate(tokens) if token not in _NON_FINITE_TOKENS]
    keys = np.array([_micro(tokens[i]) for i in kept], dtype=np.int64)
    values = indices[kept]
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    if keys.size > 1 and not bool((keys[1:] > keys[:-1]).all()):
        raise _UnsupportedError(f"column {column}'s vocabulary has two tokens for the same number (0 and -0?)")
    return {
        f"categorical.{column}.keys_micro": keys,
        f"categorical.{column}.values": values.astype(np.int64),
    }


# -- keras_metadata.pb: the architecture -------------------------------------------------------------


def _keras_objects(keras_metadata: bytes) -> dict[str, dict]:
    """Object path ("root", "root.layer_with_weights-0.encoding_layers.92", ...) -> its Keras JSON."""
    objects = {}
    for raw_node in _message(keras_metadata).get(1, []):
        node = _message(raw_node)
        try:
            objects[_text(_first(node, 3, b""))] = json.loads(_first(node, 5, b"{}"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _CorruptError("keras_metadata.pb holds a layer description that is not JSON") from None
    return objects


def _layer_signature(layer: dict) -> str:
    """One letter per layer after the normalisation: D dense, R relu, O dropout, S sigmoid, X other."""
    kind, config = layer["class_name"], layer["config"]
    if kind == "Dense" and config["activation"] == "linear" and config["use_bias"]:
        return "D"
    plain_relu = config.get("max_value") is None and not config.get("negative_slope") and not config.get("threshold")
    if kind == "ReLU" and plain_relu:
        return "R"
    if kind == "Dropout":
        return "O"
    if kind == "Activation" and config["activation"] == "sigmoid":
        return "S"
    return "X"


def _architecture(objects: dict[str, dict]) -> tuple[int, list[int], int]:
    """(input dim, categorical columns, number of dense layers) after checking the layer graph."""
    try:
        layers = objects["root"]["config"]["layers"]
        kinds = [layer["class_name"] for layer in layers[:3]]
        if kinds != ["InputLayer", "Custom>MultiCategoryEncoding", "Normalization"]:
            raise _UnsupportedError(f"the model starts with {kinds}, not input, categorical encoding, normalisation")
        for previous, layer in zip(layers, layers[1:]):
            inbound = layer["inbound_nodes"]
            if len(inbound) != 1 or len(inbound[0]) != 1 or inbound[0][0][0] != previous["name"]:
                raise _UnsupportedError(f"layer {layer['name']} does not just take the previous layer's output")
        if list(layers[2]["config"]["axis"]["items"]) != [-1]:
            raise _UnsupportedError("the normalisation is not over the last axis")
        signature = "".join(_layer_signature(layer) for layer in layers[3:])
        if not re.fullmatch(r"(DRO*)*DS", signature):
            raise _UnsupportedError(
                f"the layers after the normalisation are {signature!r}, not (dense relu dropout*)* dense sigmoid"
            )
        encoding = layers[1]["config"]["encoding"]
        input_dim = layers[0]["config"]["batch_input_shape"]["items"][1]
        if input_dim != len(encoding) or set(encoding) - {"none", "int"}:
            raise _UnsupportedError("the categorical encoding is not one 'none' or 'int' per input column")
        columns = [column for column, kind in enumerate(encoding) if kind == "int"]
        for column in columns:
            lookup = objects[f"root.layer_with_weights-0.encoding_layers.{column}"]["config"]
            settings = (lookup["invert"], lookup["num_oov_indices"], lookup["mask_token"], lookup["output_mode"])
            if settings != (False, 1, None, "int"):
                raise _UnsupportedError(f"column {column}'s StringLookup is not int output, one OOV index, no mask")
        return input_dim, columns, signature.count("D")
    except (KeyError, IndexError, TypeError, AttributeError) as missing:
        raise _UnsupportedError(f"keras_metadata.pb lacks the expected layer description ({missing!r})") from None


# -- output ------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file with a fixed header order, so one zip always converts to the same bytes.

    (safetensors' own writer orders the metadata by hash, which differs from run to run.)
    """
    # Widest dtype first, then by name, as safetensors does: every tensor starts aligned to its itemsize.
    names = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header: dict[str, dict] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in names:
        array = tensors[name]
        dtype = _SAFETENSORS_DTYPES[array.dtype]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    little_endian = (np.ascontiguousarray(tensors[name], tensors[name].dtype.newbyteorder("<")) for name in names)
    payload = b"".join(array.tobytes() for array in little_endian)
    return struct.pack("<Q", len(text)) + text + payload


# -- the zip -----------------------------------------------------------------------------------------

_SAVED_MODEL_FILES = [
    "saved_model.pb",
    "keras_metadata.pb",
    "variables/variables.index",
    "variables/variables.data-00000-of-00001",
]


def _basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _saved_model_files(zip_path: Path) -> tuple[str, dict[str, bytes]]:
    """(model directory name, {relative name: bytes}) of the SavedModel inside the zip."""
    if not zip_path.is_file():
        raise UserError(f"LAION NSFW model zip not found at {zip_path}; download it from {LAION_URL} or fix the path.")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            graphs = [name for name in members if _basename(name) == "saved_model.pb"]
            prefixes = sorted(name.removesuffix("saved_model.pb") for name in graphs)
            wanted = _SAVED_MODEL_FILES
            prefix = next((p for p in prefixes if all(p + name in members for name in wanted)), None)
            if prefix is None:
                raise UserError(
                    f"{zip_path} holds no Keras SavedModel (saved_model.pb, keras_metadata.pb and variables/); "
                    f"pass LAION's clip_autokeras zip from {LAION_URL}."
                )
            if any(members[prefix + name].file_size > _MAX_MEMBER_BYTES for name in wanted):
                raise UserError(
                    f"{zip_path} holds a SavedModel far larger than LAION's NSFW detector; "
                    f"pass LAION's clip_autokeras zip from {LAION_URL}."
                )
            files = {name: archive.read(prefix + name) for name in wanted}
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        # A damaged compressed stream fails in zlib before the zip's CRC is checked.
        raise UserError(
            f"{zip_path} is not a readable zip archive ({error}); download LAION's zip again from {LAION_URL}."
        ) from None
    model_name = _basename(prefix.rstrip("/")) or zip_path.stem
    return model_name, files


def read_laion_zip(zip_path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The head's tensors and metadata (format: the NSFW head README) from LAION's Keras zip."""
    zip_path = Path(zip_path)
    model_name, files = _saved_model_files(zip_path)
    try:
        input_dim, columns, dense_count = _architecture(_keras_objects(files["keras_metadata.pb"]))
        entries = _bundle_entries(files["variables/variables.index"])
        data = files["variables/variables.data-00000-of-00001"]

        def variable(path: str) -> np.ndarray:
            return _bundle_tensor(entries, data, f"{path}/.ATTRIBUTES/VARIABLE_VALUE")

        tensors = {
            "norm.mean": variable("layer_with_weights-1/mean").astype(np.float32),
            "norm.variance": variable("layer_with_weights-1/variance").astype(np.float32),
            "norm.epsilon": np.array([NORM_EPSILON], dtype=np.float32),
        }
        if tensors["norm.mean"].shape != (input_dim,) or tensors["norm.variance"].shape != (input_dim,):
            raise _CorruptError(f"the normalisation statistics do not have shape [{input_dim}]")
        in_features = input_dim
        for i in range(dense_count):
            # Keras layers with weights are numbered: 0 categorical encoding, 1 normalisation, 2.. dense.
            kernel = variable(f"layer_with_weights-{i + 2}/kernel").astype(np.float32)
            bias = variable(f"layer_with_weights-{i + 2}/bias").astype(np.float32)
            if kernel.ndim != 2 or kernel.shape[0] != in_features or bias.shape != (kernel.shape[1],):
                shapes = f"kernel {kernel.shape} and bias {bias.shape}"
                raise _CorruptError(f"dense layer {i} has {shapes} for {in_features} inputs")
            tensors[f"dense.{i}.weight"] = np.ascontiguousarray(kernel.T)  # Keras [in, out] -> PyTorch [out, in]
            tensors[f"dense.{i}.bias"] = bias
            in_features = kernel.shape[1]
        if in_features != 1:
            raise _UnsupportedError(f"the last dense layer has {in_features} outputs, not 1")

        tensors["categorical.columns"] = np.array(columns, dtype=np.int64)
        for column, (tokens, indices) in _vocabularies(files["saved_model.pb"], columns).items():
            tensors.update(_vocabulary_tensors(column, tokens, indices))
            # num_oov_indices=1 and no mask token: unknown strings map to index 0.
            tensors[f"categorical.{column}.default"] = np.zeros(1, dtype=np.int64)
    except _CorruptError as error:
        raise UserError(f"{zip_path} is damaged: {error}; download it again from {LAION_URL}.") from None
    except _UnsupportedError as error:
        raise UserError(
            f"{zip_path} is not a model this converter supports: {error}; only LAION's clip_autokeras NSFW "
            f"detectors ({LAION_URL}) can be converted."
        ) from None
    metadata = {"source": f"{LAION_REPOSITORY} {model_name}", "license": LICENSE, "input_dim": str(input_dim)}
    return tensors, metadata


def convert_laion_zip(zip_path: str | Path, out_path: str | Path) -> Path:
    """Convert LAION's Keras NSFW zip to a safetensors head at `out_path` (written atomically); returns it."""
    out_path = Path(out_path)
    if out_path.is_dir():
        example = out_path / "head.safetensors"
        raise UserError(f"{out_path} is a directory; pass the safetensors file to write, e.g. {example}.")
    tensors, metadata = read_laion_zip(zip_path)
    try:
        write_bytes_atomic(str(out_path), _safetensors_bytes(tensors, metadata))
    except OSError as error:
        raise UserError(
            f"cannot write {out_path} ({error.strerror or error}); pass a path in a writable directory."
        ) from None
    return out_path
