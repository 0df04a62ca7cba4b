"""The run's signals and policy, resolved and checked once before any task starts.

`plan_signals` turns the `signals` and `policy` parameters (inline structures or paths/URLs of JSON or YAML files)
into a `SignalPlan`: each signal's weights located and fingerprinted (a URL resolved to its SHA-256 like the NSFW
head), its head loaded once to check it fits the CLIP model, the concepts' text features computed once by the
checkpoint's text tower and kept in the embedding store (tasks/signals/concepts.py), and the policy checked
against the signals it names and their ranges. Every mistake is one sentence (UserError), exit status 2.

The plan is small (names, locations, digests, the policy's few rules) and travels whole inside the filter stage.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import yaml
from pydantic import TypeAdapter, ValidationError

from tasks.errors import UserError
from tasks.io.locations import Location
from tasks.models.clip_resolve import ClipWeights, weights_fingerprint
from tasks.models.remote_weights import is_remote, resolve_weights
from tasks.signals.columns import NSFW, RESERVED_COLUMNS, ScoredSignal
from tasks.signals.concepts import ConceptGroups, read_concepts, read_text_features, text_features_fingerprint, write_text_features
from tasks.signals.heads import AestheticHead
from tasks.signals.loaded import cached_signal_head
from tasks.signals.text_tower import encode_concepts
from tasks.store.entries import EmbeddingStore
from tasks.signals.schema import Policy, SignalSpec, default_policy

MAX_PARAMETER_FILE = 1 << 20


@dataclass(frozen=True)
class PlannedSignal:
    """A configured signal: for aesthetic and prompts its safetensors weights; for concepts its groups and the text
    features the plan stored (their location in the embedding store and their fingerprint)."""

    name: str
    kind: str
    location: Location  # the weights as given (a path or URL); for concepts, the embedding store holding the text features
    sha256: str  # of the weights file; for concepts, the text features' fingerprint
    groups: ConceptGroups | None = None
    features_sha256: str | None = None  # concepts: SHA-256 of the text features' float32 values, as the plan read them
    source: str | None = None  # concepts: the concepts file as given

    @property
    def source_name(self) -> str:
        """What the summary names the signal's file by: the weights file, or the concepts file."""
        return (self.source or self.location.url).rstrip("/").rsplit("/", 1)[-1]

    def columns(self) -> tuple[ScoredSignal, ...]:
        if self.groups is None:
            return (ScoredSignal(self.name, self.kind, f"{self.name}_score"),)
        return tuple(
            ScoredSignal(f"{self.name}_{group.name}", "concepts", f"{self.name}_{group.name}_score", f"{self.name}_{group.name}_concept")
            for group in self.groups.groups
        )

    def identity(self) -> dict[str, Any]:
        record: dict[str, Any] = {"name": self.name, "kind": self.kind, "sha256": self.sha256}
        if self.groups is not None:
            record["concepts"] = self.groups.fingerprint  # the texts, groups and thresholds
            record["features_sha256"] = self.features_sha256
        return record


