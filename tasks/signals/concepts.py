"""Zero-shot concept signals: a concepts file, its scores on stored CLIP image embeddings, cached text features.

A concepts file (YAML, or JSON by its `.json` suffix) maps groups to concept texts and their cosine
thresholds, in LAION's `safety_settings.yml` shape or the plain one:

    nsfw:                          # a group: its name becomes a column name, ^[a-z][a-z0-9_]*$
      concepts:
        sexual: 0.2                # concept text: cosine threshold, a finite number in [-1, 1]
        naked child: 0.22
      action: obfuscate            # other keys of a group are allowed and ignored
    special: {little girl: 0.21}   # plain form: the group maps concepts to thresholds directly

Concepts are non-empty texts (surrounding whitespace dropped), unique within their group; a file holds at
most `MAX_CONCEPTS` concepts in at most `MAX_FILE_BYTES` bytes. Anything else is one `UserError` sentence
naming the file and the group or concept. `read_concepts` returns a `ConceptGroups` value.

`score_concepts` takes the cosines of N image embeddings with the concept texts (`ConceptGroups.texts`
in order, float [N, C]) and gives, per group, the highest cosine over its concepts (float32 [N]) and the
matched concept: the one whose cosine reaches its threshold by the largest margin (the first in file
order on a tie), None when none reaches it. A row of NaN (an image that could not be embedded) scores NaN
and matches nothing.

Text features (float32 [C, D], L2-normalised) are cached beside the embedding store's entries:

    {store}/_text_features/{fingerprint}.safetensors   tensor `text_features`; metadata `format`,
                                                        `fingerprint`, `texts` (a JSON list)

`fingerprint` is `text_features_fingerprint(clip identity, texts)`. Writes are atomic; reads are
untrusted: the file is parsed as safetensors only (never unpickled) and used only when its metadata names
the fingerprint and the texts asked for and it holds exactly one float32 [len(texts), D] tensor, finite,
every row's L2 norm within `NORM_TOLERANCE` of 1. Anything else is a miss (None), and the caller encodes
the texts again and overwrites the file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import yaml

from tasks.errors import UserError
from tasks.io.atomic import write_bytes_atomic
from tasks.io.locations import Location
from tasks.store.entries import _store_key as store_key  # the same key that signs entries

MAX_CONCEPTS = 1_000
MAX_FILE_BYTES = 1 << 20
GROUP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Bumped when the meaning of a fingerprint changes, so cached features become misses.
FINGERPRINT_VERSION = 1
TEXT_FEATURES_DIR = "_text_features"  # a leading `_` never starts an embedding identity folder
TEXT_FEATURES_FORMAT = "nsfw-curator text features 1"
TEXT_FEATURES_TENSOR = "text_features"
# float32 normalisation is within 1e-6; a scaled, zeroed or half-precision row is outside.
NORM_TOLERANCE = 1e-3
# The header may hold up to MAX_CONCEPTS texts from a file of MAX_FILE_BYTES, JSON-escaped (up to 6 bytes a byte).
_MAX_HEADER_BYTES = 8 * MAX_FILE_BYTES
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ConceptGroup:
    """One group of concepts: its name (a column name), its concept texts and their cosine thresholds, in file order."""

    name: str
    concepts: tuple[str, ...]
    thresholds: tuple[float, ...]


@dataclass(frozen=True)
class ConceptGroups:
    """The groups of a concepts file, in file order."""

    groups: tuple[ConceptGroup, ...]

    @property
    def texts(self) -> tuple[str, ...]:
        """Every concept text, group after group: the columns of the cosines `score_concepts` takes."""
        return tuple(concept for group in self.groups for concept in group.concepts)

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the groups' canonical JSON: equal for files that say the same thing."""
        record = {
            "version": FINGERPRINT_VERSION,
            "groups": [{"name": g.name, "concepts": list(g.concepts), "thresholds": list(g.thresholds)} for g in self.groups],
        }
        return hashlib.sha256(_canonical_json(record).encode()).hexdigest()


def _canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# ---------------------------------------------------------------------------------------------------
# The concepts file


