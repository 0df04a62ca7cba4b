"""End-to-end: planted duplicates embedded by the filter flow, found by the dedup flow without the CLIP weights."""

from __future__ import annotations

import io
import json
import tarfile

import pandas as pd
import pytest
from PIL import Image

from flows.dedup import image_dedup
from flows.nsfw_filter import nsfw_filter
from tasks.errors import UserError
from tests.support.tars import PHOTO_NAMES, Member, drawn_image, encode, photo, write_tar
from tests.support.tiny_clip import make_tiny_clip

pytestmark = pytest.mark.usefixtures("prefect_api")
# Random tiny CLIP: distinct pictures reach cosine ~0.985, re-encoded or resized copies stay above 0.9998.
THRESHOLD = 0.999


def resized(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((int(image.width * factor), int(image.height * factor)), Image.BICUBIC)


def sample(key: str, image_bytes: bytes, extension: str = "jpg") -> list[Member]:
    return [Member(f"{key}.{extension}", image_bytes), Member(f"{key}.txt", f"caption of {key}".encode())]


@pytest.fixture()
def planted(tmp_path, laion_dir):
    """Two shards: originals, then a byte copy, re-encoded JPEGs, a resized copy and unrelated images."""
    originals = {name: encode(photo(name), "JPEG", quality=92) for name in PHOTO_NAMES[:6]}
    drawn = {f"drawn{s}": encode(drawn_image(320, 240, seed=s), "JPEG", quality=92) for s in range(4)}
    first = [m for key, data in {**originals, **drawn}.items() for m in sample(key, data)]
    second = (
        sample("copy-of-astronaut", originals["astronaut"])  # byte copy
        + sample("coffee-q40", encode(photo("coffee"), "JPEG", quality=40))  # re-encoded
        + sample("chelsea-half", encode(resized(photo("chelsea"), 0.5), "JPEG", quality=85))  # resized
        + sample("drawn0-png", encode(drawn_image(320, 240, seed=0), "PNG"), "png")  # re-encoded as PNG
        + [m for s in range(10, 14) for m in sample(f"other{s}", encode(drawn_image(320, 240, seed=s), "JPEG"))]
    )
    a = write_tar(tmp_path / "in" / "part-000000.tar", first)
    b = write_tar(tmp_path / "in" / "part-000001.tar", second)
    config_path, checkpoint_path = make_tiny_clip(tmp_path / "clip", embed_dim=768)
    nsfw_filter(file_paths=str(tmp_path / "in"), output_path=str(tmp_path / "filtered"), clip_model=str(config_path),
                clip_pretrained=str(checkpoint_path), nsfw_weights=str(laion_dir / "vit_l_14.safetensors"),
                cache_path=str(tmp_path / "cache"), model_dir=str(tmp_path / "models"))
    checkpoint_path.unlink()  # the dedup flow must not need CLIP
    expected_groups = {
        frozenset({(str(a), "astronaut"), (str(b), "copy-of-astronaut")}),
        frozenset({(str(a), "coffee"), (str(b), "coffee-q40")}),
        frozenset({(str(a), "chelsea"), (str(b), "chelsea-half")}),
        frozenset({(str(a), "drawn0"), (str(b), "drawn0-png")}),
    }
    return tmp_path, config_path, checkpoint_path, expected_groups


def groups_of(duplicates: pd.DataFrame) -> set[frozenset]:
    groups: dict[tuple, set] = {}
    for row in duplicates.itertuples():
        groups.setdefault((row.duplicate_of_shard, row.duplicate_of), {(row.duplicate_of_shard, row.duplicate_of)}).add((row.shard, row.key))
    return {frozenset(g) for g in groups.values()}


def run_dedup(root, config_path, checkpoint_path, **overrides):
    parameters = dict(file_paths=str(root / "in"), output_path=str(root / "dedup"), similarity_threshold=THRESHOLD,
                      clip_model=str(config_path), clip_pretrained=str(checkpoint_path), cache_path=str(root / "cache"),
                      model_dir=str(root / "models"))
    parameters.update(overrides)
    return image_dedup(**parameters)


@pytest.mark.parametrize("method", ["exact", "clustered"])
def test_dedup_finds_the_planted_groups_without_clip(planted, method):
    root, config_path, checkpoint_path, expected_groups = planted
    assert not checkpoint_path.exists()
    result = run_dedup(root, config_path, checkpoint_path, method=method)
    duplicates = pd.read_parquet(root / "dedup" / "duplicates.parquet")
    kept = pd.read_parquet(root / "dedup" / "kept.parquet")
    assert groups_of(duplicates) == expected_groups
    assert (duplicates["similarity"] >= THRESHOLD).all()
    assert len(kept) == 18 - 4 and result["duplicates"] == 4 and result["groups"] == 4
    # the survivor rule: in a pair, the first by (shard, key) is kept, i.e. the original in shard 0
    assert set(duplicates["duplicate_of_shard"]) == {str(root / "in" / "part-000000.tar")}
    summary = json.loads((root / "dedup" / "summary.json").read_text())
    assert summary["stats"]["method"] == method and summary["embedding_identity"].startswith("tiny-clip-")


def test_deduplicated_copy_of_the_filter_output(planted):
    root, config_path, checkpoint_path, _ = planted
    run_dedup(root, config_path, checkpoint_path, write_dataset=True, filter_output_path=str(root / "filtered"), images_per_tar=5)
    passed = pd.concat(pd.read_parquet(p) for p in sorted((root / "filtered" / "scores").glob("*.parquet")))
    duplicate_keys = set(pd.read_parquet(root / "dedup" / "duplicates.parquet")["key"])
    expected = {key for key, ok in zip(passed["key"], passed["passed"]) if ok} - duplicate_keys
    copied: dict[str, bytes] = {}
    for shard in sorted((root / "dedup" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            copied.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert {name.rsplit(".", 1)[0] for name in copied} == expected
    originals: dict[str, bytes] = {}
    for shard in sorted((root / "in").glob("*.tar")):
        with tarfile.open(shard) as tar:
            originals.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert all(originals[name] == data for name, data in copied.items())  # byte for byte


def test_missing_shards_are_named_with_the_remedy(planted):
    root, config_path, checkpoint_path, _ = planted
    write_tar(root / "in" / "part-000002.tar", sample("new", encode(drawn_image(64, 64, seed=99), "JPEG")))
    with pytest.raises(UserError, match=r"1 of 3 shards have no embeddings in the store \(.*part-000002\.tar\); fill the store with `nsfw-curator filter"):
        run_dedup(root, config_path, checkpoint_path)
    assert not (root / "dedup").exists()


def test_embed_missing_embeds_new_shards_without_the_nsfw_head(planted):
    root, config_path, checkpoint_path, expected_groups = planted
    # the same seeded tiny CLIP again (same bytes, same identity), and a new shard with a copy of a known picture
    make_tiny_clip(root / "clip", embed_dim=768)
    new = write_tar(root / "in" / "part-000002.tar", sample("rocket-again", encode(photo("rocket"), "JPEG", quality=92)))
    result = run_dedup(root, config_path, checkpoint_path, embed_missing=True)
    duplicates = pd.read_parquet(root / "dedup" / "duplicates.parquet")
    shard0 = str(root / "in" / "part-000000.tar")
    assert groups_of(duplicates) == expected_groups | {frozenset({(shard0, "rocket"), (str(new), "rocket-again")})}
    assert result["duplicates"] == 5
    assert list((root / "cache").glob("tiny-clip-*/part-000002-*.parquet"))  # stored for the next run
    assert not (root / "dedup" / "shards").exists()  # no filter run, no copy unless asked


def test_rerun_replaces_its_deduplicated_copy_and_owns_its_output(planted):
    root, config_path, checkpoint_path, _ = planted
    mine = {"notes.tmp": b"my notes", "shards/part-abcdef.tar": b"mine", "shards/.x.tmp": b"mine too"}
    for name, data in mine.items():
        (root / "dedup" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "dedup" / name).write_bytes(data)

    def copy_tars() -> list[str]:
        return sorted(p.name for p in (root / "dedup" / "shards").glob("part-*-*.tar"))

    run_dedup(root, config_path, checkpoint_path, write_dataset=True, images_per_tar=1)
    assert len(copy_tars()) == 14  # one kept sample per tar
    run_dedup(root, config_path, checkpoint_path, write_dataset=True, images_per_tar=5)
    named = json.loads((root / "dedup" / "summary.json").read_text())["deduplicated_shards"]
    assert copy_tars() == sorted(url.rsplit("/", 1)[1] for url in named) == ["part-000000-0000.tar", "part-000000-0001.tar", "part-000001-0000.tar"]
    run_dedup(root, config_path, checkpoint_path)  # no copy asked: the earlier copy no longer describes this output
    assert copy_tars() == []
    assert all((root / "dedup" / name).read_bytes() == data for name, data in mine.items())
    with pytest.raises(UserError, match=r"holds the outputs of an image-dedup run over 2 shards from .*part-000000\.tar, not of these inputs"):
        run_dedup(root, config_path, checkpoint_path, file_paths=str(root / "in" / "part-000001.tar"))
