"""Credentials written into URLs (`s3://KEY:SECRET@bucket/...`) are used, and appear in nothing the run stores or prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from tasks.io.locations import resolve_url_credentials, split_url_credentials
from tasks.errors import UserError
from tests.test_flow_filter import build_dataset, read_artifacts, upload_dir

pytestmark = pytest.mark.usefixtures("prefect_api")

ACCESS_KEY = "AKIDURLCREDTEST"
SECRET = "Url-Secret-7f3a9c"


def test_url_credentials_become_storage_options():
    assert split_url_credentials(f"s3://{ACCESS_KEY}:{SECRET}@bucket/in/") == ("s3://bucket/in/", {"key": ACCESS_KEY, "secret": SECRET})
    # a secret holding '/' or '@' is percent-encoded in a URL; the last '@' before the path ends the userinfo
    assert split_url_credentials("s3://k:a%2Fb@c@bucket/x.tar") == ("s3://bucket/x.tar", {"key": "k", "secret": "a/b@c"})
    assert split_url_credentials("ftp://me:pw@host/x.tar") == ("ftp://host/x.tar", {"username": "me", "password": "pw"})
    assert split_url_credentials("/data/a:b@c/x.tar") == ("/data/a:b@c/x.tar", {})
    files, output, options = resolve_url_credentials([f"s3://{ACCESS_KEY}:{SECRET}@b/in/a.tar::s3://b/in/b.tar"], f"s3://{ACCESS_KEY}:{SECRET}@b/out")
    assert files == ["s3://b/in/a.tar::s3://b/in/b.tar"] and output == "s3://b/out" and options == {"key": ACCESS_KEY, "secret": SECRET}
    with pytest.raises(UserError, match="different storage credentials") as raised:
        resolve_url_credentials(f"s3://{ACCESS_KEY}:{SECRET}@b/in", "s3://other:key@b/out")
    assert SECRET not in str(raised.value)


def flow_runs_since(known: set) -> list:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return [run for run in client.read_flow_runs(limit=200) if run.id not in known]


def logs_of(flow_run_id) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return "\n".join(log.message for log in logs)


def test_run_with_credentials_in_urls_leaks_them_nowhere(tmp_path, s3_bucket, tiny_clip_768, laion_dir, monkeypatch, capsys):
    import s3fs

    dataset = build_dataset(tmp_path, good_shards=1)
    upload_dir(s3fs.S3FileSystem(), dataset.input_dir, f"{s3_bucket}/in")
    # From here on the only credentials are the ones in the URLs (moto accepts any key, but requests must be signed).
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    s3fs.S3FileSystem.clear_instance_cache()
    secret_url = f"s3://{ACCESS_KEY}:{SECRET}@{s3_bucket}"
    config_path, checkpoint_path = tiny_clip_768
    known = {run.id for run in flow_runs_since(set())}
    code = main(["filter", "--file-paths", f"{secret_url}/in", "--output-path", f"{secret_url}/out", "--cache-path", f"{secret_url}/cache",
                 "--clip-model", str(config_path), "--clip-pretrained", str(checkpoint_path),
                 "--nsfw-weights", str(laion_dir / "vit_l_14.safetensors"), "--files-per-partition", "2", "--images-per-tar", "3",
                 "--review-samples", "4"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert SECRET not in printed.out + printed.err and ACCESS_KEY not in printed.out + printed.err

    # every object the run wrote: scores, shards, manifests, summary, review sheet, store entries, Prefect cache records
    fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET)
    written = {path: fs.cat_file(path) for path in fs.find(s3_bucket) if not path.startswith(f"{s3_bucket}/in/")}
    kinds = {"/out/scores/", "/out/shards/", "/out/_manifests/", "/out/summary.json", "/out/review/review.html", "/cache/_prefect_results/", "/cache/tiny-clip"}
    assert all(any(kind in path for path in written) for kind in kinds), sorted(written)
    for path, data in written.items():
        assert SECRET.encode() not in data and ACCESS_KEY.encode() not in data, path
    summary = json.loads(written[f"{s3_bucket}/out/summary.json"])
    assert summary["samples"] == sum(len(keys) for keys in dataset.keys.values())

    # what Prefect's API holds: the flow run (with its parameters), its logs and its artifacts
    (run,) = [run for run in flow_runs_since(known) if run.name and run.flow_id]
    assert run.parameters["file_paths"] == f"s3://{s3_bucket}/in"
    api_text = run.model_dump_json() + logs_of(run.id) + "".join(a.model_dump_json() for a in read_artifacts(run.id).values())
    assert "review" in api_text and f"s3://{s3_bucket}/out" in api_text
    assert SECRET not in api_text and ACCESS_KEY not in api_text

    # a mistake named with credentials: the one-sentence error does not repeat them
    code = main(["filter", "--file-paths", f"{secret_url}/in/part-000000.tar", f"{secret_url}/in/part-000099.tar",
                 "--output-path", f"{secret_url}/out2", "--cache-path", f"{secret_url}/cache",
                 "--clip-model", str(config_path), "--clip-pretrained", str(checkpoint_path), "--nsfw-weights", str(laion_dir / "vit_l_14.safetensors")])
    printed = capsys.readouterr()
    assert code == 2 and "part-000099.tar" in printed.err and f"s3://{s3_bucket}/in/part-000099.tar" in printed.err
    assert SECRET not in printed.err and ACCESS_KEY not in printed.err
    s3fs.S3FileSystem.clear_instance_cache()


def test_output_path_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_clip_768, laion_dir, capsys):
    dataset = build_dataset(tmp_path, good_shards=1)
    (tmp_path / "out.parquet").write_bytes(b"not a directory")
    config_path, checkpoint_path = tiny_clip_768
    code = main(["filter", "--file-paths", str(dataset.input_dir), "--output-path", str(tmp_path / "out.parquet"), "--cache-path", str(tmp_path / "cache"),
                 "--clip-model", str(config_path), "--clip-pretrained", str(checkpoint_path), "--nsfw-weights", str(laion_dir / "vit_l_14.safetensors")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"nsfw-curator: error: output_path {tmp_path / 'out.parquet'} is an existing file; pass a directory or prefix for the outputs."
    assert not (tmp_path / "cache").exists()
