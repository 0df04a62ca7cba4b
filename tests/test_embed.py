"""CLIP embedding: offline resolution, parity with open_clip, batching, identity, the per-process model."""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tests.support.tars import (
    BAD_CASE_EXPECTED,
    PHOTO_NAMES,
    Member,
    bad_case_members,
    drawn_image,
    encode,
    large_photo,
    member_offsets,
    photo,
    shard_of_good_samples,
    tar_bytes,
    write_tar,
)
from tests.support.transforms import KillingTransform, RefusingTransform
from tests.support.tiny_clip import make_tiny_clip, open_clip_reference, save_clip_checkpoint, tiny_clip_config

from tasks.models.clip_resolve import clip_identity, resolve_clip, weights_fingerprint
from tasks.filter.plan import EmbedStage
from tasks.models.bounded_transform import model_input, pixel_step
from tasks.models.embed import (
    ClipEmbedder,
    embed_partition,
    embed_shard,
    feed_model_batches,
    load_clip_embedder,
    select_device,
    unload_clip_models,
)
from tasks.errors import UserError
from tasks.io.read import DecodeOptions, iter_samples
from tasks.store.entries import EmbeddingStore, embedding_matrix, partition_embedding_identity

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_COSINE = 0.99999
NO_REDUCTION = DecodeOptions(reduced_jpeg_size=None)


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Images of varied sizes, aspect ratios and modes (the transform converts to RGB)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        height, width = int(rng.integers(20, 160)), int(rng.integers(20, 160))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        images.append(image.convert("L") if i % 5 == 3 else image.convert("RGBA") if i % 5 == 4 else image)
    return images


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def png_shard(path: Path, images: list[Image.Image]) -> str:
    """A shard holding `images` as lossless PNGs, one sample each, keys in order."""
    return str(write_tar(path, [Member(f"{index:04d}.png", encode(image, "PNG")) for index, image in enumerate(images)]))


def flow_embeddings(weights, images: list[Image.Image], folder: Path, batch_size: int = 32) -> np.ndarray:
    """The embeddings the flow's embedding stage (`embed_partition`) stores for `images`, in their order."""
    folder.mkdir(parents=True, exist_ok=True)
    shard = png_shard(folder / "images.tar", images)
    store = EmbeddingStore(folder / "cache")
    embed_partition([shard], EmbedStage.of(weights, store, NO_REDUCTION, model_inference_batch_size=batch_size), device="cpu")
    return embedding_matrix(store.read_table(clip_identity(weights, NO_REDUCTION.identity()), shard))


