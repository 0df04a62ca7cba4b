"""What the CPU does for `decode_mode="gpu"`: check each image's header and decide which JPEGs the device decodes.

The device decodes JPEG bytes in batches (tasks/models/device_decode.py); the host keeps what only it should do.
`for_device` reads a sample's header exactly as the CPU path does (tasks/io/decode.py `open_sample_image`: the JPEG
scan and segment counts, `max_pixels`, sides of at least one pixel), so a bomb or an odd side never reaches the
device and is refused with the CPU path's own sentence. It then parses the caption and metadata (a refused JSON
member makes the same error row as on the CPU path) and answers one of three things:

- a `DeviceJpeg`: its bytes without APP1 segments, its stored size and Pillow's EXIF orientation, for the device
  (which then decodes the pixels as stored and turns them as Pillow would);
- a fallback reason (a `FALLBACK_*` sentence): the sample is decoded by today's exact CPU path instead, and the
  reason is counted: not a JPEG (PNG, WebP, GIF, ...), CMYK or YCCK (Adobe's inverted inks, which the CPU path
  converts as Pillow does), a multi-picture file (MPO), a JPEG whose marker walk ends before its EOI (truncated:
  libjpeg refuses it, while a device decoder may fill the missing rows), or an image whose resize would make over
  100 crops of pixels (the CPU's bounded transform computes only the crop);
- None: the sample is refused (its `error` set) or holds nothing to decode.

MD5 and SHA-1 of the bytes are computed here (tasks/io/decode.py `hash_sample`); PDQ needs pixels and is made on
the device from the pixels it decodes (tasks/hashes/device_pdq.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tasks.io.decode import DecodeOptions, decode_text_members, open_sample_image
from tasks.io.samples import Sample, image_extension

FALLBACK_NOT_JPEG = "not a JPEG"
FALLBACK_INKS = "a CMYK or YCCK JPEG"
FALLBACK_MULTI_PICTURE = "a multi-picture JPEG"
FALLBACK_ELONGATED = "an aspect ratio whose resize the CPU bounds"
FALLBACK_EXIF = "an EXIF block the header check cannot read"
FALLBACK_UNENDED = "a JPEG whose markers end before its end-of-image marker"
FALLBACK_DEVICE_REFUSED = "refused by the device decoder"
FALLBACK_REASONS = (FALLBACK_NOT_JPEG, FALLBACK_INKS, FALLBACK_MULTI_PICTURE, FALLBACK_ELONGATED, FALLBACK_EXIF, FALLBACK_UNENDED,
                    FALLBACK_DEVICE_REFUSED)
_EXIF_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # orientations that swap width and height


@dataclass(frozen=True)
class DeviceJpeg:
    """A JPEG for the device decoder: its bytes without APP1 (`without_app1`), its size as stored, and the EXIF
    orientation (1-8) Pillow reads, which the device applies after decoding."""

    data: bytes
    height: int  # as stored, before the orientation
    width: int
    orientation: int

    @property
    def decoded_bytes(self) -> int:
        return 3 * self.height * self.width


def for_device(sample: Sample, options: DecodeOptions, fits: Callable[[int, int], bool]) -> DeviceJpeg | str | None:
    """The sample's JPEG for the device, the reason it goes to the CPU path instead, or None (refused or nothing to decode).

    `fits(height, width)` says whether the device's transform takes an image of that upright size
    (tasks/models/device_transform.py `DeviceTransform.fits`)."""
    opened = open_sample_image(sample, options)
    if opened is None:
        return None
    if opened.format == "MPO":
        return FALLBACK_MULTI_PICTURE
    if opened.format != "JPEG":
        return FALLBACK_NOT_JPEG
    if opened.mode not in ("RGB", "L"):
        return FALLBACK_INKS
    if not sample.jpeg_ended:  # truncated: libjpeg refuses it, a device decoder may return grey rows instead
        return FALLBACK_UNENDED
    try:
        orientation = int(opened.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - an EXIF block Pillow cannot read: the CPU path decides what it means
        return FALLBACK_EXIF
    orientation = orientation if 1 <= orientation <= 8 else 1  # Pillow's exif_transpose ignores other values
    width, height = opened.size
    if orientation in _TURNED:
        width, height = height, width
    if not fits(height, width):
        return FALLBACK_ELONGATED
    if not decode_text_members(sample):
        return None
    stripped = without_app1(sample.members[image_extension(sample.members)])
    if stripped is None:
        return FALLBACK_EXIF
    return DeviceJpeg(stripped, *opened.size[::-1], orientation)


def without_app1(data: bytes) -> bytes | None:
    """The JPEG without its APP1 segments (EXIF, XMP), or None when its segments before the first scan cannot be walked.

    The device's decoder applies an EXIF orientation of its own reading (the first APP1 only, no XMP), which can
    differ from Pillow's; without APP1 it decodes the pixels as stored, and `orient` turns them as Pillow says.
    APP1 holds no pixel data, so nothing else changes; the bytes a sample is hashed by are the member's own.
    """
    kept: list[bytes] = [data[:2]]
    position, copied_from = 2, 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xDA:  # the first scan: the rest is entropy-coded data and later segments, kept as they are
            break
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2 or position + 2 + length > len(data):
            return None
        if marker == 0xE1:
            kept.append(data[copied_from:position])
            copied_from = position + 2 + length
        position += 2 + length
    else:
        return None
    if copied_from == 2:
        return data  # no APP1: no copy
    kept.append(data[copied_from:])
    return b"".join(kept)
