"""Flow parameters outside Prefect: the CLI reads them from source, the settings model from the signature, run names."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from flows.parameters import REQUIRED, read_flow_signature, without_range
from flows.run_names import dataset_name, path_stem

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, function", [("flows.nsfw_filter", "nsfw_filter"), ("flows.dedup", "image_dedup")])
def test_signature_read_from_source_is_the_flows_own(module, function):
    import importlib

    from prefect.utilities.callables import parameter_docstrings, parameter_schema

    flow = getattr(importlib.import_module(module), function)
    read = read_flow_signature(module, function)
    hints = typing.get_type_hints(flow.fn)
    expected = [(name, hints[name], p.default) for name, p in inspect.signature(flow.fn).parameters.items()]
    assert [(p.name, p.annotation, p.default) for p in read.parameters] == expected
    assert {p.name: p.doc for p in read.parameters} == parameter_docstrings(inspect.getdoc(flow.fn))
    assert read.summary == inspect.getdoc(flow.fn).split("\n\n")[0]
    assert all(without_range(p.annotation) is p.annotation for p in read.parameters)
    assert REQUIRED in [p.default for p in read.parameters]  # file_paths and output_path
    # the ranges reach the schema Prefect gives the UI form and the API
    schema = parameter_schema(flow).model_dump()["properties"]
    threshold = "score_threshold" if "score_threshold" in schema else "similarity_threshold"
    assert schema[threshold]["maximum"] == 1
    assert schema["images_per_tar"]["minimum"] == 1


@pytest.mark.parametrize("argv", [["--help"], ["filter", "--help"], ["dedup", "--help"]])
def test_help_imports_neither_torch_nor_prefect(argv):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import sys; from flows.cli import main; sys.exit(main())", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "400"},  # one line per option's help
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "flows.cli" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "prefect", "open_clip")}
    assert "usage: nsfw-curator" in done.stdout
    if argv[0] == "filter":
        assert "--score-threshold" in done.stdout and "Images with nsfw_score >= score_threshold are filtered out." in done.stdout


def test_dataset_and_shard_names():
    assert dataset_name("s3://my-bucket/webdataset/") == "webdataset"
    assert dataset_name("/data/laion/part-{000000..000099}.tar") == "laion"
    assert dataset_name(["s3://user:secret@bucket/laion/part-000001.tar", "s3://bucket/laion/part-000002.tar"]) == "laion"
    assert dataset_name("s3://user:secret@bucket/") == "bucket"  # never the credentials
    assert path_stem("s3://bucket/laion/shard-000012.tar") == "shard-000012"


def test_importing_a_flow_turns_prefect_telemetry_off_unless_the_user_set_it():
    code = "import flows.nsfw_filter; from prefect.settings import get_current_settings; print(get_current_settings().server.analytics_enabled)"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    repo = str(Path(__file__).resolve().parents[1])
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert plain.stdout.strip().splitlines()[-1] == "False", plain.stderr[-2000:]
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "true"},
                            cwd=repo, timeout=300)
    assert chosen.stdout.strip().splitlines()[-1] == "True", chosen.stderr[-2000:]
