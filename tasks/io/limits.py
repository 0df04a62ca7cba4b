"""The reader's memory budget: how much one sample and one batch may hold, and how a sample is counted against it.

`ReadLimits.sample_bytes` bounds a sample's raw members, each counted with its 512-byte tar header
(tasks/io/grouping.py skips the members past it unread). `ReadLimits.batch_bytes` bounds a batch's raw
members plus what decoding them makes, predicted before any pixel is decoded by `held_bytes` (the RGB image
from the header, the parsed caption and metadata) and `transform_output_bytes` (what the transform leaves: for the
embedding stage the uint8 crop of tasks/models/bounded_transform.py's `PixelTransform`, 150 KB at 224 px).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from tasks.errors import UserError
from tasks.io.samples import Sample, member_format

# A sample's raw members (with their tar headers) beyond this are not read; the sample is an error.
DEFAULT_SAMPLE_BYTES = 256 << 20
# Raw plus decoded bytes of one batch: far above ordinary batches (100 photos hold ~50 MB), so only huge
# samples make batches smaller than task_batch_size.
DEFAULT_BATCH_BYTES = 512 << 20
TAR_HEADER_BYTES = 512
# Most bytes of Python objects one byte of JSON can parse into (`{},` is 3 bytes, an empty dict and its slot 72).
_JSON_OBJECT_BYTES_PER_BYTE = 24


def _whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ReadLimits:
    """Memory one sample and one batch may hold while reading (see the module docstring of tasks/io/read.py)."""

    sample_bytes: int = DEFAULT_SAMPLE_BYTES  # raw members of one sample, each counted with its tar header
    batch_bytes: int = DEFAULT_BATCH_BYTES  # raw plus predicted decoded bytes of one batch

    def __post_init__(self) -> None:
        for name in ("sample_bytes", "batch_bytes"):
            value = getattr(self, name)
            if not _whole_number(value) or value < TAR_HEADER_BYTES:
                raise UserError(f"{name} must be a whole number of bytes of at least {TAR_HEADER_BYTES}, not {value!r}.")


def held_bytes(sample: Sample, opened: Image.Image | None) -> int:
    """Upper bound of the bytes a sample holds: raw members, plus (when it is decoded) the RGB image and parsed text.

    The model's transform adds nothing per sample here: whatever the aspect ratio, its resize makes at most
    100 x the crop's pixels, or only the crop from the source region it depends on (tasks/models/bounded_transform.py),
    and that lives only while one worker transforms the sample; the caller counts the model input it leaves.
    """
    held = 0
    for extension, data in sample.members.items():
        held += len(data)
        if opened is not None:
            kind = member_format(extension)
            held += _JSON_OBJECT_BYTES_PER_BYTE * len(data) if kind == "json" else 4 * len(data) if kind == "txt" else 0
    if opened is not None:
        width, height = opened.size
        held += width * height * 3
    return held


def transform_output_bytes(transform: Callable[[Image.Image], object]) -> int:
    """Bytes one transformed sample holds, measured once on a tiny image (a model's transform has a fixed output size)."""
    try:
        output = transform(Image.new("RGB", (8, 8)))
        return int(output.numel() * output.element_size())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not a tensor-making transform: nothing beyond the image to count
        return 0
