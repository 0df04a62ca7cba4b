"""Signal weights in their published formats -> our safetensors -> heads that score as the published code does.

The published files are built here with random values in the exact published layouts: improved-aesthetic-predictor's
MLP state dict and LAION's linear v1 (torch.save), Q16's prompts pickle (a float16 numpy array, protocol 3) and
clip-retrieval's violence prompts (np.save). References are the published scoring code, re-implemented plainly.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors

from flows.cli import main
from tasks.errors import UserError
from tasks.signals.convert import SIGNAL_FORMAT, convert_signal_weights, safetensors_bytes
from tasks.signals.heads import AestheticHead, PromptDetector, load_signal_head

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDING_DIM = 768
ROWS = 64


class PublishedMLP(torch.nn.Module):
    """improved-aesthetic-predictor's MLP (simple_inference.py) without its training methods: no activations."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def published_normalized(a: np.ndarray) -> np.ndarray:
    """The aesthetic predictors' `normalized` helper (numpy L2 along the last axis, zero norms left as they are)."""
    l2 = np.atleast_1d(np.linalg.norm(a, 2, -1))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, -1)


def q16_pickle(prompts: np.ndarray, module: str = "numpy.core.multiarray") -> bytes:
    """Q16's save_prompts: a plain pickle (protocol 3) of the float16 array, naming numpy's reconstructor as `module`."""
    data = pickle.dumps(prompts.astype(np.float16), protocol=3)
    current = np.zeros(0).__reduce__()[0].__module__.encode()
    return data.replace(b"c" + current + b"\n_reconstruct\n", b"c" + module.encode() + b"\n_reconstruct\n")


