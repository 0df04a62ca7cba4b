"""Zero-shot concepts: the text tower alone equals open_clip's, the concepts file, scores, cached text features."""

from __future__ import annotations

import json
import pathlib
import pickle
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from safetensors.numpy import save as save_safetensors
from safetensors.torch import load_file, save_file
from tests.support.tiny_clip import make_tiny_clip, tiny_clip_config

from tasks.errors import UserError
from tasks.io.locations import Location
from tasks.models.clip_resolve import resolve_clip
from tasks.signals.concepts import (
    MAX_CONCEPTS,
    MAX_FILE_BYTES,
    TEXT_FEATURES_FORMAT,
    ConceptGroup,
    ConceptGroups,
    read_concepts,
    read_text_features,
    score_concepts,
    text_features_fingerprint,
    text_features_location,
    write_text_features,
)
from tasks.signals.text_tower import encode_concepts, text_tower

CONCEPTS = [
    "sexual", "nude", "naked child", "little girl", "young child", "a photo of a cat", "a drawing of a dog",
    "weapon", "blood", "violence", "a beach at sunset", "an empty room", "text on a sign", "a crowd of people",
    "lingerie", "underwear", "swimsuit", "a baby", "a teenager", "a school uniform", "gore", "a knife",
    "drugs", "a syringe", "ümlauts and 漢字", "UPPER case words", "punctuation!? (yes) -- really...",
    "a long caption " * 20, "x", "  surrounding spaces  ",
]
LAION_YAML = """\
nsfw:
  concepts:
    sexual: 0.2
    nude: 0.20
    naked child: 0.22
  action: obfuscate
special:
  concepts:
    little girl: 0.21
    young child: 0.21
  action: flag
  notes: [ignored, too]
"""
EXPECTED_GROUPS = ConceptGroups(
    groups=(
        ConceptGroup("nsfw", ("sexual", "nude", "naked child"), (0.2, 0.2, 0.22)),
        ConceptGroup("special", ("little girl", "young child"), (0.21, 0.21)),
    )
)


def text_keys(state_dict: dict, prefix: str = "") -> dict:
    """The text tower's tensors of a CLIP state dict (everything but the image tower and the logit scale/bias)."""
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix) and not key.startswith(("visual.", "logit_"))}


def open_clip_text_features(config_path: Path, checkpoint_path: Path, texts: list[str], **create_kwargs) -> np.ndarray:
    """What open_clip's full model gives: its tokenizer, `encode_text`, then L2 normalisation."""
    open_clip.add_model_config(config_path)
    model = open_clip.create_model(config_path.stem, pretrained=str(checkpoint_path), **create_kwargs).eval()
    with torch.no_grad():
        features = model.encode_text(open_clip.get_tokenizer(config_path.stem)(texts))
    return torch.nn.functional.normalize(features, dim=-1).numpy()


@pytest.fixture(scope="module")
def tiny_weights(tiny_clip_768):
    return resolve_clip(str(tiny_clip_768[0]), str(tiny_clip_768[1]))


# ---------------------------------------------------------------------------------------------------
# The text tower


def test_encode_concepts_equals_open_clip_encode_text(tiny_clip_768, tiny_weights):
    features = encode_concepts(tiny_weights, CONCEPTS)

    assert features.dtype == np.float32 and features.shape == (30, 768)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(features, open_clip_text_features(*tiny_clip_768, CONCEPTS), atol=1e-6, rtol=0)


def test_text_tower_builds_no_image_tower_and_holds_only_the_text_keys(tiny_clip_768, tiny_weights):
    tower = text_tower(tiny_weights, "cpu")
    checkpoint_text = text_keys(load_file(str(tiny_clip_768[1])))

    assert not hasattr(tower.module, "visual")
    assert not any("visual" in name for name, _ in tower.module.named_parameters())
    assert set(tower.module.state_dict()) == set(checkpoint_text)
    assert sum(p.numel() for p in tower.module.parameters()) == sum(t.numel() for t in checkpoint_text.values())
    assert text_tower(tiny_weights, "cpu") is tower  # built once per process


