"""The `signals` and `policy` flow parameters as pydantic models: their form in the Prefect UI, their JSON format.

Imports pydantic and the standard library only (the command line reads the flow's signature without torch).

    signals = [
        {"name": "aesthetic", "kind": "aesthetic", "weights": "models/signals/sac+logos+ava1-l14-linearMSE.safetensors"},
        {"name": "q16", "kind": "prompts", "weights": "models/signals/q16-vit-l-14.safetensors"},
        {"name": "concepts", "kind": "concepts", "weights": "safety_settings.yml"},
    ]
    policy = {"rules": [
        {"signal": "nsfw", "at_least": 0.5},
        {"signal": "aesthetic", "below": 4.5},
        {"name": "nsfw-with-minors", "signal": "nsfw", "at_least": 0.1, "when": [{"signal": "concepts_special", "matched": true}]},
    ]}

A rule drops a sample when its own test and every test in `when` hold; the first rule (in order) that drops a
sample names it in the scores' `filtered_by`. A test is exactly one of `at_least` (score >= x), `below`
(score < x) or `matched` (a concept group: whether one of its concepts is matched). A concepts signal named C with
groups g1, g2 gives the signals `C_g1`, `C_g2`. Which signal names exist and the range of each threshold are
checked by the plan (tasks/signals/plan.py), before any task starts.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

SIGNAL_NAME = r"^[a-z][a-z0-9_]{0,62}$"
SignalKind = Literal["aesthetic", "prompts", "concepts"]


class SignalSpec(BaseModel):
    """One signal to compute besides `nsfw`: its name (its scores column is `{name}_score`), kind and weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=SIGNAL_NAME, description="column prefix: lower-case letters, digits and _")
    kind: SignalKind = Field(description="aesthetic (LAION aesthetic predictor), prompts (a K x D prompt detector such as Q16), concepts (zero-shot concepts file)")
    weights: str = Field(min_length=1, description="safetensors file from `nsfw-curator models convert` (aesthetic, prompts) or a YAML/JSON concepts file (concepts): a path or URL")


class Condition(BaseModel):
    """One test on one signal's score: exactly one of at_least, below, matched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    signal: str = Field(min_length=1, description="a signal name: nsfw, a configured signal, or {concepts}_{group}")
    at_least: Optional[float] = Field(default=None, description="holds when the score is >= this")
    below: Optional[float] = Field(default=None, description="holds when the score is < this")
    matched: Optional[bool] = Field(default=None, description="concept groups only: holds when a concept of the group is (true) or is not (false) matched")

    @model_validator(mode="after")
    def _one_test(self) -> "Condition":
        given = [name for name in ("at_least", "below", "matched") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a test on {self.signal!r} takes exactly one of at_least, below or matched (got {', '.join(given) or 'none'})")
        for name in ("at_least", "below"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} of {self.signal!r} must be a finite number")
        return self

    def describe(self) -> str:
        if self.at_least is not None:
            return f"{self.signal} >= {self.at_least!r}"
        if self.below is not None:
            return f"{self.signal} < {self.below!r}"
        return f"{self.signal} {'matched' if self.matched else 'not matched'}"


class Rule(Condition):
    """A test that drops a sample, optionally only when every test in `when` holds as well."""

    name: Optional[str] = Field(default=None, min_length=1, max_length=100, description="what `filtered_by` records (default: the rule written out)")
    when: tuple[Condition, ...] = Field(default=(), description="further tests that must all hold for this rule to drop a sample")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return " and ".join([self.describe(), *(test.describe() for test in self.when)])


class Policy(BaseModel):
    """Which signals drop a sample: rules, tried in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[Rule, ...] = Field(min_length=1, max_length=100, description="a sample is dropped by the first rule that holds")

    @model_validator(mode="after")
    def _distinct_labels(self) -> "Policy":
        labels = [rule.label for rule in self.rules]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"two rules are both named {repeated[0]!r}; give each rule its own name")
        return self


def default_policy(score_threshold: float) -> Policy:
    """Today's behaviour: drop `nsfw_score >= score_threshold`."""
    return Policy(rules=(Rule(signal="nsfw", at_least=float(score_threshold)),))