def one_sentence(message: str, *names: str) -> str:
    """`message`, once it is one line, one sentence ending with a full stop, naming each of `names`."""
    assert "\n" not in message and "Traceback" not in message, message
    assert message.endswith(".") and ". " not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """Each published format, random values: name -> file."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    mlp = PublishedMLP(EMBEDDING_DIM)
    with torch.no_grad():
        mlp.layers[7].bias.fill_(5.0)  # scores around 5, as the published predictor's
    files = {"improved": root / "sac+logos+ava1-l14-linearMSE.pth", "v1": root / "sa_0_4_vit_l_14_linear.pth",
             "v1_b32": root / "sa_0_4_vit_b_32_linear.pth", "q16": root / "prompts.p", "q16_numpy2": root / "prompts-numpy2.p",
             "violence": root / "violence_detection_vit_l_14.npy", "tensor": root / "prompts.pt"}
    torch.save(mlp.state_dict(), files["improved"])
    for name, dim in (("v1", EMBEDDING_DIM), ("v1_b32", 512)):
        linear = torch.nn.Linear(dim, 1)
        with torch.no_grad():
            linear.bias.fill_(5.0)
        torch.save(linear.state_dict(), files[name])
    prompts = rng.standard_normal((2, EMBEDDING_DIM)).astype(np.float16)
    files["q16"].write_bytes(q16_pickle(prompts))
    files["q16_numpy2"].write_bytes(q16_pickle(prompts, "numpy._core.multiarray"))
    unit = prompts / np.linalg.norm(prompts.astype(np.float32), axis=1, keepdims=True)
    violence = (unit * (1 + 2e-4 * rng.random((2, 1)))).astype(np.float32)  # clip-retrieval's rows have norms near 1, not 1
    np.save(files["violence"], violence)
    tensor = rng.standard_normal((3, EMBEDDING_DIM)).astype(np.float32)
    torch.save(torch.from_numpy(tensor), files["tensor"])
    for name, values in (("q16", prompts), ("q16_numpy2", prompts), ("violence", violence), ("tensor", tensor)):
        np.save(files[name].with_name(files[name].name + ".values.npy"), values)
    return files


@pytest.fixture(scope="module")
def converted(published, tmp_path_factory) -> dict[str, Path]:
    """Every published file converted: the improved predictor through the command line, the rest by the function."""
    root = tmp_path_factory.mktemp("converted")
    out = {name: root / f"{name}.safetensors" for name in published}
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "models", "convert", str(published["improved"]), str(out["improved"])],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"aesthetic -> {out['improved']}"
    for name, source in published.items():
        if name != "improved":
            expected_kind = "aesthetic" if name.startswith("v1") else "prompts"
            assert convert_signal_weights(source, out[name]) == expected_kind
    return out


@pytest.fixture(scope="module")
def embeddings() -> np.ndarray:
    """Stored-style embeddings: float32, L2-normalised rows."""
    values = np.random.default_rng(1).standard_normal((ROWS, EMBEDDING_DIM)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), "np") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


# -- the format ---------------------------------------------------------------------------------------


def test_aesthetic_file_holds_the_published_layers_in_order_with_provenance(published, converted):
    tensors, metadata = read_safetensors(converted["improved"])
    state = torch.load(published["improved"], weights_only=True)
    published_layers = ["layers.0", "layers.2", "layers.4", "layers.6", "layers.7"]
    assert sorted(tensors) == sorted(f"linear.{i}.{part}" for i in range(5) for part in ("weight", "bias"))
    for index, layer in enumerate(published_layers):
        for part in ("weight", "bias"):
            assert tensors[f"linear.{index}.{part}"].dtype == np.float32
            np.testing.assert_array_equal(tensors[f"linear.{index}.{part}"], state[f"{layer}.{part}"].numpy())
    assert metadata == {"kind": "aesthetic", "format": SIGNAL_FORMAT, "source": "sac+logos+ava1-l14-linearMSE.pth",
                        "source_sha256": hashlib.sha256(published["improved"].read_bytes()).hexdigest()}


def test_prompts_file_holds_the_published_vectors_and_scoring_settings(published, converted):
    tensors, metadata = read_safetensors(converted["q16"])
    with published["q16"].open("rb") as handle:
        assert handle.read(40).startswith(b"\x80\x03cnumpy.core.multiarray\n_reconstruct\n")  # as Q16's own file begins
    assert list(tensors) == ["class_vectors"] and tensors["class_vectors"].dtype == np.float32
    np.testing.assert_array_equal(tensors["class_vectors"], published_prompts(published["q16"]).astype(np.float32))
    assert metadata == {"kind": "prompts", "format": SIGNAL_FORMAT, "source": "prompts.p", "scale": "100", "positive_class": "1",
                        "source_sha256": hashlib.sha256(published["q16"].read_bytes()).hexdigest()}


def test_one_source_always_converts_to_the_same_bytes(published, converted, tmp_path):
    again = tmp_path / "again.safetensors"
    convert_signal_weights(published["improved"], again)
    assert again.read_bytes() == converted["improved"].read_bytes()


def test_legacy_torch_files_convert_like_zip_ones(published, converted, tmp_path):
    legacy = tmp_path / "sa_0_4_vit_l_14_linear.pth"
    torch.save(torch.load(published["v1"], weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    assert convert_signal_weights(legacy, tmp_path / "legacy.safetensors") == "aesthetic"
    assert read_safetensors(tmp_path / "legacy.safetensors")[0].keys() == read_safetensors(converted["v1"])[0].keys()
    for name, values in read_safetensors(converted["v1"])[0].items():
        np.testing.assert_array_equal(read_safetensors(tmp_path / "legacy.safetensors")[0][name], values)


def test_scale_and_positive_class_can_be_chosen(published, embeddings, tmp_path):
    out = tmp_path / "violence-50.safetensors"
    assert main(["models", "convert", str(published["violence"]), str(out), "--scale", "50", "--positive-class", "0"]) == 0
    assert read_safetensors(out)[1]["scale"] == "50" and read_safetensors(out)[1]["positive_class"] == "0"
    detector = load_signal_head(out)
    vectors = np.load(published["violence"]).astype(np.float64)
    logits = 50 * embeddings.astype(np.float64) @ (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).T
    expected = np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)
    np.testing.assert_allclose(detector.score(embeddings), expected, atol=1e-6, rtol=0)


# -- aesthetic heads against the published models ------------------------------------------------------


@pytest.mark.parametrize("name", ["improved", "v1", "v1_b32"])
def test_aesthetic_head_scores_as_the_published_model(published, converted, name):
    head = load_signal_head(converted[name], kind="aesthetic")
    state = torch.load(published[name], weights_only=True)
    dim = 512 if name == "v1_b32" else EMBEDDING_DIM
    model = PublishedMLP(dim) if name == "improved" else torch.nn.Linear(dim, 1)
    model.load_state_dict(state)
    model.eval()
    raw = np.random.default_rng(2).standard_normal((ROWS, dim)).astype(np.float32) * 3  # not normalised: the head does it
    with torch.no_grad():
        reference64 = model.double()(torch.from_numpy(published_normalized(raw.astype(np.float64))))[:, 0].numpy()
        reference32 = model.float()(torch.from_numpy(published_normalized(raw)))[:, 0].numpy()
    scores = head.score(raw)
    assert isinstance(head, AestheticHead) and head.embedding_dim == dim
    assert scores.dtype == np.float32 and scores.shape == (ROWS,)
    assert 3 < scores.mean() < 7  # the realistic range the fixture aims for, so the tolerances mean something
    np.testing.assert_allclose(scores, reference64, atol=1e-6, rtol=0)
    np.testing.assert_allclose(scores, reference32, atol=1e-4, rtol=0)
    # The collapsed map is what a caller fuses into one matrix product.
    fused = published_normalized(raw.astype(np.float64)) @ head.weight + head.bias
    np.testing.assert_allclose(fused, reference64, atol=1e-9, rtol=0)


def test_rows_without_a_direction_score_nan_and_leave_the_others_alone(converted, embeddings):
    head = load_signal_head(converted["improved"])
    detector = load_signal_head(converted["q16"])
    damaged = embeddings[:4].copy()
    damaged[1] = 0
    damaged[2, 5] = np.nan
    for signal in (head, detector):
        scores = signal.score(damaged)
        assert np.isnan(scores[1]) and np.isnan(scores[2])
        np.testing.assert_array_equal(scores[[0, 3]], signal.score(embeddings[[0, 3]]))


# -- prompt detectors against the published scoring -----------------------------------------------------


def q16_similarity(x: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Q16's SimClassifier in float64: 100 * normalize(x) @ normalize(prompts).T."""
    x, prompts = x.astype(np.float64), prompts.astype(np.float64)
    return 100.0 * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (prompts / np.linalg.norm(prompts, axis=1, keepdims=True)).T