class _Mapping(dict):
    """A parsed mapping that remembers the first key given twice (both parsers would silently keep the last)."""

    duplicate: object = None
    has_duplicate: bool = False


def _with_duplicate(mapping: _Mapping, keys: list) -> _Mapping:
    seen: set = set()
    for key in keys:
        if key in seen:
            mapping.duplicate, mapping.has_duplicate = key, True
            break
        seen.add(key)
    return mapping


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tag builds an object), its mappings remembering a key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> _Mapping:
        mapping = _Mapping(super().construct_mapping(node, deep=deep))  # refuses unhashable keys; flattens merges into node
        return _with_duplicate(mapping, [self.construct_object(key_node, deep=deep) for key_node, _ in node.value])


_UniqueKeySafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeySafeLoader.construct_mapping)


def _json_object(pairs: list[tuple[str, object]]) -> _Mapping:
    return _with_duplicate(_Mapping(pairs), [key for key, _ in pairs])


def _read_text(location: Location) -> str:
    """The file's text, refusing a missing file, one over `MAX_FILE_BYTES` and bytes that are not UTF-8."""
    fs, path = location.filesystem()
    try:
        with fs.open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError(f"Concepts file {location} does not exist; pass the path or URL of a YAML or JSON concepts file.") from None
    except OSError as error:  # permissions, credentials, an unreachable endpoint
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"Concepts file {location} cannot be read ({reason}); check that it is readable with the run's credentials.") from None
    if len(data) > MAX_FILE_BYTES:
        raise UserError(f"Concepts file {location} is larger than {MAX_FILE_BYTES} bytes; keep it to at most {MAX_CONCEPTS} concepts.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"Concepts file {location} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from None


def _parse(location: Location, text: str) -> object:
    """The file's content: JSON for a `.json` file, else YAML through the safe loader (no tags that build objects)."""
    is_json = PurePosixPath(location.url.split("?", 1)[0]).suffix.lower() == ".json"
    try:
        if is_json:
            return json.loads(text, object_pairs_hook=_json_object)
        return yaml.load(text, Loader=_UniqueKeySafeLoader)  # noqa: S506 - a SafeLoader subclass
    except json.JSONDecodeError as error:
        raise UserError(f"Concepts file {location} is not valid JSON ({error.msg} at line {error.lineno}); fix it or write it as YAML.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        if isinstance(error, yaml.constructor.ConstructorError) and "constructor for the tag" in str(error.problem):
            raise UserError(f"Concepts file {location} uses a YAML tag{where} that would build an object, which is never read; remove the tag.") from None
        problem = " ".join(str(getattr(error, "problem", None) or type(error).__name__).split()).rstrip(".")
        raise UserError(f"Concepts file {location} is not valid YAML ({problem}{where}); fix it or write it as JSON.") from None
    except RecursionError:
        raise UserError(f"Concepts file {location} is nested too deeply; give groups of concepts and thresholds only.") from None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _threshold(location: Location, group: str, concept: str, value: object) -> float:
    if not _is_number(value) or not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise UserError(
            f"Concepts file {location} gives concept {concept!r} of group {group!r} the threshold {value!r}, "
            f"not a number from -1 to 1; give its cosine threshold, such as 0.2."
        )
    return float(value)


def _group(location: Location, name: object, body: object) -> ConceptGroup:
    if not isinstance(name, str) or not GROUP_NAME.fullmatch(name):
        raise UserError(
            f"Concepts file {location} names a group {name!r}, which is not a column name; "
            f"use lower-case letters, digits and '_', starting with a letter."
        )
    if not isinstance(body, dict):
        raise UserError(f"Concepts file {location} gives group {name!r} no mapping of concepts to thresholds; give `concepts: {{text: threshold}}`.")
    concepts = body
    if "concepts" in body and not _is_number(body["concepts"]):  # LAION's shape; a number is a concept named "concepts"
        concepts = body["concepts"]
        if not isinstance(concepts, dict):
            raise UserError(f"Concepts file {location} gives group {name!r} `concepts` that are not a mapping; map each concept text to its threshold.")
    if not concepts:
        raise UserError(f"Concepts file {location} gives group {name!r} no concepts; add at least one or remove the group.")
    # A key given twice among a group's ignored keys (`action`) is ignored with them.
    body_duplicate = getattr(body, "has_duplicate", False) and (concepts is body or body.duplicate == "concepts")
    duplicated = body if body_duplicate else concepts
    if getattr(duplicated, "has_duplicate", False):
        raise UserError(f"Concepts file {location} gives {duplicated.duplicate!r} twice in group {name!r}; keep one of them.")
    texts: list[str] = []
    thresholds: list[float] = []
    for concept, value in concepts.items():
        if not isinstance(concept, str):
            raise UserError(f"Concepts file {location} has the concept {concept!r} in group {name!r}, which is not text; quote it.")
        text = concept.strip()
        if not text:
            raise UserError(f"Concepts file {location} has an empty concept in group {name!r}; give each concept some text.")
        if text in texts:
            raise UserError(f"Concepts file {location} has the concept {text!r} twice in group {name!r}; keep one of them.")
        texts.append(text)
        thresholds.append(_threshold(location, name, text, value))
    return ConceptGroup(name=name, concepts=tuple(texts), thresholds=tuple(thresholds))


def read_concepts(location: Location) -> ConceptGroups:
    """The groups of the concepts file at `location` (local or any fsspec URL); UserError naming the problem."""
    content = _parse(location, _read_text(location))
    if not isinstance(content, dict) or not content:
        raise UserError(f"Concepts file {location} holds no groups; map each group name to its concepts and thresholds.")
    if getattr(content, "has_duplicate", False):
        raise UserError(f"Concepts file {location} names the group {content.duplicate!r} twice; merge the two into one group.")
    groups = tuple(_group(location, name, body) for name, body in content.items())
    count = sum(len(group.concepts) for group in groups)
    if count > MAX_CONCEPTS:
        raise UserError(f"Concepts file {location} holds {count} concepts, more than {MAX_CONCEPTS}; keep the ones you act on.")
    return ConceptGroups(groups=groups)


# ---------------------------------------------------------------------------------------------------
# Scores


def score_concepts(cosines: np.ndarray, groups: ConceptGroups) -> dict[str, tuple[np.ndarray, list[str | None]]]:
    """Per group: (the highest cosine over its concepts, float32 [N]; the matched concept or None, per row).

    `cosines` is [N, C] with one column per `groups.texts`, in order.
    """
    cosines = np.asarray(cosines)
    assert cosines.ndim == 2 and cosines.shape[1] == len(groups.texts), f"cosines {cosines.shape} do not match {len(groups.texts)} concepts"
    scores: dict[str, tuple[np.ndarray, list[str | None]]] = {}
    start = 0
    for group in groups.groups:
        block = cosines[:, start : start + len(group.concepts)]
        start += len(group.concepts)
        # Thresholds are compared in float64, as they were written, so 0.2 means 0.2 for a float32 cosine.
        margins = block.astype(np.float64) - np.asarray(group.thresholds, dtype=np.float64)
        reached = margins >= 0  # False for NaN
        best = np.where(reached, margins, -np.inf).argmax(axis=1)
        names = np.asarray(group.concepts, dtype=object)
        matched = np.where(reached.any(axis=1), names[best], None)
        scores[group.name] = (block.max(axis=1).astype(np.float32), matched.tolist())
    return scores


# ---------------------------------------------------------------------------------------------------
# Cached text features


def text_features_fingerprint(clip_embedding_identity: str, texts: Sequence[str]) -> str:
    """SHA-256 (hex) naming the text features of `texts` under the CLIP model of `clip_embedding_identity`."""
    record = {"version": FINGERPRINT_VERSION, "clip": clip_embedding_identity, "texts": list(texts)}
    return hashlib.sha256(_canonical_json(record).encode()).hexdigest()


def text_features_location(store: Location, fingerprint: str) -> Location:
    """Where the text features named `fingerprint` live under the store at `store`."""
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"{fingerprint!r} is not a text features fingerprint")
    return store.join(TEXT_FEATURES_DIR, f"{fingerprint}.safetensors")


def write_text_features(location: Location, features: np.ndarray, texts: Sequence[str], fingerprint: str) -> None:
    """Write the features of `texts` (float32 [len(texts), D], L2-normalised) under the store at `location`, atomically."""
    from safetensors.numpy import save

    assert features.dtype == np.float32 and features.ndim == 2 and features.shape[0] == len(texts), f"features {features.shape} for {len(texts)} texts"
    assert _rows_are_unit(features), "text features must be finite and L2-normalised"
    metadata = {"format": TEXT_FEATURES_FORMAT, "fingerprint": fingerprint, "texts": _canonical_json(list(texts))}
    if (key := store_key()) is not None:
        metadata["signature"] = _features_signature(key, fingerprint, metadata["texts"], np.ascontiguousarray(features))
    data = save({TEXT_FEATURES_TENSOR: np.ascontiguousarray(features)}, metadata=metadata)
    write_bytes_atomic(text_features_location(location, fingerprint), data)


def read_text_features(location: Location, fingerprint: str, texts: Sequence[str], embedding_dim: int) -> np.ndarray | None:
    """The cached features of `texts` (float32 [len(texts), embedding_dim]) under the store at `location`, or None
    when there are none or they are not usable."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    file = text_features_location(location, fingerprint)
    fs, path = file.filesystem()
    limit = 8 + _MAX_HEADER_BYTES + len(texts) * embedding_dim * 4
    try:
        with fs.open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if len(data) > limit:
        return None
    header = _safetensors_header(data)
    if header is None or set(header) != {"__metadata__", TEXT_FEATURES_TENSOR}:
        return None
    metadata, tensor = header["__metadata__"], header[TEXT_FEATURES_TENSOR]
    if not isinstance(metadata, dict) or metadata.get("format") != TEXT_FEATURES_FORMAT or metadata.get("fingerprint") != fingerprint:
        return None
    if not isinstance(tensor, dict) or tensor.get("dtype") != "F32" or tensor.get("shape") != [len(texts), embedding_dim]:
        return None
    try:
        if not isinstance(metadata.get("texts"), str) or json.loads(metadata["texts"]) != list(texts):
            return None
        features = load(data)[TEXT_FEATURES_TENSOR]
    except (SafetensorError, ValueError, TypeError, KeyError, RecursionError):
        return None
    if features.dtype != np.float32 or features.shape != (len(texts), embedding_dim) or not _rows_are_unit(features):
        return None
    features = np.array(features, dtype=np.float32, order="C")
    if (key := store_key()) is not None:  # with a store key, only features signed under it are used (as entries)
        expected = _features_signature(key, fingerprint, metadata["texts"], features)
        if not isinstance(metadata.get("signature"), str) or not hmac.compare_digest(metadata["signature"], expected):
            return None
    return features


def _features_signature(key: bytes, fingerprint: str, texts_json: str, features: np.ndarray) -> str:
    """HMAC-SHA256 under the store key of what the file claims: its fingerprint, texts and values."""
    digest = hmac.new(key, f"nsfw-curator text features\n{fingerprint}\n{texts_json}\n".encode(), hashlib.sha256)
    digest.update(features.tobytes())
    return digest.hexdigest()


def _safetensors_header(data: bytes) -> dict | None:
    """The JSON header of a safetensors file (an 8-byte little-endian length, then the JSON), or None."""
    if len(data) < 8:
        return None
    (header_length,) = struct.unpack("<Q", data[:8])
    if not 2 <= header_length <= min(len(data) - 8, _MAX_HEADER_BYTES):
        return None
    try:
        header = json.loads(data[8 : 8 + header_length])
    except (ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _rows_are_unit(features: np.ndarray) -> bool:
    if not np.isfinite(features).all():
        return False
    norms = np.linalg.norm(features.astype(np.float64), axis=1)
    return bool(np.all(np.abs(norms - 1.0) <= NORM_TOLERANCE))
