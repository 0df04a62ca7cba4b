"""A real `prefect server start` on 127.0.0.1 for tests, with its own home, SQLite database and port.

`prefect_server(root)` yields a `PrefectServer`: its REST API (`get`, `post`, `patch`, the routes the
UI calls), the environment that points CLI commands and workers at it (`env`), `run` for a CLI command
and `start` for a long-lived process such as a worker. Every process it starts lives in its own
process group and is stopped (TERM, then KILL) when the context exits, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import httpx

T = TypeVar("T")

# The API needs ~9 s to start on an idle machine; a busy 2-core CI box is much slower.
SERVER_START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """TERM the group's leader (it stops its children once), then KILL the whole group after `grace_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Children (workers, their flow-run processes, the server's own) may outlive the leader: KILL the group regardless.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 1.0, logs: Sequence[Path] = ()) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout_s` naming `what`, with log tails."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {path.name} (tail) ---\n{path.read_text(errors='replace')[-4000:]}" for path in logs if path.exists())
            raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}\n{tails}")
        time.sleep(interval_s)


@dataclass
class PrefectServer:
    url: str  # the UI, e.g. http://127.0.0.1:4200
    api_url: str  # url + /api
    home: Path  # PREFECT_HOME of every process started here
    env: dict[str, str]  # environment pointing CLI commands and workers at this server
    log_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    client: httpx.Client | None = None

    def request(self, method: str, route: str, **kwargs: Any) -> Any:
        assert self.client is not None
        # A server on a busy host answers 503 (or nothing for a while) when SQLite stays locked; Prefect's own
        # client retries those, so do we. Only reads are retried after a timeout: a write may have been applied.
        for attempt in range(5):
            try:
                response = self.client.request(method, route, **kwargs)
            except httpx.ReadTimeout:
                if method != "GET" or attempt == 4:
                    raise
                continue
            if response.status_code != 503:
                break
            time.sleep(0.5 * 2**attempt)
        if response.status_code >= 300:
            raise AssertionError(f"{method} {route} -> {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    def get(self, route: str, **kwargs: Any) -> Any:
        return self.request("GET", route, **kwargs)

    def post(self, route: str, json: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", route, json=json if json is not None else {}, **kwargs)

    def patch(self, route: str, json: Any) -> Any:
        return self.request("PATCH", route, json=json)

    def logs(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log"))

    def run(self, command: list[str], cwd: Path, timeout_s: float = 300, extra_env: dict[str, str] | None = None) -> str:
        """Run a command to completion against this server; its output, or an AssertionError showing it."""
        result = subprocess.run(
            command,
            cwd=cwd,
            env={**self.env, **(extra_env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            start_new_session=True,
        )
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited with {result.returncode}:\n{output[-6000:]}")
        return output

    def start(self, name: str, command: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a long-lived process (its own process group, output in log_dir/{name}.log); stopped on exit."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process group below
        process = subprocess.Popen(
            command, cwd=cwd, env={**self.env, **(extra_env or {})}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()  # the child holds its own descriptor
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            stop_process_group(process)


def server_environment(root: Path, port: int, settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without any PREFECT_* setting, plus this server's own."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(
        PREFECT_HOME=str(root / "home"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PYTHONUNBUFFERED="1",
    )
    env.update(settings)
    return env


@contextlib.contextmanager
def prefect_server(root: Path, settings: dict[str, str] | None = None) -> Iterator[PrefectServer]:
    """`prefect server start` on a free 127.0.0.1 port with everything under `root`; stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_dir = root / "logs"
    log_dir.mkdir(exist_ok=True)
    server = PrefectServer(
        url=f"http://127.0.0.1:{port}",
        api_url=f"http://127.0.0.1:{port}/api",
        home=root / "home",
        env=server_environment(root, port, settings or {}),
        log_dir=log_dir,
    )
    try:
        process = server.start("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=root)
        server.client = httpx.Client(base_url=server.api_url, timeout=90)  # beyond the server's 60 s wait for SQLite's lock

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prefect server exited with {process.returncode}:\n{(log_dir / 'server.log').read_text()[-4000:]}")
            try:
                return server.client.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, SERVER_START_TIMEOUT_S, "the Prefect API to answer /health", logs=[log_dir / "server.log"])
        yield server
    finally:
        server.stop_all()
        if server.client is not None:
            server.client.close()
