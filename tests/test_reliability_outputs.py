"""What a careless teammate or a hostile output can do to a run, and what it must not cost: a folder under the
output that links into the input, a planted partition mark, an unsafe store identity, a brace pattern naming a
billion shards. Real tars, the real flows and command line (tiny CLIP, the real LAION head), a real Prefect API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import braceexpand
import pytest

from flows.dedup import image_dedup
from flows.nsfw_filter import preflight
from tasks.errors import UserError
from tasks.io.ownership import WRITTEN_FOLDERS
from tasks.io.partition import MAX_NAMED_URLS, brace_count, expand_file_paths
from tests.test_output_ownership import expected_rows, filter_parameters, make_shards, run_filter, score_rows, snapshot

pytestmark = pytest.mark.usefixtures("prefect_api")


def _cli(arguments: list[str], prefect_api: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *arguments], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PREFECT_API_URL": prefect_api})


def _error_line(done: subprocess.CompletedProcess) -> str:
    return [line for line in done.stderr.splitlines() if "error:" in line][-1]


def test_a_folder_under_the_output_linking_into_the_input_costs_no_input_byte(tmp_path, tiny_clip_768, laion_dir, prefect_api):
    make_shards(tmp_path / "in", 3)
    inputs = snapshot(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards").symlink_to(tmp_path / "in")  # the reported case: filtered shards written over the input
    config_path, checkpoint_path = tiny_clip_768
    models = ["--clip-model", str(config_path), "--clip-pretrained", str(checkpoint_path), "--cache-path", str(tmp_path / "cache"),
              "--model-dir", str(tmp_path / "models")]
    done = _cli(["filter", "--file-paths", str(tmp_path / "in"), "--output-path", str(out), "--nsfw-weights",
                 str(laion_dir / "vit_l_14.safetensors"), *models], prefect_api)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.fullmatch(rf"nsfw-curator: error: shards/ under output_path {re.escape(str(out))} is a symbolic link \(to .*/in\), and the run "
                        r"writes and deletes files there; replace it with a real folder, or pass the folder you want as output_path\.",
                        _error_line(done))
    # The dedup flow's copy goes to shards/ as well.
    done = _cli(["dedup", "--file-paths", str(tmp_path / "in"), "--output-path", str(out), "--write-dataset", "--embed-missing", *models],
                prefect_api)
    assert done.returncode == 2 and "shards/ under output_path" in _error_line(done), done.stderr[-3000:]
    assert snapshot(tmp_path / "in") == inputs
    # Every folder a run writes in is checked, however deep, and whatever it links to.
    for folder in WRITTEN_FOLDERS:
        target = out / folder
        for step in reversed([out / "/".join(folder.split("/")[: i + 1]) for i in range(len(folder.split("/")))]):
            if step.is_symlink():
                step.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            target.rmdir()
        target.symlink_to(tmp_path / "in")
        with pytest.raises(UserError, match=rf"^{re.escape(folder)}/ under output_path .* is a symbolic link"):
            preflight(filter_parameters(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "in"), out))
        target.unlink()
        target.mkdir()
    assert snapshot(tmp_path / "in") == inputs


def test_a_review_sheet_never_writes_or_deletes_through_a_linked_folder(tmp_path, tiny_clip_768, laion_dir):
    from tasks.review.sheet import write_review_sheet

    make_shards(tmp_path / "in", 1)
    out = tmp_path / "out"
    run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "in"), out)
    photos = tmp_path / "my-photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"not ours")
    (out / "review").mkdir()
    (out / "review" / "thumbs").symlink_to(photos)  # stale thumbnails are deleted there
    with pytest.raises(UserError, match=r"^review/thumbs/ under output_path .* is a symbolic link"):
        write_review_sheet(str(out), n=2)
    assert (photos / "holiday.jpg").read_bytes() == b"not ours"


def _plant_mark(out: Path, partitions: int) -> None:
    record = json.loads((out / "_owner.json").read_text())
    (out / "_owner.json").write_text(json.dumps({**record, "partitions": partitions}))


def test_a_planted_partition_mark_costs_nothing_and_stale_partitions_are_still_cleaned(tmp_path, tiny_clip_768, laion_dir):
    keys = make_shards(tmp_path / "in", 3)
    out = tmp_path / "out"
    run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "in"), out)
    # The dataset loses its last shard, and the owner record claims 10**9 partitions.
    (tmp_path / "in" / "part-000002.tar").unlink()
    del keys[str(tmp_path / "in" / "part-000002.tar")]
    _plant_mark(out, 10**9)
    started = time.perf_counter()
    run_filter(tiny_clip_768, laion_dir, tmp_path, str(tmp_path / "in"), out)
    assert time.perf_counter() - started < 120  # the reported run probed partitions one by one for days
    assert score_rows(out) == expected_rows(keys)
    assert sorted(p.name for p in (out / "_manifests").iterdir()) == ["part-000000.json", "part-000001.json"]
    assert not list((out / "shards").glob("part-000002-*")) and not (out / "scores" / "part-000002.parquet").exists()
    assert json.loads((out / "_owner.json").read_text())["partitions"] == 2

    # The same in the dedup flow's copy cleanup.
    config_path, checkpoint_path = tiny_clip_768
    dedup_out = tmp_path / "dedup"
    dedup = dict(file_paths=str(tmp_path / "in"), output_path=str(dedup_out), clip_model=str(config_path), clip_pretrained=str(checkpoint_path),
                 cache_path=str(tmp_path / "cache"), model_dir=str(tmp_path / "models"), write_dataset=True)
    image_dedup(**dedup)
    copies = sorted(p.name for p in (dedup_out / "shards").iterdir())
    assert copies and all(name.startswith(("part-000000-", "part-000001-")) for name in copies)
    _plant_mark(dedup_out, 10**9)
    (dedup_out / "shards" / "part-000007-0000.tar").write_bytes(b"left by a killed run over more shards")
    image_dedup(**dedup)
    assert sorted(p.name for p in (dedup_out / "shards").iterdir()) == copies
    assert json.loads((dedup_out / "_owner.json").read_text())["partitions"] == 2


def test_an_unsafe_embedding_identity_is_one_sentence_before_any_run(tmp_path, tiny_clip_768, prefect_api):
    make_shards(tmp_path / "in", 1)
    done = _cli(["dedup", "--file-paths", str(tmp_path / "in"), "--output-path", str(tmp_path / "out"), "--embedding-identity", "../../etc",
                 "--cache-path", str(tmp_path / "cache")], prefect_api, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert re.fullmatch(r"nsfw-curator: error: invalid parameters: embedding_identity string should match pattern .* \(got '\.\./\.\./etc'\)\.",
                        _error_line(done))
    assert not (tmp_path / "out").exists()
    # The store refuses it too when called directly (a check, not an assert: it holds under python -O).
    from tasks.store.entries import EmbeddingStore

    with pytest.raises(UserError, match=r"^embedding identity '\.\./\.\./etc' is not a store folder name"):
        EmbeddingStore(str(tmp_path / "cache")).entry_url("../../etc", str(tmp_path / "in" / "part-000000.tar"), "0" * 32)


@pytest.mark.parametrize("pattern", ["a{1..3}b{x,y,z}", "a{1..10..3}", "{a..g..2}", "{4..1}", "{2..-1}", "python{2.{5..7},3.{2,3}}",
                                     "x{}y", "x{a}y", "x{,}", "index.html{,.backup}", "{a,{b,c}d}{1..2}", "{07..10}", r"a\{1,2\}", r"x{a\,b,c}", "{{a,b}}"])
def test_brace_patterns_are_counted_as_braceexpand_expands_them(pattern):
    assert brace_count(pattern) == len(list(braceexpand.braceexpand(pattern)))


def test_a_brace_pattern_past_the_limit_is_refused_at_once(tmp_path):
    started = time.perf_counter()
    with pytest.raises(UserError, match=rf"^file_paths names 1,000,000,000 URLs, more than the {MAX_NAMED_URLS:,} a run checks one by one; "
                                        r"pass the folder or prefix"):
        expand_file_paths(str(tmp_path / "part-{000000000..999999999}.tar"))
    assert time.perf_counter() - started < 1
    with pytest.raises(UserError, match=r"names 250,001 URLs"):  # counted across entries and `::`
        expand_file_paths([str(tmp_path / "a-{000000..199999}.tar"), str(tmp_path / "b-{000000..049999}.tar") + "::" + str(tmp_path / "c.tar")])
    assert len(expand_file_paths(str(tmp_path / "part-{000000..249999}.tar"))) == MAX_NAMED_URLS
    with pytest.raises(UserError, match=r"has unbalanced braces"):
        expand_file_paths(str(tmp_path / "part-{0..9.tar"))