def published_prompts(path: Path) -> np.ndarray:
    """The values a published prompts file was built from (kept beside it, so no test unpickles anything)."""
    return np.load(path.with_name(path.name + ".values.npy"))


@pytest.mark.parametrize("name", ["q16", "q16_numpy2", "violence", "tensor"])
def test_prompt_detector_scores_as_the_published_softmax_and_decides_as_its_argmax(published, converted, embeddings, name):
    detector = load_signal_head(converted[name], kind="prompts")
    prompts = published_prompts(published[name])
    raw = embeddings * 2.5  # normalised again by the detector, as SimClassifier does
    similarity = q16_similarity(raw, prompts)
    shifted = np.exp(similarity - similarity.max(axis=1, keepdims=True))
    expected = shifted[:, 1] / shifted.sum(axis=1)
    scores = detector.score(raw)
    assert isinstance(detector, PromptDetector) and detector.scale == 100.0 and detector.positive_class == 1
    assert scores.dtype == np.float32 and scores.shape == (ROWS,)
    np.testing.assert_allclose(scores, expected, atol=1e-6, rtol=0)
    assert 0 < (scores > 0.5).sum() < ROWS  # both decisions occur, so the comparison below means something
    if name.startswith("q16"):  # Q16: the class is the argmax of the similarity
        np.testing.assert_array_equal(scores > 0.5, np.argmax(similarity, axis=1) == 1)
    if name == "violence":  # clip-retrieval's get_violent_items: argmax(embeddings @ prompts.T) == 1, prompts as stored
        np.testing.assert_array_equal(scores > 0.5, np.argmax(embeddings @ prompts.T, axis=1) == 1)
    np.testing.assert_allclose(np.linalg.norm(detector.class_vectors, axis=1), 1, atol=1e-6)