@dataclass(frozen=True)
class SignalPlan:
    """The run's extra signals and its policy; `nsfw` is always scored (the filter stage's head)."""

    signals: tuple[PlannedSignal, ...] = ()
    policy: Policy = field(default_factory=lambda: default_policy(0.5))

    def scored(self) -> tuple[ScoredSignal, ...]:
        """Every score column in the scores Parquet's order: nsfw first, then each signal's."""
        return (ScoredSignal(NSFW, "nsfw", "nsfw_score"),) + tuple(column for signal in self.signals for column in signal.columns())

    def fingerprint(self) -> str:
        """What enters the partition's settings identity: each signal's weights and the policy."""
        record = {"signals": [signal.identity() for signal in self.signals], "policy": self.policy.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def signal_location(url: str, storage_options: dict[str, Any], what: str) -> Location:
    """Where a signal's file or a parameter file is, reached with the run's storage options."""
    try:
        return Location(url, storage_options)
    except ValueError:
        raise UserError(f"the {what} URL carries credentials; put them in the run's storage options (a Prefect Secret block), not in the URL.") from None


def read_parameter_file(location: Location, what: str) -> Any:
    """A small JSON or YAML file given instead of an inline parameter (YAML's safe loader; JSON is YAML)."""
    fs, path = location.filesystem()
    try:
        with fs.open(path, "rb") as handle:
            data = handle.read(MAX_PARAMETER_FILE + 1)
    except FileNotFoundError:
        raise UserError(f"the {what} file {location} does not exist; pass an existing JSON or YAML file, or the {what} itself.") from None
    except (IsADirectoryError, PermissionError, OSError) as error:
        raise UserError(f"cannot read the {what} file {location} ({type(error).__name__}); pass a readable JSON or YAML file.") from None
    if len(data) > MAX_PARAMETER_FILE:
        raise UserError(f"the {what} file {location} is larger than {MAX_PARAMETER_FILE >> 20} MB; a {what} is a few lines of JSON or YAML.")
    try:
        return yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        raise UserError(f"the {what} file {location} is not valid JSON or YAML; fix its syntax.") from None


def inline_or_file(value: str, storage_options: dict[str, Any], what: str) -> Any:
    """A parameter given as text: inline JSON (`{...}`, `[...]`) parsed, anything else the path or URL of a JSON or YAML file."""
    if value.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise UserError(f"the {what} is not valid JSON ({error.msg} at character {error.pos}); fix it or pass a file's path.") from None
    return read_parameter_file(signal_location(value, storage_options, what), what)


def _validation_sentence(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def parse_signals(value: Any, storage_options: dict[str, Any]) -> tuple[SignalSpec, ...]:
    """The `signals` parameter (a list of specs, or a path/URL of a JSON or YAML file holding one) as validated specs."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = inline_or_file(value, storage_options, "signals")
    try:
        specs = TypeAdapter(list[SignalSpec]).validate_python(value)
    except ValidationError as error:
        raise UserError(f"invalid signals: {_validation_sentence(error)}.") from None
    names = [spec.name for spec in specs]
    for name in names:
        if name == NSFW or f"{name}_score" in RESERVED_COLUMNS or name in RESERVED_COLUMNS:
            raise UserError(f"invalid signals: the name {name!r} is taken by the scores' own columns; name the signal otherwise.")
        if names.count(name) > 1:
            raise UserError(f"invalid signals: two signals are named {name!r}; give each its own name.")
    return tuple(specs)


def parse_policy(value: Any, score_threshold: float, storage_options: dict[str, Any]) -> Policy:
    """The `policy` parameter (a Policy, a dict, or a path/URL of a JSON or YAML file); None is today's NSFW threshold."""
    if value is None:
        return default_policy(score_threshold)
    if isinstance(value, str):
        value = inline_or_file(value, storage_options, "policy")
    if isinstance(value, Policy):
        return value
    try:
        return Policy.model_validate(value)
    except ValidationError as error:
        raise UserError(f"invalid policy: {_validation_sentence(error)}.") from None


def check_policy(policy: Policy, scored: Sequence[ScoredSignal]) -> None:
    """Every signal a rule names exists, every threshold lies in its signal's range, `matched` only on concept groups."""
    by_name = {signal.name: signal for signal in scored}
    for rule in policy.rules:
        for test in (rule, *rule.when):
            signal = by_name.get(test.signal)
            if signal is None:
                raise UserError(
                    f"policy rule {rule.label!r} names the signal {test.signal!r}, which this run does not compute; "
                    f"the signals are {', '.join(sorted(by_name))} (add it to `signals`)."
                )
            if test.matched is not None and signal.concept_column is None:
                raise UserError(f"policy rule {rule.label!r} tests whether {test.signal!r} is matched, but only concept groups match; use at_least or below.")
            low, high = signal.score_range
            for threshold in (test.at_least, test.below):
                if threshold is not None and not (low <= threshold <= high and math.isfinite(threshold)):
                    raise UserError(f"policy rule {rule.label!r}: {test.signal} scores lie in [{low:g}, {high:g}], so {threshold:g} is out of range.")


def _weights_file(spec: SignalSpec, storage_options: dict[str, Any]) -> tuple[Location, str, str]:
    """(location as given, this machine's file, SHA-256) of an aesthetic or prompts signal's safetensors weights."""
    if is_remote(spec.weights):
        location = signal_location(spec.weights, storage_options, f"signal {spec.name!r} weights")
        resolved = resolve_weights(location)
        return location, str(resolved.path), resolved.sha256
    path = os.path.abspath(os.path.expanduser(spec.weights))
    if not os.path.isfile(path):
        raise UserError(
            f"signal {spec.name!r}: weights file {path} does not exist; convert the published file with "
            f"`nsfw-curator models convert SOURCE {os.path.basename(path) or 'OUT.safetensors'}` and pass its path."
        )
    return Location(path, storage_options), path, weights_fingerprint(path)


def _planned_head_signal(spec: SignalSpec, embedding_dim: int, storage_options: dict[str, Any]) -> PlannedSignal:
    location, path, sha256 = _weights_file(spec, storage_options)
    head = cached_signal_head(path, sha256)
    kind = "aesthetic" if isinstance(head, AestheticHead) else "prompts"
    if kind != spec.kind:
        raise UserError(f"signal {spec.name!r} is declared as {spec.kind}, but {location} holds {kind} weights; fix the signal's kind or its file.")
    head.check_dimension(embedding_dim)
    return PlannedSignal(spec.name, spec.kind, location, sha256)


def _planned_concepts(spec: SignalSpec, clip_weights: ClipWeights, store: EmbeddingStore, storage_options: dict[str, Any]) -> PlannedSignal:
    """The concepts file read and checked, and its text features found in the store or computed once and stored there."""
    concepts = signal_location(spec.weights, storage_options, f"signal {spec.name!r} concepts")
    groups = read_concepts(concepts)
    # The text tower is named by its checkpoint and its config (the same weights under another config encode otherwise).
    config_digest = hashlib.sha256(clip_weights.model_config.encode()).hexdigest()[:16]
    fingerprint = text_features_fingerprint(f"{clip_weights.model_name}:{clip_weights.weights_fingerprint}:{config_digest}", groups.texts)
    features = read_text_features(store.location, fingerprint, groups.texts, clip_weights.embedding_dim)
    if features is None:
        features = encode_concepts(clip_weights, groups.texts)
        write_text_features(store.location, features, groups.texts, fingerprint)
    # The features' digest travels with the plan: every worker uses exactly the features checked here.
    features_digest = hashlib.sha256(np.ascontiguousarray(features, dtype=np.float32).tobytes()).hexdigest()
    return PlannedSignal(spec.name, "concepts", store.location, fingerprint, groups, features_digest, concepts.url)


def plan_signals(
    signals: Any,
    policy: Any,
    score_threshold: float,
    embedding_dim: int,
    storage_options: dict[str, Any],
    clip_weights: ClipWeights | None = None,
    store: EmbeddingStore | None = None,
) -> SignalPlan:
    """The run's signals and policy from its parameters; UserError (one sentence) for anything wrong.

    Concepts signals need the CLIP weights (their text tower) and the store that keeps their text features.
    """
    specs = parse_signals(signals, storage_options)
    parsed_policy = parse_policy(policy, score_threshold, storage_options)
    planned = []
    for spec in specs:
        if spec.kind != "concepts":
            planned.append(_planned_head_signal(spec, embedding_dim, storage_options))
        elif clip_weights is not None and clip_weights.embedding_dim != embedding_dim:
            raise UserError(
                f"signal {spec.name!r}: CLIP {clip_weights.model_name} gives {clip_weights.embedding_dim}-d text features but the "
                f"embeddings are {embedding_dim}-d; use the CLIP model that made the embeddings (--clip-model)."
            )
        elif clip_weights is None or store is None:
            raise UserError(f"signal {spec.name!r} is a concepts signal: its text features need the CLIP checkpoint; pass --clip-model and --clip-pretrained.")
        else:
            planned.append(_planned_concepts(spec, clip_weights, store, storage_options))
    plan = SignalPlan(tuple(planned), parsed_policy)
    names = [signal.name for signal in plan.scored()]
    columns = [column for signal in plan.scored() for column in (signal.score_column, signal.concept_column) if column]
    clash = next((name for name in names if names.count(name) > 1), None) or next((c for c in columns if columns.count(c) > 1), None)
    if clash:
        raise UserError(f"invalid signals: two signals give the column or name {clash!r}; rename a signal or a concept group.")
    check_policy(parsed_policy, plan.scored())
    return plan
