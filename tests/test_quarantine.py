"""Known-abuse hash lists in a filter run: matched samples are quarantined (absent from the shards, the review sheet,
its thumbnails and the run's artifacts; present in `_quarantine/matches.jsonl` and their scores row), a stored dataset
is matched against a new list without decoding an image, and an entry written before hashes is hashed once.

Benign images only: the lists are made from some of the test photos (scikit-image's samples); the others stand for
the images a list must not match."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.hashes.image_hashes import bytes_hashes, pdq_hex, pdq_of_image
from tests.support.filter_parameters import local_filter_parameters
from tests.support.spies import Counted
from tests.support.tars import Member, encode, output_shard_keys, photo, write_tar
from tests.test_credentials import logs_of
from tests.test_flow_filter import read_artifacts

pytestmark = pytest.mark.usefixtures("prefect_api")

SHARDS = {"part-000000.tar": ("astronaut", "coffee", "chelsea"), "part-000001.tar": ("rocket", "retina", "immunohistochemistry")}


def photo_bytes(name: str) -> bytes:
    image = photo(name)
    return encode(image.resize((image.width // 2, image.height // 2), Image.BICUBIC), quality=90)


def write_dataset(root: Path) -> dict[str, bytes]:
    """The shards under root/in; {key: jpg bytes}."""
    images = {}
    for shard, names in SHARDS.items():
        members = []
        for name in names:
            key = f"p/{name}"
            images[key] = photo_bytes(name)
            members += [Member(f"{key}.jpg", images[key]), Member(f"{key}.txt", f"a photo: {name}".encode())]
        write_tar(root / "in" / shard, members)
    return images


def edited_copy(data: bytes) -> Image.Image:
    """What a list holder may have hashed: the image re-encoded at JPEG quality 50 and 1% cropped."""
    image = Image.open(io.BytesIO(encode(Image.open(io.BytesIO(data)).convert("RGB"), quality=50))).convert("RGB")
    return image.crop((image.width // 100, image.height // 100, image.width, image.height))


def scores_by_key(output: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted((output / "scores").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[row["key"]] = row
    return rows


def quarantine_records(output: Path) -> list[dict]:
    path = output / "_quarantine" / "matches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []




def test_matches_are_quarantined_and_a_new_list_matches_the_stored_dataset_without_decoding(tmp_path, tiny_clip_768, laion_dir, monkeypatch):
    import tasks.models.embed as embed
    from flows.nsfw_filter import nsfw_filter

    images = write_dataset(tmp_path)
    pdq_list = tmp_path / "lists" / "pdq-list.txt"
    pdq_list.parent.mkdir()
    pdq_bits, quality = pdq_of_image(edited_copy(images["p/astronaut"]))
    assert quality >= 50
    pdq_list.write_text(f"# test list\n{pdq_hex(pdq_bits)}\n")
    md5_list = tmp_path / "lists" / "md5-list.txt"
    md5_list.write_text(bytes_hashes(images["p/coffee"])[0].upper() + "\n")
    parameters = local_filter_parameters(tmp_path, tiny_clip_768, laion_dir, images_per_tar=10, review_samples=6)
    outcome = nsfw_filter(**parameters, hash_lists=[str(pdq_list), str(md5_list)])

    out = tmp_path / "out"
    quarantined = {"p/astronaut": ("pdq-list.txt", "pdq"), "p/coffee": ("md5-list.txt", "md5")}
    assert outcome["quarantined"] == 2 and json.loads((out / "summary.json").read_text())["quarantined"] == 2
    records = quarantine_records(out)
    assert {record["key"]: (record["list"], record["kind"]) for record in records} == quarantined
    assert all(record["shard"].endswith("part-000000.tar") for record in records)
    assert next(r for r in records if r["kind"] == "md5")["distance"] == 0 and next(r for r in records if r["kind"] == "pdq")["distance"] <= 31
    scores = scores_by_key(out)
    for key, (list_name, _) in quarantined.items():
        row = scores[key]
        assert row["passed"] is False and row["filtered_by"] == f"hash:{list_name}" and row["error"] is None
        assert row["nsfw_score"] is None and row["output_shard"] is None  # nothing derived from its pixels is kept
    assert not (output_shard_keys(out) & set(quarantined)) and output_shard_keys(out) == {k for k, r in scores.items() if r["passed"]}
    # The review sheet and its thumbnails skip them; the run's artifacts and logs never name them.
    sheet = (out / "review" / "review.html").read_text()
    assert all(key not in sheet for key in quarantined) and any(key in sheet for key in scores if key not in quarantined)
    thumbnails = list((out / "review").rglob("*.jpg")) + list((out / "review").rglob("*.png"))
    assert thumbnails and all("astronaut" not in path.name and "coffee" not in path.name for path in thumbnails)
    from prefect import get_client

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(limit=1, sort="START_TIME_DESC")
    api_text = "".join(artifact.model_dump_json() for artifact in read_artifacts(run.id).values()) + logs_of(run.id)
    assert "quarantined" in api_text and all(key not in api_text for key in quarantined)
    listed = [pdq_hex(pdq_bits), bytes_hashes(images["p/coffee"])[0]]
    for path in out.rglob("*"):  # no output holds a listed hash
        if path.is_file():
            content = path.read_bytes()
            assert all(value.encode() not in content.lower() for value in listed), path

    # A list that arrives later is matched against the stored dataset: no CLIP, no decode, no image opened.
    sha1_list = tmp_path / "lists" / "sha1-list.txt"
    sha1_list.write_text(bytes_hashes(images["p/rocket"])[1] + "\n")
    embedded = Counted(monkeypatch, embed, "embed_shard")
    opened = Counted(monkeypatch, Image, "open")
    manifests = {path.name: path.read_text() for path in (out / "_manifests").glob("*.json")}
    outcome = nsfw_filter(**{**parameters, "review_samples": 0}, hash_lists=[str(sha1_list)])
    assert (embedded.calls, opened.calls) == (0, 0)
    assert outcome["quarantined"] == 1 and [r["key"] for r in quarantine_records(out)] == ["p/rocket"]
    assert scores_by_key(out)["p/astronaut"]["passed"] is True and "p/rocket" not in output_shard_keys(out)
    assert not (out / "review" / "review.html").exists() and not list((out / "review").rglob("*.jpg"))  # the old sheet showed rocket
    # both partitions' settings identity holds the lists: both were rewritten
    assert all(json.loads(text)["settings_identity"] != json.loads((out / "_manifests" / name).read_text())["settings_identity"] for name, text in manifests.items())


def test_an_entry_written_before_hashes_is_hashed_once_and_says_so(tmp_path, tiny_clip_768, laion_dir, monkeypatch, caplog):
    import tasks.models.embed as embed
    from flows.nsfw_filter import nsfw_filter

    images = write_dataset(tmp_path)
    parameters = local_filter_parameters(tmp_path, tiny_clip_768, laion_dir, images_per_tar=10)
    nsfw_filter(**parameters)
    hash_columns = ["md5", "sha1", "pdq", "pdq_quality"]
    for entry in (tmp_path / "cache").rglob("*.parquet"):  # as written before image hashes existed
        table = pq.read_table(entry)
        assert set(hash_columns) <= set(table.column_names)
        pq.write_table(table.drop_columns(hash_columns), entry, write_page_checksum=True)
    md5_list = tmp_path / "md5-list.txt"
    md5_list.write_text(bytes_hashes(images["p/retina"])[0] + "\n")
    embedded = Counted(monkeypatch, embed, "embed_shard")
    outcome = nsfw_filter(**parameters, hash_lists=[str(md5_list)])
    assert embedded.calls == 0 and outcome["quarantined"] == 1
    assert "store entries had no image hashes" in caplog.text  # the task's warning (the API receives its logs later)
    for entry in (tmp_path / "cache").rglob("*.parquet"):
        assert set(hash_columns) <= set(pq.read_table(entry).column_names)  # hashed once: kept in the store


def test_a_bad_list_is_one_sentence_before_any_task(tmp_path, tiny_clip_768, laion_dir):
    from flows.nsfw_filter import preflight
    from tasks.errors import UserError

    write_dataset(tmp_path)
    bad = tmp_path / "list.txt"
    bad.write_text("0" * 64 + "\n" + "abc\n")
    with pytest.raises(UserError, match=r"list\.txt line 2 is not an MD5, SHA-1 or PDQ hash") as raised:
        preflight(local_filter_parameters(tmp_path, tiny_clip_768, laion_dir, hash_lists=[str(bad)]))
    assert "abc" not in str(raised.value) and not (tmp_path / "out").exists()


def test_pdq_is_of_the_pixels_as_stored_and_other_image_members_keep_a_sample_out(tmp_path):
    """A listed image saved see-through or with an EXIF rotation still hashes as its file's pixels (as
    ThreatExchange's hashers read files), and an image hidden under another member name never passes unscored."""
    from tasks.hashes.image_pass import hash_shard
    from tasks.io.decode import DecodeOptions
    from tasks.io.locations import Location
    from tasks.io.write import unscored_images
    from tests.support.tars import jpeg_with_orientation

    listed = photo("chelsea")
    see_through = listed.convert("RGBA")
    see_through.putalpha(0)  # invisible once flattened over white, its RGB intact
    transparent_png = encode(see_through, "PNG")
    rotated_jpeg = jpeg_with_orientation(listed, 6)
    shard = write_tar(tmp_path / "s.tar", [Member("a.png", transparent_png), Member("b.jpg", rotated_jpeg)])
    hashes = dict(hash_shard(Location(str(shard)), DecodeOptions()))
    for key, data in (("a", transparent_png), ("b", rotated_jpeg)):
        stored = Image.open(io.BytesIO(data))
        assert hashes[key].pdq == pdq_of_image(stored.convert("RGB"))[0], key
    assert unscored_images({"jpg": encode(photo("coffee")), "bin": encode(listed), "txt": b"a caption"}) is not None
    assert unscored_images({"jpg": encode(photo("coffee")), "txt": b"BMW", "json": b"{}"}) is None
