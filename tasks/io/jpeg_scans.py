"""Refuse a JPEG "scan bomb" before decoding: count its scans and marker segments by walking its markers.

Each scan re-walks the whole image's coefficients, so thousands of tiny scans would decode for hours; a JPEG
holds at most `MAX_JPEG_SCANS` scans and `MAX_JPEG_SEGMENTS` marker segments, counted without decoding.
"""

from __future__ import annotations

import numpy as np

# Encoders write about 10 scans (libjpeg's progressive script), and no real one comes near a few hundred;
# every scan re-walks the image's coefficients, so the decode time grows with the count (djpeg's -maxscans).
MAX_JPEG_SCANS = 256
# Marker segments walked to count the scans: a real JPEG has tens (APPn, tables per scan); this bounds the walk.
MAX_JPEG_SEGMENTS = 65_536

# The 0xFF that starts a marker after entropy-coded data (or garbage) is followed by none of these: a stuffed 0xFF00,
# a fill byte 0xFFFF, or a restart marker (RSTn, part of a scan's data).
_NOT_A_MARKER = np.zeros(256, dtype=bool)
_NOT_A_MARKER[[0x00, 0xFF, *range(0xD0, 0xD8)]] = True
_WINDOW = 1 << 20  # bytes searched for markers at once
# Markers without a length field: TEM and RST0-7 (SOI and EOI are handled apart).
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
# What Pillow opens as a JPEG (or MPO), whatever the member's name: SOI and the start of a marker.
JPEG_SIGNATURE = b"\xff\xd8\xff"


def jpeg_scans_reason(data: bytes, name: str) -> str | None:
    """Why a JPEG's first image (up to its EOI) holds too many scans or marker segments to decode, or None."""
    return walk_jpeg_markers(data, name)[0]


def walk_jpeg_markers(data: bytes, name: str) -> tuple[str | None, bool]:
    """(why the JPEG's first image holds too many scans or marker segments to decode, or None; whether the walk
    reached its EOI marker: False for a truncated file).

    Walks the marker segments by their lengths, and each scan's entropy-coded data to the next marker, as
    libjpeg reads them, without decoding; the walk stops at the first limit passed, so it is linear in the
    file and at most MAX_JPEG_SEGMENTS steps.
    """
    scans = segments = 0
    position = 2  # after SOI
    markers = _MarkersInData(data)
    while position + 1 < len(data):
        if data[position] != 0xFF or data[position + 1] in (0x00, 0xFF):
            found = markers.next_at_or_after(position)  # fill bytes, or garbage libjpeg skips with a warning
            if found is None:
                return None, False
            position = found
        marker = data[position + 1]
        if marker in (0xD8, 0xD9):  # EOI (an MPO's further images are never decoded), or a second SOI libjpeg refuses
            return None, marker == 0xD9
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return f"image {name!r} has over {MAX_JPEG_SEGMENTS} JPEG marker segments, the limit for reading it", False
        if marker in _JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2:
            return None, False  # malformed: libjpeg refuses it when decoding
        position += 2 + length
        if marker == 0xDA:  # SOS: a scan header, followed by its entropy-coded data up to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                return f"image {name!r} has over {MAX_JPEG_SCANS} JPEG scans (possible scan bomb: each scan decodes the whole image again)", False
            found = markers.next_at_or_after(position)
            if found is None:
                return None, False
            position = found
    return None, False


class _MarkersInData:
    """Where markers can start in a JPEG's bytes at or after a position: each 0xFF followed by a byte that is not
    `_NOT_A_MARKER`, found by a vectorised pass over one window of `_WINDOW` bytes at a time (a photo's entropy-coded
    data is hundreds of KB, where a regex search costs 1.5x more; the window bounds the pass's memory)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.start = self.end = 0  # the window [start, end) whose marker positions are `positions`
        self.positions = np.zeros(0, dtype=np.int64)

    def next_at_or_after(self, position: int) -> int | None:
        last = len(self.data) - 1  # a marker needs the byte after its 0xFF
        while position < last:
            if not self.start <= position < self.end:
                self.start, self.end = position, min(last, position + _WINDOW)
                values = np.frombuffer(self.data, dtype=np.uint8, count=self.end - self.start + 1, offset=self.start)
                candidates = np.flatnonzero(values[:-1] == 0xFF)
                self.positions = self.start + candidates[~_NOT_A_MARKER[values[candidates + 1]]]
            index = int(np.searchsorted(self.positions, position))
            if index < len(self.positions):
                return int(self.positions[index])
            position = self.end
        return None
