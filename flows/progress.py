"""Progress of a filter run as partitions finish: Prefect artifacts for the UI, one updating line for a terminal.

`RunProgress` counts finished partitions and their images; `ProgressReport` publishes it as it changes:
a progress artifact (percent of partitions, updated in place) and a table artifact (images, images/s,
partitions done/total, ETA; a new version at most every `ARTIFACT_INTERVAL_S`), and, where the
command line asked for it (`show_in_terminal`), one line on stderr rewritten in place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import IO, Any, Optional
from uuid import UUID

ARTIFACT_INTERVAL_S = 10.0  # API writes per run stay few at any partition count
TERMINAL_INTERVAL_S = 0.5  # the line on a terminal
LOG_INTERVAL_S = 30.0  # the line when stderr is a file: one line each time
PROGRESS_KEY = "nsfw-filter-progress"
PROGRESS_TABLE_KEY = "nsfw-filter-throughput"

# Set by the command line for the run it starts in this process: where the progress line goes (None: nowhere).
_terminal: Optional[IO[str]] = None


def show_in_terminal(stream: Optional[IO[str]]) -> None:
    """Runs started in this process from now on draw their progress line on `stream` (None turns it off)."""
    global _terminal
    _terminal = stream


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


@dataclass
class RunProgress:
    total_partitions: int
    started: float = field(default_factory=time.monotonic)
    partitions_done: int = 0
    images: int = 0

    def partition_done(self, images: int) -> None:
        self.partitions_done += 1
        self.images += images

    @property
    def elapsed_s(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s

    @property
    def percent(self) -> float:
        return 100.0 * self.partitions_done / self.total_partitions if self.total_partitions else 100.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace of the partitions done so far; None before the first one."""
        if not self.partitions_done:
            return None
        return self.elapsed_s / self.partitions_done * (self.total_partitions - self.partitions_done)

    def line(self) -> str:
        return (
            f"{self.partitions_done}/{self.total_partitions} partitions | {self.images:,} images | "
            f"{self.images_per_s:,.1f} images/s | ETA {format_duration(self.eta_s)}"
        )

    def table(self) -> list[dict[str, Any]]:
        return [
            {"what": "partitions done", "value": f"{self.partitions_done} of {self.total_partitions} ({self.percent:.0f}%)"},
            {"what": "images", "value": f"{self.images:,}"},
            {"what": "images/s", "value": f"{self.images_per_s:,.1f}"},
            {"what": "elapsed", "value": format_duration(self.elapsed_s)},
            {"what": "ETA", "value": format_duration(self.eta_s) if self.partitions_done < self.total_partitions else "done"},
        ]


class ProgressReport:
    """Publishes a `RunProgress` to the current flow run's artifacts and, when asked, the terminal."""

    def __init__(self, total_partitions: int) -> None:
        from prefect.artifacts import create_progress_artifact

        self.progress = RunProgress(total_partitions)
        self._terminal = _terminal
        self._artifact_id: UUID = create_progress_artifact(0.0, key=PROGRESS_KEY, description=self._description())
        self._published_at = self._drawn_at = float("-inf")

    def _description(self) -> str:
        return f"partitions scored and written: {self.progress.line()}"

    def partition_done(self, images: int) -> None:
        self.progress.partition_done(images)
        now = time.monotonic()
        if now - self._published_at >= ARTIFACT_INTERVAL_S:
            self._publish()
        if self._terminal is not None and now - self._drawn_at >= (TERMINAL_INTERVAL_S if self._interactive() else LOG_INTERVAL_S):
            self._draw()

    def finish(self) -> None:
        """The final figures everywhere (100% when every partition was done)."""
        self._publish()
        if self._terminal is not None:
            self._draw()
            self._terminal.write("\n")
            self._terminal.flush()

    def _publish(self) -> None:
        from prefect.artifacts import create_table_artifact, update_progress_artifact

        update_progress_artifact(self._artifact_id, self.progress.percent, description=self._description())
        create_table_artifact(self.progress.table(), key=PROGRESS_TABLE_KEY, description="throughput of the run so far")
        self._published_at = time.monotonic()

    def _interactive(self) -> bool:
        return bool(getattr(self._terminal, "isatty", lambda: False)())

    def _draw(self) -> None:
        assert self._terminal is not None
        interactive = self._interactive()
        # On a terminal the line is rewritten in place; in a log file each drawing is its own line.
        self._terminal.write(("\r\033[K" if interactive else "") + self.progress.line() + ("" if interactive else "\n"))
        self._terminal.flush()
        self._drawn_at = time.monotonic()