def test_scores_from_cosines_equal_the_score(converted, embeddings):
    detector = load_signal_head(converted["violence"])
    cosines = embeddings @ detector.class_vectors.T  # one float32 product, as a fused caller computes it
    np.testing.assert_allclose(detector.scores_from_cosines(cosines), detector.score(embeddings), atol=1e-5, rtol=0)


def test_softmax_stays_finite_for_a_large_scale(published, embeddings, tmp_path):
    out = tmp_path / "sharp.safetensors"
    convert_signal_weights(published["q16"], out, scale=1e5)
    scores = load_signal_head(out).score(embeddings)
    assert np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1))


# -- refusals -------------------------------------------------------------------------------------------


class RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture()
def bad_sources(tmp_path) -> dict[str, tuple[Path, str]]:
    """Files the converter refuses: name -> (file, words its sentence says)."""
    sources: dict[str, tuple[Path, str]] = {}

    def add(name: str, file_name: str, data: bytes, words: str) -> None:
        (tmp_path / file_name).write_bytes(data)
        sources[name] = (tmp_path / file_name, words)

    add("shell_pickle", "evil.p", pickle.dumps(RunsAShellCommand(tmp_path / "ran"), protocol=3), "system rather than holding only a numpy array")
    add("other_globals", "dict.p", pickle.dumps(collections.OrderedDict(w=np.zeros((2, 4), np.float16)), protocol=3), "collections.OrderedDict")
    add("not_an_array", "list.p", pickle.dumps([[0.5, 1.0], [1.0, 0.5]], protocol=3), "not of a numpy array")
    state = PublishedMLP(16).state_dict()
    state["layers.1.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra-key.pth")
    sources["wrong_keys"] = (tmp_path / "extra-key.pth", "not a published aesthetic predictor")
    state = PublishedMLP(16).state_dict()
    state["layers.2.weight"] = torch.zeros(127, 1024)
    torch.save(state, tmp_path / "wrong-shape.pth")
    sources["wrong_shape"] = (tmp_path / "wrong-shape.pth", "[128, 1024]")
    state = torch.nn.Linear(16, 1).state_dict()
    state["weight"][0, 3] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    sources["nan_weight"] = (tmp_path / "nan.pth", "NaN")
    torch.save(torch.nn.Linear(16, 1), tmp_path / "module.pth")
    sources["full_pickle"] = (tmp_path / "module.pth", "never unpickled")
    np.save(tmp_path / "one-d.npy", np.ones(16, np.float32))
    sources["one_d"] = (tmp_path / "one-d.npy", "[16]")
    nan_prompts = np.ones((2, 16), np.float32)
    nan_prompts[1, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan_prompts)
    sources["nan_prompts"] = (tmp_path / "nan.npy", "NaN")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object))
    sources["object_npy"] = (tmp_path / "objects.npy", "not a plain numeric .npy")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("weights/readme.txt", "not torch")
    sources["other_zip"] = (tmp_path / "other.zip", "not a PyTorch file")
    return sources


@pytest.mark.parametrize("name", ["shell_pickle", "other_globals", "not_an_array", "wrong_keys", "wrong_shape", "nan_weight",
                                  "full_pickle", "one_d", "nan_prompts", "object_npy", "other_zip"])
def test_converter_refuses_anything_but_the_published_formats_in_one_sentence(bad_sources, tmp_path, name):
    source, words = bad_sources[name]
    out = tmp_path / "out.safetensors"
    with pytest.raises(UserError) as refused:
        convert_signal_weights(source, out)
    one_sentence(str(refused.value), str(source), words)
    assert not out.exists()
    assert not (tmp_path / "ran").exists()  # the shell command in evil.p never ran