def test_a_checkpoint_without_image_weights_encodes_the_same(tmp_path, tiny_clip_768, tiny_weights):
    # The image tower's tensors are never read: a checkpoint holding only the text tower gives the same features.
    text_only = tmp_path / "text-only.safetensors"
    save_file(text_keys(load_file(str(tiny_clip_768[1]))), str(text_only))
    weights = resolve_clip(str(tiny_clip_768[0]), str(text_only))

    np.testing.assert_array_equal(encode_concepts(weights, CONCEPTS[:5]), encode_concepts(tiny_weights, CONCEPTS[:5]))


def test_torch_checkpoint_encodes_like_open_clip(tmp_path):
    config_path, checkpoint_path = make_tiny_clip(tmp_path, embed_dim=512, name="tiny-concepts-pt", checkpoint_format="pt")
    weights = resolve_clip(str(config_path), str(checkpoint_path))

    features = encode_concepts(weights, CONCEPTS[:7])
    np.testing.assert_allclose(features, open_clip_text_features(config_path, checkpoint_path, CONCEPTS[:7]), atol=1e-6, rtol=0)


def test_custom_text_model_with_quick_gelu_encodes_like_open_clip(tmp_path):
    from open_clip.model import CustomTextCLIP

    config = dict(tiny_clip_config(embed_dim=512), custom_text=True, quick_gelu=True)
    config_path = tmp_path / "tiny-concepts-custom.json"
    config_path.write_text(json.dumps(config))
    torch.manual_seed(3)
    model = CustomTextCLIP(**{key: value for key, value in config.items() if key != "custom_text"})
    checkpoint_path = tmp_path / "tiny-concepts-custom.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(checkpoint_path))
    weights = resolve_clip(str(config_path), str(checkpoint_path))

    tower = text_tower(weights, "cpu")
    assert not hasattr(tower.module, "visual")
    assert set(tower.module.state_dict()) == set(text_keys(model.state_dict(), "text."))
    features = encode_concepts(weights, CONCEPTS[:6])
    np.testing.assert_allclose(features, open_clip_text_features(config_path, checkpoint_path, CONCEPTS[:6]), atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encode_concepts_on_gpu_equals_cpu(tiny_weights):
    on_gpu = encode_concepts(tiny_weights, CONCEPTS, device="cuda")
    assert on_gpu.dtype == np.float32 and on_gpu.shape == (30, 768)
    np.testing.assert_allclose(on_gpu, encode_concepts(tiny_weights, CONCEPTS), atol=1e-4, rtol=0)


def assert_one_sentence(message: str, *names: str) -> None:
    assert "\n" not in message and message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z]", message[:-1]), message
    assert "Traceback" not in message
    for name in names:
        assert name in message, (name, message)


def test_checkpoint_of_another_text_tower_is_one_sentence(tmp_path, tiny_clip_768):
    config = tiny_clip_config(embed_dim=768)
    config["text_cfg"]["width"] = 32
    config_path = tmp_path / "tiny-concepts-narrow.json"
    config_path.write_text(json.dumps(config))
    weights = resolve_clip(str(config_path), str(tiny_clip_768[1]))

    with pytest.raises(UserError) as refused:
        encode_concepts(weights, ["nude"])
    assert_one_sentence(str(refused.value), str(tiny_clip_768[1]), "text tower")


