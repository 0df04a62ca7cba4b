"""Variants of LAION's Keras NSFW zip for converter tests: the real zip with one member edited or dropped."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

DATA_MEMBER = "variables/variables.data-00000-of-00001"
INDEX_MEMBER = "variables/variables.index"


def rewrite_zip(source: Path, target: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy `source` to `target`, passing each member through `edit(name, data)`; None drops the member.

    The zip's own CRC is recomputed, so only the SavedModel's checksums can catch an edit.
    """
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = edit(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
    return target


def edit_member(suffix: str, change: Callable[[bytes], bytes]) -> Callable[[str, bytes], bytes | None]:
    """An `edit` that applies `change` to the member whose name ends with `suffix`."""
    return lambda name, data: change(data) if name.endswith(suffix) else data


def flip_byte(position: int) -> Callable[[bytes], bytes]:
    """A change that inverts one byte (negative positions count from the end)."""

    def change(data: bytes) -> bytes:
        edited = bytearray(data)
        edited[position] ^= 0xFF
        return bytes(edited)

    return change