@pytest.mark.parametrize("name", ["shell_pickle", "wrong_keys", "nan_prompts"])
def test_command_line_refusals_exit_2_with_one_sentence(bad_sources, tmp_path, capsys, name):
    source, words = bad_sources[name]
    assert main(["models", "convert", str(source), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nsfw-curator: error: ")
    one_sentence(err, str(source), words)
    assert not (tmp_path / "ran").exists()


def test_command_line_refuses_the_wrong_kind_with_exit_2(published, tmp_path, capsys):
    assert main(["models", "convert", str(published["v1"]), str(tmp_path / "out.safetensors"), "--kind", "prompts"]) == 2
    one_sentence(capsys.readouterr().err.strip(), str(published["v1"]), "holds aesthetic weights, not prompts")
    assert main(["models", "convert", str(published["v1"]), str(tmp_path / "out.safetensors"), "--scale", "10"]) == 2
    one_sentence(capsys.readouterr().err.strip(), "--scale")


def test_converter_never_writes_over_its_source(published, tmp_path):
    source = tmp_path / "prompts.npy"
    source.write_bytes(published["violence"].read_bytes())
    with pytest.raises(UserError) as refused:
        convert_signal_weights(source, source)
    one_sentence(str(refused.value), "is the source file itself")
    assert source.read_bytes() == published["violence"].read_bytes()


def test_loader_refuses_the_wrong_kind_and_unconverted_files(published, converted):
    with pytest.raises(UserError) as refused:
        load_signal_head(converted["q16"], kind="aesthetic")
    one_sentence(str(refused.value), str(converted["q16"]), "not aesthetic")
    for name in ("improved", "q16", "violence"):
        with pytest.raises(UserError) as refused:
            load_signal_head(published[name])
        one_sentence(str(refused.value), str(published[name]), "nsfw-curator models convert")


def test_loader_validates_what_it_reads(converted, tmp_path):
    tensors, metadata = read_safetensors(converted["v1"])
    cases = {
        "foreign.safetensors": (tensors, {**metadata, "format": "other"}, "format"),
        "unknown-kind.safetensors": (tensors, {**metadata, "kind": "nudity"}, "signal kind"),
        "nan.safetensors": ({**tensors, "linear.0.bias": np.array([np.nan], np.float32)}, metadata, "NaN"),
        "broken-chain.safetensors": ({**tensors, "linear.0.weight": np.zeros((2, EMBEDDING_DIM), np.float32)}, metadata, "do not chain"),
        "missing-layer.safetensors": ({"linear.1.weight": tensors["linear.0.weight"], "linear.1.bias": tensors["linear.0.bias"]}, metadata, "linear.0"),
    }
    prompt_tensors, prompt_metadata = read_safetensors(converted["violence"])
    cases["bad-scale.safetensors"] = (prompt_tensors, {**prompt_metadata, "scale": "-3"}, "scale")
    cases["bad-class.safetensors"] = (prompt_tensors, {**prompt_metadata, "positive_class": "2"}, "positive_class")
    for file_name, (case_tensors, case_metadata, words) in cases.items():
        path = tmp_path / file_name
        path.write_bytes(safetensors_bytes(case_tensors, case_metadata))
        with pytest.raises(UserError) as refused:
            load_signal_head(path)
        one_sentence(str(refused.value), str(path), words)
    (tmp_path / "float16.safetensors").write_bytes(save_safetensors({name: values.astype(np.float16) for name, values in tensors.items()}, metadata))
    with pytest.raises(UserError) as refused:
        load_signal_head(tmp_path / "float16.safetensors")
    one_sentence(str(refused.value), "not F32")


def test_heads_refuse_embeddings_of_another_clip_model(converted):
    head = load_signal_head(converted["v1_b32"])
    head.check_dimension(512)
    with pytest.raises(UserError) as refused:
        head.score(np.ones((2, EMBEDDING_DIM), np.float32))
    one_sentence(str(refused.value), "512-d", "768-d")
    with pytest.raises(UserError):
        load_signal_head(converted["q16"]).check_dimension(512)