@pytest.fixture(scope="module")
def tiny_768(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny768"), embed_dim=768)


@pytest.mark.parametrize("embed_dim, checkpoint_format", [(768, "safetensors"), (512, "pt"), (512, "bin")])
def test_embeddings_equal_open_clip(tmp_path, embed_dim, checkpoint_format):
    config_path, checkpoint_path = make_tiny_clip(tmp_path, embed_dim=embed_dim, checkpoint_format=checkpoint_format, name=f"tiny-{embed_dim}")
    images = random_images(11)
    weights = resolve_clip(str(config_path), str(checkpoint_path), tmp_path)
    embeddings = flow_embeddings(weights, images, tmp_path / "flow", batch_size=4)

    assert embeddings.dtype == np.float32 and embeddings.shape == (11, embed_dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    reference = open_clip_reference(config_path, checkpoint_path, images)
    assert cosines(embeddings, reference).min() >= PARITY_COSINE


def test_quick_gelu_from_config_matches_open_clip(tmp_path):
    config = dict(tiny_clip_config(embed_dim=512), quick_gelu=True)
    config_path = tmp_path / "tiny-quickgelu.json"
    config_path.write_text(json.dumps(config))
    checkpoint_path = save_clip_checkpoint(config, tmp_path / "tiny-quickgelu.safetensors")
    weights = resolve_clip(str(config_path), str(checkpoint_path), tmp_path)
    assert weights.quick_gelu
    images = random_images(5)
    embeddings = flow_embeddings(weights, images, tmp_path / "flow")
    assert cosines(embeddings, open_clip_reference(config_path, checkpoint_path, images)).min() >= PARITY_COSINE


def test_batch_size_does_not_change_embeddings(tmp_path, tiny_768):
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    images = random_images(9)
    one_by_one = flow_embeddings(weights, images, tmp_path / "one", batch_size=1)
    batched = flow_embeddings(weights, images, tmp_path / "seven", batch_size=7)
    assert cosines(one_by_one, batched).min() >= PARITY_COSINE


def test_model_batches_keep_order_and_a_batch_without_images(tmp_path, tiny_768):
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    embedder = load_clip_embedder(weights, "cpu", batch_size=4)
    images = random_images(8)
    members = [Member(f"{index:04d}.png", encode(image, "PNG")) for index, image in enumerate(images)]
    # undecodable samples inside a model batch and, at the end, a model batch of nothing but them
    members[5:5] = [Member("0005b.png", b"not an image")]
    members += [Member("0009.png", b"not an image"), Member("0010.png", b"not an image either")]
    shard = str(write_tar(tmp_path / "mixed.tar", members))
    batches = feed_model_batches([shard], pixel_step(embedder.transform), embedder.batch_size, NO_REDUCTION, task_batch_size=3)
    outputs = [embeddings for _, embeddings in embedder.embed_model_batches(batches)]
    assert [o.shape for o in outputs] == [(4, 768), (4, 768), (0, 768)]
    assert cosines(np.concatenate(outputs), open_clip_reference(tiny_768[0], tiny_768[1], images)).min() >= PARITY_COSINE


def test_uint8_crops_normalised_in_the_batch_embed_bit_for_bit_as_open_clips_float_input(tmp_path, tiny_768):
    embedder = load_clip_embedder(resolve_clip(str(tiny_768[0]), str(tiny_768[1])), "cpu", batch_size=5)
    images = [image.convert("RGB") for image in random_images(5, seed=3)]  # as decoding hands them to the transform
    shard = png_shard(tmp_path / "images.tar", images)
    [batch] = list(feed_model_batches([shard], pixel_step(embedder.transform), embedder.batch_size, NO_REDUCTION, threads=2))
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (5, 3, 64, 64) and batch.pixels.is_contiguous()
    float_input = torch.stack([embedder.transform(image) for image in images])  # what the workers sent before: open_clip's preprocess
    assert torch.equal(model_input(embedder.transform, batch.pixels), float_input)
    assert np.array_equal(embedder.embed_pixels(batch.pixels), embedder.embed_pixels(float_input))


def test_model_batches_report_input_errors_and_stop_early(tmp_path, tiny_768):
    embedder = load_clip_embedder(resolve_clip(str(tiny_768[0]), str(tiny_768[1])), "cpu", batch_size=2)
    shard = png_shard(tmp_path / "images.tar", random_images(60))
    first_batch = next(iter(feed_model_batches([shard], pixel_step(embedder.transform), embedder.batch_size, NO_REDUCTION)))

    def failing():
        yield first_batch
        raise OSError("shard went away")

    stream = embedder.embed_model_batches(failing())
    assert next(stream)[1].shape == (2, 768)
    with pytest.raises(OSError, match="shard went away"):
        next(stream)

    transformed = []

    def counting_transform(image):
        transformed.append(1)
        return embedder.transform(image)

    batches = feed_model_batches([shard], counting_transform, embedder.batch_size, NO_REDUCTION, task_batch_size=2, threads=1,
                                 worker_processes=False)
    next(embedder.embed_model_batches(batches))
    batches.close()  # as embed_shard does: the reading and stacking threads stop instead of reading the whole shard
    read_by_close = len(transformed)
    time.sleep(0.5)
    assert len(transformed) == read_by_close  # nothing read after close() returned
    # bounded read-ahead: about four model batches (one filled, two waiting, one embedded) and the reader's
    # (prefetch + 2) reading batches, far from the shard's 60 images
    assert read_by_close <= 20


def test_model_is_loaded_once_per_process(tiny_768):
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    first = load_clip_embedder(weights, "cpu", batch_size=8)
    second = load_clip_embedder(weights, None, batch_size=2)
    assert first.model is second.model and second.batch_size == 2
    assert not first.model.training


# --- Offline resolution -------------------------------------------------------------------------


def test_pretrained_tag_resolves_from_model_dir_layout(tmp_path):
    config_path, _ = make_tiny_clip(tmp_path / "configs")
    model_dir = tmp_path / "models"
    weights_dir = model_dir / "clip" / "tiny-clip"
    checkpoint = save_clip_checkpoint(json.loads(config_path.read_text()), weights_dir / "mytag.bin", seed=3)
    weights = resolve_clip(str(config_path), "mytag", model_dir)
    assert weights.checkpoint_path == str(checkpoint.resolve()) and weights.pretrained_tag == "mytag"
    # safetensors is preferred when both exist.
    safetensors_checkpoint = save_clip_checkpoint(json.loads(config_path.read_text()), weights_dir / "mytag.safetensors", seed=3)
    assert resolve_clip(str(config_path), "mytag", model_dir).checkpoint_path == str(safetensors_checkpoint.resolve())
    embeddings = flow_embeddings(resolve_clip(str(config_path), "mytag", model_dir), random_images(2), tmp_path / "flow")
    assert embeddings.shape == (2, 768)


def test_missing_weights_name_where_they_were_looked_for(tmp_path):
    with pytest.raises(UserError) as raised:
        resolve_clip("ViT-L-14", "openai", tmp_path)
    message = str(raised.value)
    assert f"{tmp_path}/clip/ViT-L-14/openai.{{safetensors,bin,pt}}" in message
    assert "nsfw-curator models fetch" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_default_vit_l_14_openai_resolves_without_building(tmp_path):
    """ViT-L-14 + openai: open_clip's preprocessing for the tag and QuickGELU, as OpenAI trained it."""
    checkpoint = tmp_path / "clip" / "ViT-L-14" / "openai.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"stand-in bytes; resolution never loads them")
    weights = resolve_clip("ViT-L-14", "openai", tmp_path)
    assert weights.model_name == "ViT-L-14" and weights.embedding_dim == 768 and weights.image_size == (224, 224)
    assert weights.quick_gelu and json.loads(weights.model_config)["quick_gelu"] is True
    assert weights.preprocess_cfg["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    assert weights.preprocess_cfg["interpolation"] == "bicubic" and weights.preprocess_cfg["resize_mode"] == "shortest"
    assert clip_identity(weights, "decode").startswith("ViT-L-14-")
    # A name with a slash is open_clip's spelling too.
    assert resolve_clip("ViT-L/14", "openai", tmp_path) == weights


@pytest.mark.parametrize(
    "clip_model, clip_pretrained, message",
    [
        ("ViT-Nope-99", "openai", "not an open_clip model name"),
        ("missing/config.json", "openai", "does not exist"),
        ("BADJSON", "openai", "not valid JSON"),
        ("NOKEYS", "openai", "lacks `embed_dim`"),
        ("TINY", "missing/weights.safetensors", "does not exist"),
        ("TINY", "WRONGSUFFIX", "is not a .safetensors, .bin, .pt or .pth file"),
    ],
)
def test_bad_model_or_weights_get_one_sentence(tmp_path, clip_model, clip_pretrained, message):
    config_path, _ = make_tiny_clip(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nokeys.json").write_text('{"embed_dim": 3}')
    (tmp_path / "weights.npz").write_bytes(b"x")
    substitutions = {
        "BADJSON": str(tmp_path / "bad.json"),
        "NOKEYS": str(tmp_path / "nokeys.json"),
        "TINY": str(config_path),
        "WRONGSUFFIX": str(tmp_path / "weights.npz"),
    }
    with pytest.raises(UserError, match=message):
        resolve_clip(substitutions.get(clip_model, clip_model), substitutions.get(clip_pretrained, clip_pretrained), tmp_path)


def test_checkpoint_of_another_model_is_a_user_error(tmp_path):
    config_768, _ = make_tiny_clip(tmp_path / "a", embed_dim=768, name="tiny-a")
    _, checkpoint_512 = make_tiny_clip(tmp_path / "b", embed_dim=512, name="tiny-b")
    weights = resolve_clip(str(config_768), str(checkpoint_512), tmp_path)
    with pytest.raises(UserError, match="does not load into tiny-a"):
        load_clip_embedder(weights, "cpu")


def test_device_and_batch_size_errors(tiny_768):
    assert select_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a torch device"):
        select_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            select_device("cuda")
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    embedder = load_clip_embedder(weights, "cpu")
    with pytest.raises(UserError, match="at least 1"):
        ClipEmbedder(weights, embedder.model, embedder.transform, embedder.device, batch_size=0)


# --- Weights fingerprint and identity -----------------------------------------------------------


def _fingerprint_record(checkpoint) -> dict:
    from tasks.models.clip_resolve import fingerprint_record_path

    return json.loads(fingerprint_record_path(checkpoint.resolve()).read_text())


def test_weights_fingerprint_is_sha256_cached_in_the_users_cache_not_beside_the_model(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("NSFW_CURATOR_FINGERPRINT_CACHE", str(tmp_path / "fingerprints"))
    models = tmp_path / "models"
    models.mkdir()
    checkpoint = models / "w.safetensors"
    checkpoint.write_bytes(b"a" * 1000)
    digest = weights_fingerprint(checkpoint)
    assert digest == hashlib.sha256(b"a" * 1000).hexdigest()
    assert sorted(p.name for p in models.iterdir()) == ["w.safetensors"]  # nothing written next to the model
    record = _fingerprint_record(checkpoint)
    assert record["sha256"] == digest and record["size"] == 1000 and record["path"] == str(checkpoint.resolve())

    # New content (and so a new mtime): a new digest, and the record follows.
    checkpoint.write_bytes(b"b" * 1000)
    os.utime(checkpoint, ns=(record["mtime_ns"] + 10**9, record["mtime_ns"] + 10**9))
    assert weights_fingerprint(checkpoint) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert _fingerprint_record(checkpoint)["sha256"] == hashlib.sha256(b"b" * 1000).hexdigest()


def test_weights_fingerprint_reuses_a_record_matching_path_size_mtime_and_inode(tmp_path, monkeypatch):
    from tasks.models.clip_resolve import fingerprint_record_path

    monkeypatch.setenv("NSFW_CURATOR_FINGERPRINT_CACHE", str(tmp_path / "fingerprints"))
    (tmp_path / "fingerprints").mkdir()
    checkpoint = tmp_path / "big.safetensors"
    checkpoint.write_bytes(b"d" * 100)
    stat = checkpoint.stat()
    recorded = "f" * 64  # what an earlier process hashed: the file is not read again
    record = {"path": str(checkpoint.resolve()), "size": 100, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino, "sha256": recorded}
    fingerprint_record_path(checkpoint.resolve()).write_text(json.dumps(record))
    assert weights_fingerprint(checkpoint) == recorded
    stale = tmp_path / "stale.safetensors"
    stale.write_bytes(b"e" * 100)
    fingerprint_record_path(stale.resolve()).write_text(json.dumps({**record, "path": str(stale.resolve()), "mtime_ns": stale.stat().st_mtime_ns - 1}))
    assert weights_fingerprint(stale) != recorded
    # A record of another file (copied under this file's name) is not this file's.
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"d" * 100)
    fingerprint_record_path(other.resolve()).write_text(json.dumps(record))
    assert weights_fingerprint(other) != recorded


def test_weights_fingerprint_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    import hashlib

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # stands in for an unwritable cache folder, even for root
    monkeypatch.setenv("NSFW_CURATOR_FINGERPRINT_CACHE", str(blocker / "fingerprints"))
    checkpoint = tmp_path / "w.pt"
    checkpoint.write_bytes(b"c" * 10)
    assert weights_fingerprint(checkpoint) == hashlib.sha256(b"c" * 10).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder", "w.pt"]


def test_identity_changes_with_weights_model_preprocessing_and_decoding(tmp_path):
    config_path, checkpoint = make_tiny_clip(tmp_path / "base")
    base = resolve_clip(str(config_path), str(checkpoint))
    identity = clip_identity(base, "decode-a")
    assert identity == clip_identity(resolve_clip(str(config_path), str(checkpoint)), "decode-a")

    _, other_weights = make_tiny_clip(tmp_path / "seed", seed=1)
    other_model_config, other_model_checkpoint = make_tiny_clip(tmp_path / "deeper", layers=3)
    changed = {
        "weights": clip_identity(resolve_clip(str(config_path), str(other_weights)), "decode-a"),
        "model": clip_identity(resolve_clip(str(other_model_config), str(other_model_checkpoint)), "decode-a"),
        "preprocessing": clip_identity(dataclasses.replace(base, preprocess=base.preprocess.replace("bicubic", "bilinear")), "decode-a"),
        "decoding": clip_identity(base, "decode-b"),
        "model name": clip_identity(dataclasses.replace(base, model_name="tiny-clip-2"), "decode-a"),
    }
    assert identity not in changed.values() and len(set(changed.values())) == len(changed)


# --- The shard stage: reader -> embedder -> store -----------------------------------------------


@pytest.fixture(scope="module")
def bad_case_shard(tmp_path_factory) -> str:
    return str(write_tar(tmp_path_factory.mktemp("shards") / "00042.tar", bad_case_members()))


def test_embed_shard_one_row_per_sample_and_open_clip_parity(tmp_path, tiny_768, bad_case_shard):
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    embedder = load_clip_embedder(weights, "cpu", batch_size=4)
    store = EmbeddingStore(tmp_path / "cache")
    url = embed_shard(bad_case_shard, embedder, store, NO_REDUCTION, task_batch_size=7)
    assert url == store.entry_url(clip_identity(weights, NO_REDUCTION.identity()), bad_case_shard)

    frame = pq.read_table(url).to_pandas()
    samples = list(iter_samples(bad_case_shard, NO_REDUCTION))
    assert frame["key"].tolist() == [s.key for s in samples] == [key for key, _ in BAD_CASE_EXPECTED]
    for (_, expected_error), error, embedding in zip(BAD_CASE_EXPECTED, frame["error"], frame["embedding"]):
        if expected_error is None:
            assert pd.isna(error) and embedding is not None
        else:
            assert expected_error in error and embedding is None
    good = [s.image for s in samples if s.error is None]
    matrix = embedding_matrix(store.read_table(clip_identity(weights, NO_REDUCTION.identity()), bad_case_shard))
    stage = matrix[~np.isnan(matrix).any(axis=1)]
    reference = open_clip_reference(tiny_768[0], tiny_768[1], good)
    assert stage.shape == reference.shape
    assert cosines(stage, reference).min() >= PARITY_COSINE
    record = json.loads(pq.read_schema(url).metadata[b"nsfw_curator"])
    assert record["model_name"] == "tiny-clip" and record["precision"] == "fp32" and record["decode"] == NO_REDUCTION.identity()


def test_default_settings_embed_photos_and_drawings_exactly_as_open_clip(tmp_path, tiny_768):
    """The flow's default decode_mode gives open_clip's own embeddings of the decoded files, also for large JPEGs
    that the reduced mode would decode at a fraction of their size."""
    from flows.nsfw_filter import nsfw_filter

    default_mode = inspect.signature(nsfw_filter.fn).parameters["decode_mode"].default
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    decode = DecodeOptions.for_model(weights.image_size, default_mode)
    pictures = [photo(name) for name in PHOTO_NAMES[:4]] + [large_photo(1200, 900), drawn_image(1024, 768, seed=1), drawn_image(640, 960, seed=2)]
    files = [encode(picture, "JPEG", quality=92) for picture in pictures] + [encode(drawn_image(800, 600, seed=3), "PNG")]
    shard = str(write_tar(tmp_path / "photos.tar", [Member(f"{i:03d}.{'png' if i == len(files) - 1 else 'jpg'}", data) for i, data in enumerate(files)]))
    decoded_sizes = [sample.image.size for sample in iter_samples(shard, decode)]
    assert decoded_sizes == [picture.size for picture in pictures] + [(800, 600)]  # every pixel, none reduced
    store = EmbeddingStore(tmp_path / "cache")
    embed_shard(shard, load_clip_embedder(weights, "cpu", batch_size=3), store, decode, task_batch_size=5)

    stored = embedding_matrix(store.read_table(clip_identity(weights, decode.identity()), shard))
    reference = open_clip_reference(tiny_768[0], tiny_768[1], [Image.open(io.BytesIO(data)).convert("RGB") for data in files])
    assert stored.shape == reference.shape == (8, 768)
    assert cosines(stored, reference).min() >= PARITY_COSINE


@pytest.mark.parametrize("flow_module, flow_name, command", [("flows.nsfw_filter", "nsfw_filter", "filter"), ("flows.dedup", "image_dedup", "dedup")])
def test_decode_mode_is_in_the_ui_form_and_the_command_line(flow_module, flow_name, command):
    import importlib

    from prefect.utilities.callables import parameter_schema

    from flows.cli import build_parser

    flow = getattr(importlib.import_module(flow_module), flow_name)
    field = parameter_schema(flow.fn).model_dump()["properties"]["decode_mode"]
    assert field["default"] == "exact" and field["enum"] == ["exact", "reduced", "gpu"] and field["description"]
    plain = [command, "--file-paths", "in", "--output-path", "out"]
    assert build_parser(plain).parse_args(plain).decode_mode == "exact"
    assert build_parser(plain).parse_args(plain + ["--decode-mode", "reduced"]).decode_mode == "reduced"
    assert build_parser(plain).parse_args(plain + ["--decode-mode", "gpu"]).decode_mode == "gpu"


@pytest.mark.parametrize("worker_processes", [True, False], ids=["processes", "threads"])
def test_host_pipeline_gives_open_clip_inputs_in_model_batches_across_reading_batches(tiny_768, bad_case_shard, worker_processes):
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    transform = load_clip_embedder(weights, "cpu").transform
    samples = list(iter_samples(bad_case_shard, NO_REDUCTION))
    good = [sample for sample in samples if sample.error is None]

    batches = list(feed_model_batches([bad_case_shard], pixel_step(transform), 4, NO_REDUCTION, task_batch_size=3, threads=2,
                                      worker_processes=worker_processes))
    rows = [row for batch in batches for row in batch.rows]
    assert [key for key, _ in rows] == [sample.key for sample in samples]  # every sample once, in tar order
    assert [error for _, error in rows] == [sample.error for sample in samples]
    assert [len(batch.pixels) for batch in batches] == [4] * (len(good) // 4) + ([len(good) % 4] if len(good) % 4 else [])
    pixels = torch.cat([batch.pixels for batch in batches])
    assert pixels.dtype == torch.uint8  # the crops, a quarter of the float input's bytes
    assert torch.equal(model_input(transform, pixels), torch.stack([transform(sample.image) for sample in good]))  # bit for bit open_clip's


def test_an_image_the_transform_refuses_is_that_samples_error_only(tiny_768, bad_case_shard):
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    transform = load_clip_embedder(weights, "cpu").transform
    samples = list(iter_samples(bad_case_shard, NO_REDUCTION))
    refused_size = [sample for sample in samples if sample.error is None][1].image.size

    def picky(image):
        if image.size == refused_size:
            raise ValueError("odd size")
        return transform(image)

    rows = [row for batch in feed_model_batches([bad_case_shard], picky, 4, NO_REDUCTION) for row in batch.rows]
    assert [key for key, _ in rows] == [sample.key for sample in samples]
    refused = 0
    for sample, (_, error) in zip(samples, rows):
        if sample.error is None and sample.image.size == refused_size:
            refused += 1
            assert error.endswith("could not be preprocessed for the model (ValueError: odd size)")
        else:
            assert error == sample.error  # the others as before
    assert refused >= 1


def test_worker_processes_keep_a_refused_image_and_a_dead_decoder_to_that_sample(tiny_768, bad_case_shard):
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    transform = load_clip_embedder(weights, "cpu").transform
    samples = list(iter_samples(bad_case_shard, NO_REDUCTION))
    good = [sample for sample in samples if sample.error is None]
    refused_size, deadly_size = good[1].image.size, good[3].image.size
    assert refused_size != deadly_size and transform.__class__.__module__ == "tasks.models.bounded_transform"

    for picky, reason in [(RefusingTransform(pixel_step(transform), refused_size), "could not be preprocessed for the model (ValueError: odd size)"),
                          (KillingTransform(pixel_step(transform), deadly_size), "died while decoding image")]:
        hit_size = picky.size
        batches = list(feed_model_batches([bad_case_shard], picky, 4, NO_REDUCTION, task_batch_size=3, threads=2))
        rows = [row for batch in batches for row in batch.rows]
        assert [key for key, _ in rows] == [sample.key for sample in samples]
        hit = [sample.error is None and sample.image.size == hit_size for sample in samples]
        assert sum(hit) >= 1
        for sample, (_, error), is_hit in zip(samples, rows, hit):
            if is_hit:
                assert reason in error, error
            else:
                assert error == sample.error  # every other sample as without the bad image
        pixels = model_input(transform, torch.cat([batch.pixels for batch in batches if batch.pixels is not None]))
        assert torch.equal(pixels, torch.stack([transform(sample.image) for sample, is_hit in zip(samples, hit) if sample.error is None and not is_hit]))


def test_damaged_tar_gets_a_shard_level_row(tmp_path, tiny_768):
    data = tar_bytes(shard_of_good_samples(["a", "b", "c"]))
    shard = tmp_path / "damaged.tar"
    shard.write_bytes(data[: member_offsets(data)["c.jpg"][1] + 100])
    embedder = load_clip_embedder(resolve_clip(str(tiny_768[0]), str(tiny_768[1])), "cpu")
    frame = pq.read_table(embed_shard(str(shard), embedder, EmbeddingStore(tmp_path / "cache"), NO_REDUCTION)).to_pandas()
    assert frame["key"].tolist()[:2] == ["a", "b"] and pd.isna(frame["key"].iloc[-1])
    assert frame["embedding"].iloc[0] is not None and frame["embedding"].iloc[-1] is None
    assert "the tar is damaged" in frame["error"].iloc[-1]


def test_all_hits_never_load_clip(tmp_path, tiny_768):
    """A re-run whose shards all hit returns the same entries without building the model."""
    config_path, _ = tiny_768
    checkpoint = tmp_path / "own.safetensors"
    checkpoint.write_bytes(Path(tiny_768[1]).read_bytes())
    shards = [str(write_tar(tmp_path / f"{i:05d}.tar", shard_of_good_samples([f"k{i}a", f"k{i}b"]))) for i in range(3)]
    weights = resolve_clip(str(config_path), str(checkpoint))
    store = EmbeddingStore(tmp_path / "cache")
    cold = embed_partition(shards, EmbedStage.of(weights, store, NO_REDUCTION, task_batch_size=2), device="cpu")
    unload_clip_models()
    checkpoint.unlink()  # building the model would now fail
    warm = embed_partition(shards, EmbedStage.of(weights, store, NO_REDUCTION, task_batch_size=2), device="cpu")
    assert warm == cold
    identity = clip_identity(weights, NO_REDUCTION.identity())
    key = partition_embedding_identity(shards, identity, store)
    assert key == partition_embedding_identity(shards, identity, EmbeddingStore(tmp_path / "cache"))
    # A changed shard is a miss, which needs the model: the missing checkpoint proves it is loaded only then.
    write_tar(shards[1], shard_of_good_samples(["changed"]))
    assert partition_embedding_identity(shards, identity, store) != key
    with pytest.raises(UserError, match="own.safetensors no longer exists"):
        embed_partition(shards, EmbedStage.of(weights, store, NO_REDUCTION), device="cpu")


def test_decode_settings_content_and_weights_changes_miss(tmp_path, tiny_768, bad_case_shard):
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    store = EmbeddingStore(tmp_path / "cache")
    embed_partition([bad_case_shard], EmbedStage.of(weights, store, NO_REDUCTION), device="cpu")
    assert store.has(clip_identity(weights, NO_REDUCTION.identity()), bad_case_shard)
    assert not store.has(clip_identity(weights, DecodeOptions.for_model(weights.image_size, "reduced").identity()), bad_case_shard)
    _, reseeded = make_tiny_clip(tmp_path / "reseeded", seed=5)
    assert not store.has(clip_identity(resolve_clip(str(tiny_768[0]), str(reseeded)), NO_REDUCTION.identity()), bad_case_shard)


HITS_IN_ANOTHER_PROCESS = textwrap.dedent(
    """
    import json, sys
    from tasks.models.clip_resolve import clip_identity, resolve_clip
    from tasks.io.read import DecodeOptions
    from tasks.store.entries import EmbeddingStore, embedding_matrix
    config, checkpoint, cache, shard = sys.argv[1:5]
    identity = clip_identity(resolve_clip(config, checkpoint), DecodeOptions(reduced_jpeg_size=None).identity())
    store = EmbeddingStore(cache)
    print(json.dumps({"has": store.has(identity, shard), "url": store.entry_url(identity, shard),
                      "matrix": embedding_matrix(store.read_table(identity, shard)).tolist()}))
    """
)


def test_another_process_hits_the_same_entry(tmp_path, tiny_768, bad_case_shard):
    store = EmbeddingStore(tmp_path / "cache")
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    [url] = embed_partition([bad_case_shard], EmbedStage.of(weights, store, NO_REDUCTION), device="cpu")
    result = subprocess.run(
        [sys.executable, "-c", HITS_IN_ANOTHER_PROCESS, str(tiny_768[0]), str(tiny_768[1]), str(tmp_path / "cache"), bad_case_shard],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    answer = json.loads(result.stdout)
    assert answer["has"] and answer["url"] == url
    mine = embedding_matrix(store.read_table(clip_identity(weights, NO_REDUCTION.identity()), bad_case_shard))
    np.testing.assert_array_equal(np.array(answer["matrix"], dtype=np.float32), mine)


def test_stage_reads_and_writes_s3(s3_bucket, tmp_path, tiny_768):
    import s3fs

    fs = s3fs.S3FileSystem()
    shard = f"s3://{s3_bucket}/shards/00001.tar"
    fs.pipe_file(shard, tar_bytes(shard_of_good_samples(["x", "y", "z"])))
    weights = resolve_clip(str(tiny_768[0]), str(tiny_768[1]))
    store = EmbeddingStore(f"s3://{s3_bucket}/cache")
    [url] = embed_partition([shard], EmbedStage.of(weights, store, NO_REDUCTION), device="cpu")
    assert url.startswith(f"s3://{s3_bucket}/cache/tiny-clip-") and fs.exists(url)
    frame = store.read(clip_identity(weights, NO_REDUCTION.identity()), shard)
    assert frame["key"].tolist() == ["x", "y", "z"] and frame["error"].isna().all()
    local = embed_shard(str(write_tar(tmp_path / "00001.tar", shard_of_good_samples(["x", "y", "z"]))),
                        load_clip_embedder(weights, "cpu"), EmbeddingStore(tmp_path / "cache"), NO_REDUCTION)
    assert cosines(embedding_matrix(frame), embedding_matrix(pq.read_table(local))).min() >= PARITY_COSINE


# --- models fetch: only what needs no network ---------------------------------------------------


def test_fetch_keeps_what_is_present_and_valid(tmp_path, laion_dir):
    from safetensors.torch import save_file

    from tasks.models.fetch import fetch_models

    checkpoint = tmp_path / "clip" / "ViT-L-14" / "openai.safetensors"
    checkpoint.parent.mkdir(parents=True)
    save_file({"visual.proj": torch.zeros(4, 2)}, str(checkpoint))
    head = tmp_path / "nsfw" / "ViT-L-14.safetensors"
    head.parent.mkdir()
    head.write_bytes((laion_dir / "vit_l_14.safetensors").read_bytes())
    before = {checkpoint: checkpoint.stat().st_mtime_ns, head: head.stat().st_mtime_ns}

    assert fetch_models(tmp_path) == [checkpoint, head]
    assert {path: path.stat().st_mtime_ns for path in before} == before
    from tasks.models.clip_resolve import fingerprint_record_path

    assert fingerprint_record_path(checkpoint.resolve()).is_file()  # hashed now, recorded in the user's cache
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["openai.safetensors"]  # nothing beside the model
    # What fetch put there is exactly what the offline resolution finds.
    assert resolve_clip("ViT-L-14", "openai", tmp_path).checkpoint_path == str(checkpoint)


def test_fetch_refuses_unknown_tags_and_heads_before_downloading(tmp_path):
    from tasks.models.fetch import fetch_clip_weights, fetch_models

    with pytest.raises(UserError, match="no pretrained weights 'nope' for ViT-L-14 .*openai"):
        fetch_clip_weights(tmp_path, "ViT-L-14", "nope")
    with pytest.raises(UserError, match="NSFW heads only for ViT-L-14 and ViT-B-32"):
        fetch_models(tmp_path, "RN50", "openai")
    assert not any(tmp_path.iterdir())


def test_a_transform_the_worker_processes_cannot_import_is_applied_in_threads(bad_case_shard):
    good = sum(1 for sample in iter_samples(bad_case_shard, NO_REDUCTION) if sample.error is None)
    code = textwrap.dedent(f"""
        import torchvision.transforms.functional as F
        from tasks.io.read import DecodeOptions
        from tasks.models.embed import feed_model_batches

        class Small:  # defined in __main__, which the worker processes do not import
            def __call__(self, image):
                return F.to_tensor(image.resize((8, 8)))

        batches = list(feed_model_batches([{bad_case_shard!r}], Small(), 4, DecodeOptions(reduced_jpeg_size=None), threads=2))
        print(sum(len(batch.pixels) for batch in batches if batch.pixels is not None))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == good > 0
