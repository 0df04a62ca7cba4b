"""Every signal from one stored embedding: a filter run with aesthetic, two prompt detectors and zero-shot concepts
under one policy, re-scored with a new policy without CLIP or any image decode, and bad policies refused up front."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.errors import UserError
from tasks.signals.schema import Policy
from tasks.signals.scoring import filtered_by
from tests.support.filter_parameters import local_filter_parameters
from tests.support.signal_weights import converted_signals, signal_specs
from tests.support.spies import Counted
from tests.support.tars import shard_of_good_samples, write_tar

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_scores(output: Path) -> pd.DataFrame:
    return pd.concat([pq.read_table(path).to_pandas() for path in sorted((output / "scores").glob("*.parquet"))], ignore_index=True)


def shard_keys(output: Path) -> list[str]:
    import tarfile

    keys = []
    for path in sorted((output / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            keys += sorted({member.name.rsplit(".", 1)[0] for member in tar.getmembers()})
    return keys


def labels(scores: pd.DataFrame) -> list[str | None]:
    """The `filtered_by` column as strings and None."""
    return [value if isinstance(value, str) else None for value in scores["filtered_by"]]


def store_snapshot(cache: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(cache)): (path.stat().st_mtime_ns, path.stat().st_size) for path in cache.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def signal_files(tmp_path_factory) -> dict[str, Path]:
    return converted_signals(tmp_path_factory.mktemp("signals"))


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    for s in range(2):
        write_tar(tmp_path / "in" / f"part-{s:06d}.tar", shard_of_good_samples([f"{s}/{i:03d}" for i in range(6)], size=(40, 32)))
    return tmp_path




def expected_verdicts(scores: pd.DataFrame, policy: dict) -> list[str | None]:
    """The policy evaluated row by row from the written columns (an independent reading of the rules)."""

    def holds(test: dict, row) -> bool:
        if test.get("matched") is not None:
            return isinstance(row[f"{test['signal']}_concept"], str) == test["matched"]
        value = row["nsfw_score" if test["signal"] == "nsfw" else f"{test['signal']}_score"]
        return value >= test["at_least"] if test.get("at_least") is not None else value < test["below"]

    verdicts = []
    for _, row in scores.iterrows():
        label = None
        if not isinstance(row["error"], str):
            for rule in policy["rules"]:
                if holds(rule, row) and all(holds(test, row) for test in rule.get("when", [])):
                    label = rule.get("name") or Policy.model_validate({"rules": [rule]}).rules[0].label
                    break
        verdicts.append(label)
    return verdicts


@pytest.mark.usefixtures("prefect_api")
def test_every_signal_under_one_policy_then_a_new_policy_rescores_without_clip_or_decoding(
    dataset, signal_files, tiny_clip_768, laion_dir, monkeypatch
):
    import tasks.models.embed as embed
    import tasks.signals.plan as signal_plan
    from flows.nsfw_filter import nsfw_filter

    signals = signal_specs(signal_files)
    first_policy = {"rules": [{"signal": "nsfw", "at_least": 0.5}]}
    parameters = local_filter_parameters(dataset, tiny_clip_768, laion_dir, signals=signals, policy=first_policy, images_per_tar=4)
    nsfw_filter(**parameters)
    scores = read_scores(dataset / "out")
    assert len(scores) == 12 and scores["error"].isna().all()
    schema = pq.read_schema(next((dataset / "out" / "scores").glob("*.parquet")))
    for column in ("nsfw_score", "aesthetic_score", "q16_score", "violence_score", "concepts_nsfw_score", "concepts_special_score"):
        assert schema.field(column).type == pa.float32(), column
    assert schema.field("concepts_special_concept").type == pa.string() and schema.field("filtered_by").type == pa.string()
    assert scores["q16_score"].between(0, 1).all() and scores["violence_score"].between(0, 1).all()
    assert expected_verdicts(scores, first_policy) == labels(scores)

    # A new policy: thresholds in both directions and the minors co-signal, set from the first run's scores so each rule bites.
    aesthetic_cut = float(np.sort(scores["aesthetic_score"])[3])
    special_cut = float(np.sort(scores["concepts_special_score"])[-4])
    second_policy = {
        "rules": [
            {"signal": "aesthetic", "below": aesthetic_cut},
            {"name": "minors co-signal", "signal": "nsfw", "at_least": 0.0, "when": [{"signal": "concepts_special", "at_least": special_cut}]},
            {"signal": "violence", "at_least": 0.999999},
        ]
    }
    before = store_snapshot(dataset / "cache")
    models_built = Counted(monkeypatch, embed, "load_clip_embedder")
    shards_embedded = Counted(monkeypatch, embed, "embed_shard")
    texts_encoded = Counted(monkeypatch, signal_plan, "encode_concepts")
    images_opened = Counted(monkeypatch, Image, "open")
    summary = nsfw_filter(**{**parameters, "policy": second_policy})
    assert (models_built.calls, shards_embedded.calls, texts_encoded.calls, images_opened.calls) == (0, 0, 0, 0)
    assert store_snapshot(dataset / "cache") == before  # no store write: the text features too were read back

    rescored = read_scores(dataset / "out")
    verdicts = labels(rescored)
    assert verdicts == expected_verdicts(rescored, second_policy)
    assert {f"aesthetic < {aesthetic_cut!r}", "minors co-signal"} <= set(verdicts)
    for column in ("nsfw_score", "aesthetic_score", "concepts_special_score"):  # the same scores, another verdict
        np.testing.assert_array_equal(rescored[column].to_numpy(), scores[column].to_numpy())
    assert rescored["passed"].tolist() == [v is None for v in verdicts]
    assert shard_keys(dataset / "out") == rescored.loc[rescored["passed"], "key"].tolist()
    assert summary["filtered"] == sum(v is not None for v in verdicts)
    written = json.loads((dataset / "out" / "summary.json").read_text())
    assert written["filtered_by"] == {label: verdicts.count(label) for label in set(verdicts) - {None}}
    assert set(written["signals"]) == {"nsfw", "aesthetic", "q16", "violence", "concepts_nsfw", "concepts_special"}
    assert all(sum(record["histogram"]) == 12 for record in written["signals"].values())


@pytest.mark.usefixtures("prefect_api")
def test_the_default_policy_is_todays_threshold(dataset, tiny_clip_768, laion_dir):
    from flows.nsfw_filter import nsfw_filter

    nsfw_filter(**local_filter_parameters(dataset, tiny_clip_768, laion_dir, score_threshold=0.4))
    scores = read_scores(dataset / "out")
    dropped = scores["nsfw_score"].astype(np.float64) >= 0.4
    assert labels(scores) == ["nsfw >= 0.4" if d else None for d in dropped]
    assert scores["filtered_by"].isna().tolist() == (~dropped).tolist() and scores["passed"].tolist() == (~dropped).tolist()


def test_rule_forms_are_evaluated_in_order():
    policy = Policy.model_validate(
        {
            "rules": [
                {"signal": "aesthetic", "below": 4.5},
                {"name": "minors", "signal": "nsfw", "at_least": 0.1, "when": [{"signal": "c_special", "matched": True}]},
                {"signal": "nsfw", "at_least": 0.5},
                {"signal": "c_nsfw", "matched": True, "when": [{"signal": "q16", "at_least": 0.9}]},
            ]
        }
    )
    scores = {
        "nsfw": np.array([0.05, 0.2, 0.2, 0.7, 0.05, np.nan], dtype=np.float32),
        "aesthetic": np.array([6.0, 6.0, 6.0, 6.0, 4.0, 6.0], dtype=np.float32),
        "q16": np.array([0.95, 0.1, 0.1, 0.1, 0.1, 0.1], dtype=np.float32),
    }
    concepts = {"c_special": [None, "toddler", None, None, None, "toddler"], "c_nsfw": ["nude", None, None, None, None, None]}
    assert filtered_by(policy, scores, concepts, 6) == ["c_nsfw matched and q16 >= 0.9", "minors", None, "nsfw >= 0.5", "aesthetic < 4.5", None]


@pytest.mark.parametrize(
    ("signals", "policy", "sentence"),
    [
        (None, {"rules": [{"signal": "aesthetic", "below": 4.5}]}, "names the signal 'aesthetic', which this run does not compute"),
        ("aesthetic", {"rules": [{"signal": "aesthetic", "below": 11}]}, r"aesthetic scores lie in \[0, 10\], so 11 is out of range"),
        ("aesthetic", {"rules": [{"signal": "aesthetic", "matched": True}]}, "only concept groups match"),
        ("aesthetic", {"rules": [{"signal": "nsfw", "at_least": 0.5, "below": 0.9}]}, "exactly one of at_least, below or matched"),
        ("missing", None, "weights file .* does not exist; convert the published file"),
        ("concepts", {"rules": [{"signal": "concepts_minors", "matched": True}]}, "names the signal 'concepts_minors'"),
        ("aesthetic-as-prompts", None, "is declared as prompts, but .* holds aesthetic weights"),
    ],
)
def test_bad_signals_and_policies_are_one_sentence_before_any_task(tmp_path, signal_files, tiny_clip_768, laion_dir, signals, policy, sentence):
    from flows.nsfw_filter import preflight

    write_tar(tmp_path / "in" / "part-000000.tar", shard_of_good_samples(["a"], size=(16, 16)))
    specs = {
        None: None,
        "aesthetic": [{"name": "aesthetic", "kind": "aesthetic", "weights": str(signal_files["aesthetic"])}],
        "missing": [{"name": "aesthetic", "kind": "aesthetic", "weights": str(tmp_path / "nowhere.safetensors")}],
        "concepts": [{"name": "concepts", "kind": "concepts", "weights": str(signal_files["concepts"])}],
        "aesthetic-as-prompts": [{"name": "q", "kind": "prompts", "weights": str(signal_files["aesthetic"])}],
    }[signals]
    with pytest.raises(UserError, match=sentence) as raised:
        preflight(local_filter_parameters(tmp_path, tiny_clip_768, laion_dir, signals=specs, policy=policy))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()  # refused before the output is claimed


def test_a_bad_policy_file_exits_2_from_the_command_line(tmp_path, tiny_clip_768, laion_dir):
    write_tar(tmp_path / "in" / "part-000000.tar", shard_of_good_samples(["a"], size=(16, 16)))
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - signal: nsfw\n    at_least: 1.5\n")
    parameters = local_filter_parameters(tmp_path, tiny_clip_768, laion_dir)
    options = [f"--{name.replace('_', '-')}={value}" for name, value in parameters.items()]
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "filter", *options, f"--policy={policy}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert "nsfw scores lie in [0, 1], so 1.5 is out of range" in result.stderr and "Traceback" not in result.stderr
