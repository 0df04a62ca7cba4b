"""Missing weights on the command line: the planner's own sentence, exit status 2, before torch or Prefect is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.tars import shard_of_good_samples, write_tar

from tasks.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
# The command line in a process that says, last, which of the slow imports it made.
CLI_REPORTING_IMPORTS = (
    "import sys\n"
    "from flows.cli import main\n"
    "try:\n"
    "    status = main()\n"
    "finally:\n"
    "    print('imported:', sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'prefect', 'open_clip'}))\n"
    "sys.exit(status)\n"
)


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI_REPORTING_IMPORTS, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def planner_sentence(parameters: dict[str, str]) -> str:
    """What the flow's planning says about the same run (torch and Prefect imported in this process)."""
    from flows.nsfw_filter import preflight

    with pytest.raises(UserError) as raised:
        preflight(parameters)
    return str(raised.value)


@pytest.fixture
def run_folders(tmp_path):
    write_tar(tmp_path / "shards" / "00000.tar", shard_of_good_samples(["a", "b"]))
    (tmp_path / "models").mkdir()
    return tmp_path


def _with_clip_checkpoint(models: Path) -> None:
    checkpoint = models / "clip" / "ViT-L-14" / "openai.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"stand-in bytes; neither check loads them")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty model_dir", "CLIP weights ViT-L-14 (openai) were not found"),
        ("no head in model_dir", "NSFW head weights not found at"),
        ("missing checkpoint path", "CLIP checkpoint"),
        ("missing nsfw_weights", "NSFW head weights not found at"),
        ("missing model config", "does not exist"),
    ],
)
def test_missing_weights_end_at_once_with_the_planners_sentence(run_folders, case, expected):
    models = run_folders / "models"
    parameters = {"file_paths": str(run_folders / "shards"), "output_path": str(run_folders / "out"), "model_dir": str(models)}
    if case != "empty model_dir":
        _with_clip_checkpoint(models)
    if case == "missing checkpoint path":
        parameters["clip_pretrained"] = str(run_folders / "elsewhere" / "vit-l-14.safetensors")
    if case == "missing nsfw_weights":
        parameters["nsfw_weights"] = str(run_folders / "elsewhere" / "head.safetensors")
    if case == "missing model config":
        parameters["clip_model"] = str(run_folders / "configs" / "my-clip.json")

    done = run_cli("filter", *[item for name, value in parameters.items() for item in ("--" + name.replace("_", "-"), value)])

    sentence = planner_sentence(parameters)
    assert expected in sentence
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr == f"nsfw-curator: error: {sentence}\n"
    assert done.stdout.splitlines()[-1] == "imported: []"
    assert not (run_folders / "out").exists()


def test_score_embeddings_without_the_head_ends_at_once(tmp_path):
    done = run_cli("score-embeddings", "--input", str(tmp_path / "embeddings.npy"), "--output", str(tmp_path / "scores.parquet"),
                   "--model-dir", str(tmp_path / "models"))
    from tasks.models.nsfw import load_nsfw_head

    with pytest.raises(UserError) as raised:
        load_nsfw_head(tmp_path / "models" / "nsfw" / "ViT-L-14.safetensors")  # what loading the head says
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr == f"nsfw-curator: error: {raised.value}\n"
    assert done.stdout.splitlines()[-1] == "imported: []"


def test_an_unknown_model_name_is_left_to_the_planner(run_folders):
    """The early check cannot tell an unknown name without open_clip: the planner's own sentence comes, after the imports."""
    done = run_cli("filter", "--file-paths", str(run_folders / "shards"), "--output-path", str(run_folders / "out"),
                   "--model-dir", str(run_folders / "models"), "--clip-model", "ViT-Nope-99")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "is not an open_clip model name" in done.stderr
    assert "open_clip" in done.stdout.splitlines()[-1]
