"""Shared fixtures: the project's reference material and a real S3 endpoint on loopback."""

from __future__ import annotations

import os
import atexit
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# Prefect reads its settings at import: give the whole test session its own home before any test imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="nsfw-curator-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# Weight fingerprints are cached per user: the session keeps its own (subprocesses inherit it).
os.environ["NSFW_CURATOR_FINGERPRINT_CACHE"] = os.path.join(_PREFECT_HOME, "fingerprints")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("NSFW_CURATOR_SHARED", REPO_ROOT.parent / "shared"))
LAION_DIR = SHARED_DIR / "models" / "laion_nsfw"
REFERENCE_DIR = SHARED_DIR / "reference"


def _require(path: Path) -> Path:
    if not path.exists():
        message = f"{path} is missing: the LAION weights and Keras reference scores live in shared/ beside the repository"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def laion_dir() -> Path:
    return _require(LAION_DIR)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _require(REFERENCE_DIR)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A moto S3 server on 127.0.0.1 for the whole session; credentials go through the environment."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL_S3=url
    )
    yield url
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def unreachable_s3(s3_endpoint, monkeypatch):
    """S3 requests go to a closed port (the discard port); filesystems made meanwhile are forgotten after."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket name on the moto server."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return name


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real Prefect API (a temporary server on 127.0.0.1 with its own SQLite database) for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        from prefect.settings import PREFECT_API_URL

        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_clip_768(tmp_path_factory):
    """(config_path, checkpoint_path) of a tiny random-weight open_clip model with 768-d embeddings."""
    from tests.support.tiny_clip import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), embed_dim=768)
