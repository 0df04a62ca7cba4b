"""`nsfw-curator score-embeddings`: .npy and Parquet in, Parquet with Keras-exact scores out."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from tasks.models.nsfw import NON_FINITE_REASON

REGIMES = ["unit_float32", "unit_fp16_rounded", "scaled_fp16_rounded"]
HEADS = {"vit_l_14": "ViT-L-14", "vit_b_32": "ViT-B-32"}


def reference(reference_dir, name):
    ref = np.load(reference_dir / f"laion_nsfw_{name}_keras.npz")
    return {regime: (ref[f"{regime}.inputs"], ref[f"{regime}.keras_scores"]) for regime in REGIMES}


@pytest.mark.parametrize("name", HEADS)
def test_npy_matches_keras_every_regime(tmp_path, laion_dir, reference_dir, name):
    for regime, (inputs, keras_scores) in reference(reference_dir, name).items():
        np.save(tmp_path / f"{regime}.npy", inputs)
        out = tmp_path / f"{regime}.parquet"
        code = main(["score-embeddings", "--input", str(tmp_path / f"{regime}.npy"), "--output", str(out),
                     "--nsfw-weights", str(laion_dir / f"{name}.safetensors"), "--model-inference-batch-size", "128"])
        assert code == 0
        frame = pd.read_parquet(out)
        assert frame["row"].tolist() == list(range(len(inputs)))
        assert frame["nsfw_score"].dtype == np.float32
        assert frame["error"].isna().all()
        np.testing.assert_allclose(frame["nsfw_score"].to_numpy(), keras_scores, atol=1e-5, rtol=0)


def test_parquet_carries_columns_and_marks_bad_rows(tmp_path, laion_dir, reference_dir):
    inputs, keras_scores = reference(reference_dir, "vit_l_14")["unit_fp16_rounded"]
    n = 300
    embeddings = [row.tolist() for row in inputs[:n]]
    embeddings[3] = None
    embeddings[4] = inputs[4][:100].tolist()
    embeddings[5] = [float("nan")] * 768
    table = pa.table({"key": [f"k{i:04d}" for i in range(n)], "caption": [f"c{i}" for i in range(n)],
                      "embedding": pa.array(embeddings, type=pa.list_(pa.float32()))})
    src = tmp_path / "emb.parquet"
    pq.write_table(table, src, row_group_size=64)
    out = tmp_path / "scores.parquet"
    # through the installed console entry point's module, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "score-embeddings", "--input", str(src), "--output", str(out),
                           "--model-dir", str(tmp_path / "models"), "--clip-model", "ViT-L-14"], capture_output=True, text=True)
    assert proc.returncode == 2 and "NSFW head weights not found" in proc.stderr and "Traceback" not in proc.stderr
    assert main(["score-embeddings", "--input", str(src), "--output", str(out), "--nsfw-weights", str(laion_dir / "vit_l_14.safetensors")]) == 0
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["key", "caption", "embedding", "nsfw_score", "error"]
    assert frame["key"].tolist() == table["key"].to_pylist()
    assert frame.loc[3, "error"] == "no embedding"
    assert frame.loc[4, "error"] == "embedding has 100 values, expected 768"
    assert frame.loc[5, "error"] == NON_FINITE_REASON
    assert frame.loc[[3, 4, 5], "nsfw_score"].isna().all()
    good = [i for i in range(n) if i not in (3, 4, 5)]
    np.testing.assert_allclose(frame.loc[good, "nsfw_score"].to_numpy(), keras_scores[good], atol=1e-5, rtol=0)
    assert frame.loc[good, "error"].isna().all()


def test_parquet_on_s3(s3_bucket, laion_dir, reference_dir):
    import s3fs

    inputs, keras_scores = reference(reference_dir, "vit_b_32")["scaled_fp16_rounded"]
    fs = s3fs.S3FileSystem()
    with fs.open(f"{s3_bucket}/in/emb.parquet", "wb") as fh:
        pq.write_table(pa.table({"embedding": pa.array([r.tolist() for r in inputs], type=pa.list_(pa.float32()))}), fh)
    assert main(["score-embeddings", "--input", f"s3://{s3_bucket}/in/emb.parquet", "--output", f"s3://{s3_bucket}/out/scores.parquet",
                 "--nsfw-weights", str(laion_dir / "vit_b_32.safetensors")]) == 0
    with fs.open(f"{s3_bucket}/out/scores.parquet", "rb") as fh:
        frame = pd.read_parquet(fh)
    np.testing.assert_allclose(frame["nsfw_score"].to_numpy(), keras_scores, atol=1e-5, rtol=0)


def test_bad_inputs(tmp_path, laion_dir, capsys):
    weights = str(laion_dir / "vit_l_14.safetensors")

    def run(path):
        code = main(["score-embeddings", "--input", str(path), "--output", str(tmp_path / "o.parquet"), "--nsfw-weights", weights])
        return code, capsys.readouterr().err

    code, err = run(tmp_path / "missing.npy")
    assert code == 2 and "missing.npy does not exist" in err
    np.save(tmp_path / "small.npy", np.zeros((4, 512), np.float32))
    code, err = run(tmp_path / "small.npy")
    assert code == 2 and "dimension 512 (as from ViT-B-32)" in err and "expects 768-d embeddings from CLIP ViT-L-14" in err
    np.save(tmp_path / "flat.npy", np.zeros(768, np.float32))
    code, err = run(tmp_path / "flat.npy")
    assert code == 2 and "shape (768,)" in err
    (tmp_path / "e.csv").write_text("a,b\n")
    code, err = run(tmp_path / "e.csv")
    assert code == 2 and "neither .npy nor .parquet" in err
    pq.write_table(pa.table({"vec": [[0.1] * 768]}), tmp_path / "nocol.parquet")
    code, err = run(tmp_path / "nocol.parquet")
    assert code == 2 and "has no `embedding` column (columns: vec)" in err
    pq.write_table(pa.table({"embedding": [[0.1] * 512] * 3}), tmp_path / "dim.parquet")
    code, err = run(tmp_path / "dim.parquet")
    assert code == 2 and "dimension 512" in err
    # each of these is one sentence and exit status 2, never a failed run (1)
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_text("hello")
    np.save(tmp_path / "scalar.npy", np.float32(1.0))
    np.save(tmp_path / "strings.npy", np.array([["a"] * 768]))
    pq.write_table(pa.table({"embedding": [["a"] * 768]}), tmp_path / "strings.parquet")
    (tmp_path / "bad.parquet").write_text("nope")
    (tmp_path / "a-directory.npy").mkdir()
    expected = {
        "empty.npy": "is not a readable .npy array of numbers",
        "text.npy": "is not a readable .npy array of numbers",
        "scalar.npy": "holds an array of shape ()",
        "strings.npy": "holds <U1 values; embeddings must be real numbers",
        "strings.parquet": "`embedding` column holds lists of string; it must hold lists of floats",
        "bad.parquet": "is not a readable Parquet file",
        "a-directory.npy": "is a directory",
    }
    for name, fragment in expected.items():
        code, err = run(tmp_path / name)
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, (name, err)
    assert not (tmp_path / "o.parquet").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # an output that is a directory is refused before any scoring
    (tmp_path / "out-dir").mkdir()
    np.save(tmp_path / "good.npy", np.zeros((2, 768), np.float32))
    code = main(["score-embeddings", "--input", str(tmp_path / "good.npy"), "--output", str(tmp_path / "out-dir"), "--nsfw-weights", weights])
    assert code == 2 and "is a directory; name the Parquet file to write" in capsys.readouterr().err
    assert list((tmp_path / "out-dir").iterdir()) == []


def test_scoring_an_earlier_output_replaces_its_score_columns(tmp_path, laion_dir, capsys):
    weights = str(laion_dir / "vit_l_14.safetensors")
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(5, 768)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(5)], "embedding": pa.array(embeddings.tolist(), type=pa.list_(pa.float32()))}),
                   tmp_path / "emb.parquet")
    assert main(["score-embeddings", "--input", str(tmp_path / "emb.parquet"), "--output", str(tmp_path / "once.parquet"), "--nsfw-weights", weights]) == 0
    capsys.readouterr()
    assert main(["score-embeddings", "--input", str(tmp_path / "once.parquet"), "--output", str(tmp_path / "twice.parquet"), "--nsfw-weights", weights]) == 0
    assert "already has nsfw_score and error; the output replaces them" in capsys.readouterr().err
    once, twice = pd.read_parquet(tmp_path / "once.parquet"), pd.read_parquet(tmp_path / "twice.parquet")
    assert list(twice.columns) == ["key", "embedding", "nsfw_score", "error"]
    np.testing.assert_array_equal(twice["nsfw_score"].to_numpy(), once["nsfw_score"].to_numpy())
