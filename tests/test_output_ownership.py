"""No input may cost data: an output never overlaps its input, a run owns its output, cleanup touches only
the project's own files. Real tars, the real flows (tiny CLIP, the real LAION head), a real Prefect API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.dedup import image_dedup
from flows.nsfw_filter import nsfw_filter
from tasks.errors import UserError
from tests.support.tars import shard_of_good_samples, write_tar

pytestmark = pytest.mark.usefixtures("prefect_api")


def make_shards(folder: Path, shards: int, per_shard: int = 4, tag: str = "") -> dict[str, list[str]]:
    """Good shards `part-{i:06d}.tar`; shard path -> keys in order."""
    keys = {}
    for s in range(shards):
        shard_keys = [f"{tag}{s:03d}/{j:04d}" for j in range(per_shard)]
        keys[str(write_tar(folder / f"part-{s:06d}.tar", shard_of_good_samples(shard_keys, size=(64, 48))))] = shard_keys
    return keys


def filter_parameters(tiny_clip, laion_dir, root: Path, file_paths, output_path, **overrides) -> dict:
    config_path, checkpoint_path = tiny_clip
    parameters = dict(file_paths=file_paths, output_path=str(output_path), files_per_partition=1, task_batch_size=4,
                      clip_model=str(config_path), clip_pretrained=str(checkpoint_path), nsfw_weights=str(laion_dir / "vit_l_14.safetensors"),
                      cache_path=str(root / "cache"), images_per_tar=2, model_dir=str(root / "models"))
    return {**parameters, **overrides}


def run_filter(tiny_clip, laion_dir, root: Path, file_paths, output_path, **overrides) -> dict:
    return nsfw_filter(**filter_parameters(tiny_clip, laion_dir, root, file_paths, output_path, **overrides))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def score_rows(output_path: Path) -> list[tuple[str, str]]:
    rows = []
    for path in sorted((output_path / "scores").glob("part-*.parquet")):
        table = pq.read_table(path).to_pydict()
        rows += list(zip(table["shard"], table["key"]))
    return rows


def expected_rows(keys: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(shard, key) for shard, shard_keys in keys.items() for key in shard_keys]


def test_dedup_refuses_an_output_that_holds_or_overlaps_its_input(tmp_path, tiny_clip_768, laion_dir, prefect_api):
    make_shards(tmp_path / "in", 2)
    filtered = tmp_path / "filtered"
    run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "in"), filtered)
    before = snapshot(tmp_path)
    config_path, checkpoint_path = tiny_clip_768
    # The reported case: dedup over a filter run's shards, writing its copy to the filter run's output.
    command = [sys.executable, "-m", "flows.cli", "dedup", "--file-paths", str(filtered / "shards"), "--output-path", str(filtered),
               "--write-dataset", "--clip-model", str(config_path), "--clip-pretrained", str(checkpoint_path),
               "--cache-path", str(tmp_path / "cache"), "--model-dir", str(tmp_path / "models")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "PREFECT_API_URL": prefect_api})
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.fullmatch(rf"nsfw-curator: error: output_path {re.escape(str(filtered))} holds input shards \(.*/shards/part-000000-0000\.tar\); "
                        r"write the outputs to another directory or prefix\.", [line for line in done.stderr.splitlines() if "error:" in line][-1])
    dedup = dict(clip_model=str(config_path), clip_pretrained=str(checkpoint_path), cache_path=str(tmp_path / "cache"),
                 model_dir=str(tmp_path / "models"), write_dataset=True)
    with pytest.raises(UserError, match=r"holds input shards"):  # input = output
        image_dedup(file_paths=str(filtered / "shards"), output_path=str(filtered / "shards"), **dedup)
    with pytest.raises(UserError, match=r"is inside .*/in, which file_paths lists, so the outputs would be read as input"):
        image_dedup(file_paths=str(tmp_path / "in"), output_path=str(tmp_path / "in" / "dedup"), **dedup)
    with pytest.raises(UserError, match=r"is inside .*/in/\*\*/\*\.tar, which file_paths lists"):  # a recursive glob would read the outputs
        image_dedup(file_paths=str(tmp_path / "in" / "**" / "*.tar"), output_path=str(tmp_path / "in" / "dedup"), **dedup)
    with pytest.raises(UserError, match=r"holds .*/filtered/scores, which filter_output_path reads"):
        image_dedup(file_paths=str(tmp_path / "in"), output_path=str(filtered), filter_output_path=str(filtered), **dedup)
    with pytest.raises(UserError, match=r"is inside .*/in, which file_paths lists"):  # the filter flow too
        run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "in"), tmp_path / "in" / "out")
    assert snapshot(tmp_path) == before  # not one byte of input or output changed, nothing new written


def test_a_second_run_with_other_inputs_is_refused_and_the_first_keeps_every_row(tmp_path, tiny_clip_768, laion_dir):
    first_keys = make_shards(tmp_path / "a", 3, tag="a")
    other_keys = make_shards(tmp_path / "b", 2, tag="b")
    out = tmp_path / "out"
    run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "a"), out)
    first = snapshot(out)
    with pytest.raises(UserError, match=rf"^output_path {re.escape(str(out))} holds the outputs of an nsfw-filter run over 3 shards from "
                                        rf".*/a/part-000000\.tar, not of these inputs; write to another output_path, or pass take_over_output=True"):
        run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "b"), out)
    assert snapshot(out) == first and score_rows(out) == expected_rows(first_keys)
    # The same inputs again, named otherwise and with other settings: allowed, and redone where they changed.
    run_filter(tiny_clip_768, laion_dir, tmp_path, sorted(first_keys), out, score_threshold=0.3, images_per_tar=1)
    assert score_rows(out) == expected_rows(first_keys)
    assert json.loads((out / "summary.json").read_text())["score_threshold"] == 0.3
    # Taking the output over is explicit; then the new inputs replace the old ones entirely.
    run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "b"), out, take_over_output=True)
    assert score_rows(out) == expected_rows(other_keys)
    manifests = [json.loads(p.read_text()) for p in sorted((out / "_manifests").glob("*.json"))]
    assert [m["partition_index"] for m in manifests] == [0, 1]
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(Path(u).name for m in manifests for u in m["output_shards"])
    assert json.loads((out / "_owner.json").read_text())["partitions"] == 2


def user_files(root: Path) -> dict[str, bytes]:
    files = {"notes.tmp": b"my notes", ".x.tmp": b"hidden", "shards/part-abcdef.tar": b"not ours", "shards/part-999999.tar": b"not ours either",
             "shards/.notes.tmp": b"hidden notes", "scores/.x.tmp": b"hidden", "elsewhere/.part-000000.parquet.0123456789abcdef0123456789abcdef.tmp": b"x"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_user_files_survive_runs_and_reruns_on_an_output_path_with_glob_characters(tmp_path, tiny_clip_768, laion_dir, monkeypatch):
    keys = make_shards(tmp_path / "in", 3)
    out = tmp_path / "out[1]"
    kept = user_files(out)
    # a temp file a killed writer of ours left
    (out / "shards" / ".part-000001-0000.tar.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"partial")
    shard_alias = tmp_path / "alias.tar"
    shard_alias.symlink_to(tmp_path / "in" / "part-000000.tar")

    def ours() -> set[str]:
        manifests = [json.loads(p.read_text()) for p in sorted((out / "_manifests").glob("part-*.json"))]
        named = {str(Path(url).relative_to(out)) for m in manifests for url in [m["scores_file"], *m["output_shards"]]}
        return named | {f"_manifests/part-{m['partition_index']:06d}.json" for m in manifests} | {"summary.json", "_owner.json"}

    run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "in"), out)
    assert set(snapshot(out)) == set(kept) | ours()
    run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "in"), out, images_per_tar=1)  # more tars per partition
    assert set(snapshot(out)) == set(kept) | ours()
    # The dataset loses a shard: partition 2 goes, the others shrink to one tar each.
    (tmp_path / "in" / "part-000002.tar").unlink()
    del keys[str(tmp_path / "in" / "part-000002.tar")]
    run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "in"), out, images_per_tar=4)
    files = snapshot(out)
    assert set(files) == set(kept) | ours() and all(files[name] == data for name, data in kept.items())
    assert len(list((out / "_manifests").glob("part-*.json"))) == 2 and score_rows(out) == expected_rows(keys)
    # One shard spelled four ways, a symlink among them, is one shard in a run.
    single = tmp_path / "single"
    monkeypatch.chdir(tmp_path / "in")
    run_filter(tiny_clip_768, laion_dir, tmp_path, ["part-000000.tar", "./part-000000.tar", f"{tmp_path}//in/part-000000.tar", str(shard_alias)], single)
    assert score_rows(single) == expected_rows({str(tmp_path / "in" / "part-000000.tar"): keys[str(tmp_path / "in" / "part-000000.tar")]})


def test_s3_output_owned_by_its_first_run(tmp_path, s3_bucket, tiny_clip_768, laion_dir):
    import s3fs

    make_shards(tmp_path / "a", 2, tag="a")
    make_shards(tmp_path / "b", 1, tag="b")
    out = f"s3://{s3_bucket}/out"
    run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "a"), out)
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    first = {path: fs.cat_file(path) for path in fs.find(f"{s3_bucket}/out")}
    assert len([p for p in first if "/scores/" in p]) == 2
    with pytest.raises(UserError, match=rf"^output_path {re.escape(out)} holds the outputs of an nsfw-filter run over 2 shards"):
        run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "b"), out)
    fs.invalidate_cache()
    assert {path: fs.cat_file(path) for path in fs.find(f"{s3_bucket}/out")} == first


def test_the_owner_record_is_validated_and_names_the_owner(tmp_path):
    from dataclasses import asdict

    from tasks.io.ownership import claim_output, input_owner

    keys = make_shards(tmp_path / "in", 2)
    owner = input_owner("nsfw-filter", str(tmp_path / "in"), [".tar"], list(keys), 2)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=r"^output_path .*/file is a file; pass a directory or prefix for the outputs\.$"):
        claim_output(str(tmp_path / "file"), owner)
    out = tmp_path / "out"
    assert claim_output(str(out), owner) == owner
    # the same shards named one by one (extensions spelled otherwise) own it too; the partition mark never drops at a claim
    assert claim_output(str(out), input_owner("nsfw-filter", list(keys), ["TAR"], list(keys), 1)).partitions == 2
    with pytest.raises(UserError, match=r"holds the outputs of an nsfw-filter run over 2 shards from .*/in/part-000000\.tar, not of these inputs"):
        claim_output(str(out), input_owner("image-dedup", str(tmp_path / "in"), [".tar"], list(keys), 2))
    record = json.loads((out / "_owner.json").read_text())
    for bad in ("{", json.dumps({**record, "partitions": -1}), json.dumps({**record, "shards_sha256": "x"}), json.dumps([record]), "[" * 100_000):
        (out / "_owner.json").write_text(bad)
        with pytest.raises(UserError, match=r"^output_path .* has an unreadable _owner\.json \(.*\); write to another output_path"):
            claim_output(str(out), owner)
    (out / "_owner.json").unlink()
    (out / "summary.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds outputs of a run that recorded no _owner\.json"):
        claim_output(str(out), owner)
    assert claim_output(str(out), owner, take_over=True) == owner
    assert json.loads((out / "_owner.json").read_text()) == asdict(owner)