def test_unusable_checkpoints_are_one_sentence_and_run_nothing(tmp_path, tiny_clip_768):
    marker = tmp_path / "unpickled"
    image_only = {key: value for key, value in load_file(str(tiny_clip_768[1])).items() if key.startswith("visual.")}
    save_file(image_only, str(tmp_path / "image-only.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    torch.save({"token_embedding.weight": _TouchOnLoad(marker)}, tmp_path / "hostile.pt")
    for name in ("image-only.safetensors", "junk.safetensors", "hostile.pt"):
        weights = resolve_clip(str(tiny_clip_768[0]), str(tmp_path / name))
        with pytest.raises(UserError) as refused:
            encode_concepts(weights, ["nude"])
        assert_one_sentence(str(refused.value), name)
    assert not marker.exists()


def test_hugging_face_text_tower_is_refused_in_one_sentence(tmp_path, tiny_clip_768):
    config = tiny_clip_config(embed_dim=768)
    config["text_cfg"] = {"hf_model_name": "roberta-base", "hf_tokenizer_name": "roberta-base"}
    config_path = tmp_path / "tiny-concepts-hf.json"
    config_path.write_text(json.dumps(config))
    weights = resolve_clip(str(config_path), str(tiny_clip_768[1]))

    with pytest.raises(UserError) as refused:
        encode_concepts(weights, ["nude"])
    assert_one_sentence(str(refused.value), "tiny-concepts-hf", "roberta-base")


# ---------------------------------------------------------------------------------------------------
# The concepts file


def write(path: Path, content: str | bytes) -> Location:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return Location(str(path))


def test_laion_yaml_json_and_plain_forms_read_alike(tmp_path):
    from_yaml = read_concepts(write(tmp_path / "safety_settings.yml", LAION_YAML))
    from_json = read_concepts(write(tmp_path / "concepts.json", json.dumps(yaml.safe_load(LAION_YAML))))
    plain = {"nsfw": {"sexual": 0.2, "nude": 0.2, "naked child": 0.22}, "special": {"little girl": 0.21, "young child": 0.21}}
    from_plain = read_concepts(write(tmp_path / "plain.yaml", yaml.safe_dump(plain, sort_keys=False)))

    assert from_yaml == from_json == from_plain == EXPECTED_GROUPS
    assert from_yaml.texts == ("sexual", "nude", "naked child", "little girl", "young child")
    assert from_yaml.fingerprint == from_json.fingerprint == from_plain.fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", from_yaml.fingerprint)
    changed = read_concepts(write(tmp_path / "changed.yaml", LAION_YAML.replace("0.22", "0.23")))
    assert changed.fingerprint != from_yaml.fingerprint


def test_concepts_file_from_s3(s3_bucket):
    location = Location(f"s3://{s3_bucket}/settings/safety_settings.yml")
    fs, path = location.filesystem()
    fs.pipe_file(path, LAION_YAML.encode())

    assert read_concepts(location) == EXPECTED_GROUPS


def test_a_concept_named_concepts_is_a_plain_concept(tmp_path):
    groups = read_concepts(write(tmp_path / "c.yaml", "odd:\n  concepts: 0.3\n  nude: 0.2\n"))
    assert groups.groups == (ConceptGroup("odd", ("concepts", "nude"), (0.3, 0.2)),)


def test_other_keys_of_a_group_are_ignored_even_given_twice(tmp_path):
    content = "nsfw:\n  action: flag\n  concepts: {nude: 0.2}\n  action: drop\n  extra: {nested: [1, 2]}\n"
    assert read_concepts(write(tmp_path / "c.yaml", content)).groups == (ConceptGroup("nsfw", ("nude",), (0.2,)),)


REFUSED_FILES = [
    ("list.yaml", "- nude\n- sexual\n", ["no groups"]),
    ("empty.yaml", "", ["no groups"]),
    ("upper.yaml", "NSFW:\n  nude: 0.2\n", ["'NSFW'", "column name"]),
    ("digit.yaml", "1st:\n  nude: 0.2\n", ["'1st'"]),
    ("dash.yaml", "bad-name:\n  nude: 0.2\n", ["'bad-name'"]),
    ("high.yaml", "nsfw:\n  concepts:\n    nude: 1.5\n", ["'nude'", "'nsfw'", "1.5"]),
    ("low.yaml", "nsfw:\n  nude: -2\n", ["'nude'", "-2"]),
    ("text.yaml", "nsfw:\n  nude: '0.2'\n", ["'nude'", "'0.2'"]),
    ("bool.yaml", "nsfw:\n  nude: true\n", ["'nude'", "True"]),
    ("nan.yaml", "nsfw:\n  nude: .nan\n", ["'nude'", "nan"]),
    ("inf.yaml", "nsfw:\n  nude: .inf\n", ["'nude'", "inf"]),
    ("null.yaml", "nsfw:\n  nude:\n", ["'nude'", "None"]),
    ("nan.json", '{"nsfw": {"nude": NaN}}', ["'nude'", "nan"]),
    ("empty-concept.yaml", "nsfw:\n  '': 0.2\n", ["'nsfw'", "empty concept"]),
    ("blank-concept.yaml", "nsfw:\n  '   ': 0.2\n", ["'nsfw'", "empty concept"]),
    ("number-concept.yaml", "nsfw:\n  123: 0.2\n", ["123", "'nsfw'", "quote"]),
    ("yes-concept.yaml", "nsfw:\n  yes: 0.2\n", ["True", "'nsfw'", "quote"]),
    ("twice.yaml", "nsfw:\n  nude: 0.2\n  nude: 0.3\n", ["'nude'", "'nsfw'", "twice"]),
    ("twice-laion.yaml", "nsfw:\n  concepts:\n    nude: 0.2\n    sexual: 0.2\n    nude: 0.3\n  action: flag\n", ["'nude'", "'nsfw'", "twice"]),
    ("concepts-twice.yaml", "nsfw:\n  concepts: {nude: 0.2}\n  concepts: {sexual: 0.2}\n", ["'concepts'", "'nsfw'", "twice"]),
    ("twice-stripped.yaml", "nsfw:\n  nude: 0.2\n  ' nude ': 0.3\n", ["'nude'", "'nsfw'", "twice"]),
    ("twice.json", '{"nsfw": {"concepts": {"nude": 0.2, "nude": 0.3}}}', ["'nude'", "'nsfw'", "twice"]),
    ("group-twice.json", '{"nsfw": {"nude": 0.2}, "nsfw": {"sexual": 0.2}}', ["'nsfw'", "twice"]),
    ("group-twice.yaml", "nsfw:\n  nude: 0.2\nnsfw:\n  sexual: 0.2\n", ["'nsfw'", "twice"]),
    ("no-concepts.yaml", "nsfw:\n  concepts: {}\n  action: flag\n", ["'nsfw'", "no concepts"]),
    ("empty-group.yaml", "nsfw: {}\n", ["'nsfw'", "no concepts"]),
    ("list-concepts.yaml", "nsfw:\n  concepts: [nude, sexual]\n", ["'nsfw'", "not a mapping"]),
    ("scalar-group.yaml", "nsfw: 0.2\n", ["'nsfw'", "mapping"]),
    ("syntax.yaml", "nsfw:\n  nude: 0.2\n bad indent: [\n", ["not valid YAML", "line"]),
    ("syntax.json", '{"nsfw": {"nude": 0.2,}}', ["not valid JSON", "line 1"]),
    ("tag.yaml", "nsfw: !!python/object/apply:os.system ['true']\n", ["YAML tag", "line 1"]),
    ("unhashable.yaml", "nsfw:\n  ? [a, b]\n  : 0.2\n", ["not valid YAML"]),
    ("latin1.yaml", "nsfw:\n  f\xfcr: 0.2\n".encode("latin-1"), ["not UTF-8"]),
    ("many.yaml", "nsfw:\n" + "".join(f"  concept {i}: 0.2\n" for i in range(MAX_CONCEPTS + 1)), [str(MAX_CONCEPTS + 1), str(MAX_CONCEPTS)]),
    ("big.yaml", "nsfw:\n  nude: 0.2\n" + "#" * MAX_FILE_BYTES + "\n", [str(MAX_FILE_BYTES)]),
]


@pytest.mark.parametrize("name, content, named", REFUSED_FILES, ids=[case[0] for case in REFUSED_FILES])
def test_bad_concepts_files_are_one_sentence_naming_the_file(tmp_path, name, content, named):
    location = write(tmp_path / name, content)
    with pytest.raises(UserError) as refused:
        read_concepts(location)
    assert_one_sentence(str(refused.value), str(location), *named)


def test_a_python_tag_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    location = write(tmp_path / "tag.yaml", f"nsfw: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n")
    with pytest.raises(UserError):
        read_concepts(location)
    assert not marker.exists()


def test_missing_concepts_file_is_one_sentence(tmp_path):
    location = Location(str(tmp_path / "absent.yaml"))
    with pytest.raises(UserError) as refused:
        read_concepts(location)
    assert_one_sentence(str(refused.value), str(location), "does not exist")


# ---------------------------------------------------------------------------------------------------
# Scores


def scores_by_loop(cosines: np.ndarray, groups: ConceptGroups) -> dict[str, tuple[list[float], list[str | None]]]:
    """The definition, one row and one concept at a time."""
    result = {}
    column = 0
    for group in groups.groups:
        scores, matched = [], []
        for row in cosines:
            values = [float(row[column + i]) for i in range(len(group.concepts))]
            scores.append(max(values) if not any(np.isnan(values)) else float("nan"))
            best, best_margin = None, None
            for concept, value, threshold in zip(group.concepts, values, group.thresholds):
                if value >= threshold and (best_margin is None or value - threshold > best_margin):
                    best, best_margin = concept, value - threshold
            matched.append(best)
        result[group.name] = (scores, matched)
        column += len(group.concepts)
    return result


def test_score_concepts_equals_the_loop():
    groups = ConceptGroups(
        groups=(
            ConceptGroup("nsfw", ("sexual", "nude", "naked child"), (0.2, 0.2, 0.22)),
            ConceptGroup("one", ("weapon",), (0.25,)),
            ConceptGroup("special", ("little girl", "young child", "a baby", "a teenager", "school"), (0.21, 0.21, 0.19, 0.3, -0.1)),
        )
    )
    rng = np.random.default_rng(7)
    cosines = rng.uniform(-0.1, 0.35, (300, 9)).astype(np.float32)
    cosines[0] = np.nan  # an image that could not be embedded
    cosines[1, :3] = [0.2, 0.2, 0.22]  # every concept exactly at its threshold: a tie, the first wins
    cosines[2, :3] = [0.3, 0.3, 0.1]  # equal margins
    cosines[3] = -0.5  # nothing matches (the last group's -0.1 threshold neither)
    cosines[4, 3:] = np.float32(0.25)  # exactly at the threshold in float32

    scores = score_concepts(cosines, groups)
    expected = scores_by_loop(cosines, groups)

    assert list(scores) == ["nsfw", "one", "special"]
    for name, (column, matched) in scores.items():
        assert column.dtype == np.float32 and column.shape == (300,)
        np.testing.assert_array_equal(column, np.asarray(expected[name][0], np.float32))
        assert matched == expected[name][1]
    assert scores["nsfw"][1][:4] == [None, "sexual", "sexual", None]
    assert scores["one"][1][4] == "weapon"
    assert np.isnan(scores["special"][0][0]) and scores["special"][1][3] is None
    empty = score_concepts(np.zeros((0, 9), np.float32), groups)
    assert empty["nsfw"][0].shape == (0,) and empty["nsfw"][1] == []


# ---------------------------------------------------------------------------------------------------
# Cached text features

TEXTS = ("sexual", "nude", "naked child")
DIM = 16


@pytest.fixture()
def features() -> np.ndarray:
    rows = np.random.default_rng(0).standard_normal((len(TEXTS), DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture()
def store(tmp_path) -> Location:
    return Location(str(tmp_path / "store"))


FINGERPRINT = text_features_fingerprint("tiny-clip-0123456789abcdef0123456789abcdef", TEXTS)


def test_text_features_fingerprint_names_model_and_texts():
    assert re.fullmatch(r"[0-9a-f]{64}", FINGERPRINT)
    assert text_features_fingerprint("tiny-clip-0123456789abcdef0123456789abcdef", list(TEXTS)) == FINGERPRINT
    assert text_features_fingerprint("tiny-clip-ffffffffffffffffffffffffffffffff", TEXTS) != FINGERPRINT
    assert text_features_fingerprint("tiny-clip-0123456789abcdef0123456789abcdef", TEXTS[::-1]) != FINGERPRINT


def test_text_features_round_trip(store, features):
    assert read_text_features(store, FINGERPRINT, TEXTS, DIM) is None  # nothing cached yet
    write_text_features(store, features, TEXTS, FINGERPRINT)

    path = Path(text_features_location(store, FINGERPRINT).url)
    assert path == Path(store.url) / "_text_features" / f"{FINGERPRINT}.safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the atomic write left no temp file
    read_back = read_text_features(store, FINGERPRINT, TEXTS, DIM)
    assert read_back.dtype == np.float32
    np.testing.assert_array_equal(read_back, features)


def test_encoded_features_round_trip_and_score(store, tiny_weights):
    texts = EXPECTED_GROUPS.texts
    encoded = encode_concepts(tiny_weights, texts)
    fingerprint = text_features_fingerprint("tiny-clip-identity", texts)
    write_text_features(store, encoded, texts, fingerprint)
    cached = read_text_features(store, fingerprint, texts, tiny_weights.embedding_dim)

    scores = score_concepts(encoded[:2] @ cached.T, EXPECTED_GROUPS)  # a text's own features as an "image"
    assert scores["nsfw"][1] == ["sexual", "nude"]
    np.testing.assert_allclose(scores["nsfw"][0], 1.0, atol=1e-6)


def safetensors_file(tensors: dict[str, np.ndarray], texts=TEXTS, fingerprint=FINGERPRINT) -> bytes:
    return save_safetensors(tensors, metadata={"format": TEXT_FEATURES_FORMAT, "fingerprint": fingerprint, "texts": json.dumps(list(texts))})


class _TouchOnLoad:
    """Unpickling this creates a file: proof that a reader unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def tampered_files(features: np.ndarray, marker: Path) -> dict[str, bytes]:
    good = safetensors_file({"text_features": features})
    torch_file = Path(marker.parent / "torch.pt")
    torch.save({"text_features": torch.from_numpy(features)}, torch_file)
    return {
        "other texts": safetensors_file({"text_features": features}, texts=("sexual", "nude", "a cat")),
        "fewer texts": safetensors_file({"text_features": features[:2]}, texts=TEXTS[:2]),
        "other fingerprint": safetensors_file({"text_features": features}, fingerprint="0" * 64),
        "no metadata": save_safetensors({"text_features": features}),
        "other format": save_safetensors({"text_features": features}, metadata={"format": "x", "fingerprint": FINGERPRINT, "texts": json.dumps(TEXTS)}),
        "NaN": safetensors_file({"text_features": np.where(np.arange(DIM) == 3, np.nan, features).astype(np.float32)}),
        "inf": safetensors_file({"text_features": np.full_like(features, np.inf)}),
        "not unit": safetensors_file({"text_features": features * 2}),
        "zero rows": safetensors_file({"text_features": np.zeros_like(features)}),
        "wrong dim": safetensors_file({"text_features": features[:, :-1] / np.linalg.norm(features[:, :-1], axis=1, keepdims=True)}),
        "wrong rows": safetensors_file({"text_features": np.concatenate([features, features[:1]])}),
        "float16": safetensors_file({"text_features": features.astype(np.float16)}),
        "float64": safetensors_file({"text_features": features.astype(np.float64)}),
        "extra tensor": safetensors_file({"text_features": features, "more": features}),
        "other tensor name": safetensors_file({"features": features}),
        "truncated": good[:-5],
        "header too long": (len(good) * 2).to_bytes(8, "little") + good[8:],
        "header not json": (8).to_bytes(8, "little") + b"not json" + good[16:],
        "empty": b"",
        "text": b"sexual,nude,naked child\n",
        "pickle": pickle.dumps(_TouchOnLoad(marker)),
        "pickled array": pickle.dumps(features),
        "torch.save": torch_file.read_bytes(),
    }


def test_tampered_text_features_are_a_miss(tmp_path, store, features):
    marker = tmp_path / "unpickled"
    location = text_features_location(store, FINGERPRINT)
    for reason, data in tampered_files(features, marker).items():
        Path(location.url).parent.mkdir(parents=True, exist_ok=True)
        Path(location.url).write_bytes(data)
        assert read_text_features(store, FINGERPRINT, TEXTS, DIM) is None, reason
    assert not marker.exists()


def test_text_features_for_another_dimension_are_a_miss(store, features):
    write_text_features(store, features, TEXTS, FINGERPRINT)
    assert read_text_features(store, FINGERPRINT, TEXTS, DIM + 1) is None
    assert read_text_features(store, FINGERPRINT, TEXTS[:2], DIM) is None
