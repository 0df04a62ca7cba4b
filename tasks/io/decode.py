"""Decode a sample: its image checked from the header, then its pixels as RGB, its caption and metadata.

Decoding is two steps so the cheap one can run where the batch is assembled: `open_sample_image` reads only
the header and refuses what is over the limits (`DecodeOptions.max_pixels`, the JPEG scan count of
tasks/io/jpeg_scans.py) before any pixel is decoded; `finish_decoding` decodes the pixels (RGB, EXIF orientation
applied, see `to_rgb`), the caption and the bounded JSON metadata (tasks/io/metadata.py). `decode_and_transform`
is a worker's whole job: the second step, the sample's hashes (`hash_sample`: MD5 and SHA-1 of its image member's
bytes, PDQ of the pixels just decoded, so no image is ever decoded twice for them) and the transform (for the
embedding stage the uint8 crop of tasks/models/bounded_transform.py `pixel_step`), the image then dropped. Every
refusal is that sample's one-sentence `error`; nothing here raises for a sample's content.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.errors import UserError
from tasks.hashes.image_hashes import bytes_hashes, pdq_of_image
from tasks.io.jpeg_scans import JPEG_SIGNATURE, walk_jpeg_markers
from tasks.io.metadata import parse_metadata
from tasks.io.samples import ImageHashes, Sample, fail, hashed_image_extension, image_extension, member_of_format

# Pillow formats allowed to open an image member (JPEG includes MPO); content decides, so a PNG named .jpg decodes.
_PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
_JPEG_FORMATS = ("JPEG", "MPO")

# Pillow's own default decompression-bomb threshold (about 89.5 megapixels, e.g. 9459 x 9459).
DEFAULT_MAX_PIXELS = 89_478_485
# How a run decodes images (the flows' `decode_mode`), each name one `DecodeOptions.for_model` setting:
# - exact: every pixel decoded, so embeddings are open_clip's own `encode_image(preprocess(image))` (default);
# - reduced: JPEGs of at least twice the model's input size decode at 1/2, 1/4 or 1/8 scale by libjpeg's DCT
#   scaling, keeping both sides >= REDUCED_JPEG_SIZE (never below the model's input size): decode +
#   transform several times faster, embeddings within a small cosine distance (README, "Decoding").
# - gpu: baseline and progressive RGB/grayscale JPEGs decoded in batches on the model's device and resized there
#   (tasks/models/device_feed.py); every other image, and any the device refuses, decoded as exact does.
DECODE_MODES = ("exact", "reduced", "gpu")
DEFAULT_DECODE_MODE = "exact"
# From benchmarks/bench_read.py on 1024-2048 px JPEGs: decode 2x and decode + open_clip transform 3-4x
# faster, pixels after the 224 px transform within 1/255 on average; >= 256 also suits 240/256 px models.
REDUCED_JPEG_SIZE = 256
# Seconds one image may take to be checked, decoded and transformed in a worker process: on one core an
# 89-megapixel progressive photo decodes in 1.6 s, and a scan bomb that large at the scan limit in 25 s.
DEFAULT_DECODE_DEADLINE_S = 60.0


@dataclass(frozen=True)
class DecodeOptions:
    """How images are decoded; `identity()` names every setting that changes the decoded pixels."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit (width x height before any reduction)
    reduced_jpeg_size: int | None = None  # JPEGs decode at 1/2, 1/4 or 1/8 scale keeping both sides >= this; None = every pixel
    decode_deadline_s: float = DEFAULT_DECODE_DEADLINE_S  # per image in a worker process (tasks/io/decode_workers.py)
    on_device: bool = False  # JPEGs decoded and resized on the model's device (decode_mode="gpu"); others as exact

    def __post_init__(self) -> None:
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise UserError(f"max_pixels must be a positive whole number of pixels, not {self.max_pixels!r}.")
        size = self.reduced_jpeg_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UserError(f"reduced_jpeg_size must be a positive number of pixels or None, not {size!r}.")
        if self.on_device and size is not None:
            raise UserError("decode_mode 'gpu' decodes every pixel, so it takes no reduced_jpeg_size.")
        deadline = self.decode_deadline_s
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline < float("inf"):
            raise UserError(f"decode_deadline_s must be a positive, finite number of seconds, not {deadline!r}.")

    @classmethod
    def for_model(cls, image_size: Sequence[int], decode_mode: str = DEFAULT_DECODE_MODE) -> "DecodeOptions":
        """The setting of a `DECODE_MODES` name for a model's input size (reduced decoding never below it: no upscaling at 336 px)."""
        if decode_mode == "exact":
            return cls(reduced_jpeg_size=None)
        if decode_mode == "reduced":
            return cls(reduced_jpeg_size=max(REDUCED_JPEG_SIZE, *image_size))
        if decode_mode == "gpu":
            return cls(reduced_jpeg_size=None, on_device=True)
        raise UserError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, not {decode_mode!r}.")

    def identity(self) -> str:
        # The size, scan and time limits only decide which images are refused, never their pixels, so they are not part of it.
        reduced = "off" if self.reduced_jpeg_size is None else str(self.reduced_jpeg_size)
        identity = f"decode-v2:rgb,exif-orientation,alpha-over-white,first-frame,16bit-msb,jpeg-reduced-min-side={reduced}"
        # JPEGs resized by torch's antialiased filter in float (within 0.5/255 of Pillow's 8-bit passes on average)
        return identity + ",jpeg-on-device=torch-antialias-v1" if self.on_device else identity

    @property
    def mode(self) -> str:
        """The `DECODE_MODES` name this setting is."""
        return "gpu" if self.on_device else "exact" if self.reduced_jpeg_size is None else "reduced"


def decode_mode_of(identity: str) -> str:
    """The `DECODE_MODES` name of a stored decode identity (an entry's `decode` record)."""
    if "jpeg-on-device=" in identity:
        return "gpu"
    return "exact" if "jpeg-reduced-min-side=off" in identity else "reduced"


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB: 16-bit values by their most significant bits, transparency over white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # Pillow clips 16-bit values at 255 when converting; keep the 8 most significant bits instead
        # (in the image's own integer type: widening to int64 would hold 4 copies of an 89 MP image).
        pixels = np.asarray(image)
        if image.mode == "I":
            pixels = np.clip(pixels, 0, 65535)
        return Image.fromarray((pixels >> 8).astype(np.uint8), "L").convert("RGB")
    if image.has_transparency_data:
        # Transparent pixels become white, as img2dataset did for the images LAION's detector was built on.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    return image.convert("RGB")


def _sniffed_format(data: bytes) -> str | None:
    """Pillow's name for an image format we do not decode (header only), or None when unknown."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:  # noqa: BLE001 - anything unidentifiable is "corrupt or not an image"
        return None


def _corrupt_reason(exc: Exception, name: str) -> str:
    if isinstance(exc, OSError):
        if "truncated" in str(exc) or "broken data stream" in str(exc):
            return f"image {name!r} is truncated"
        return f"image {name!r} is corrupt ({exc})"
    return f"image {name!r} is corrupt ({type(exc).__name__}: {exc})"


def _open_image(data: bytes, name: str, options: DecodeOptions) -> Image.Image | str:
    """The image with only its header read, checked against the size limits (JPEG draft scale set), or why it is refused."""
    try:
        image = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow refuses outright above twice its own limit, before our max_pixels is consulted.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "too many pixels"
        return f"image {name!r} has {size}, over Pillow's hard limit (possible decompression bomb)"
    except UnidentifiedImageError:
        sniffed = _sniffed_format(data)
        if sniffed:
            return f"image {name!r} is in the unsupported format {sniffed}"
        return f"image {name!r} is corrupt or not an image"
    except Exception as exc:  # noqa: BLE001 - malformed headers raise many exception types in Pillow
        return _corrupt_reason(exc, name)
    try:
        width, height = image.size
        if width * height > options.max_pixels:
            return f"image {name!r} is {width}x{height} pixels, over the limit of {options.max_pixels} (possible decompression bomb)"
        if min(width, height) < 1:
            return f"image {name!r} is {width}x{height} pixels, so it has no pixels to score"
        reduced = options.reduced_jpeg_size
        if reduced is not None and image.format in _JPEG_FORMATS and min(width, height) >= 2 * reduced:
            image.draft(None, (reduced, reduced))  # libjpeg DCT scaling: both sides stay >= reduced
        return image
    except Exception as exc:  # noqa: BLE001 - see above
        return _corrupt_reason(exc, name)


def _stored_pixels_pdq(image: Image.Image) -> tuple[bytes, int] | None:
    """PDQ of the pixels as the file stores them: before EXIF orientation and with transparency dropped, not
    flattened (Pillow's RGB conversion), which is how ThreatExchange's hashers read a file, so the hash a list
    holds for an image is the one found here (a rotated or see-through copy would otherwise hash far from it)."""
    try:
        return pdq_of_image(image)
    except Exception:  # noqa: BLE001 - a hash that cannot be made costs the sample its PDQ, never its row
        return None


def _load_image(image: Image.Image, name: str) -> tuple[Image.Image, tuple[bytes, int] | None] | str:
    """The opened image's pixels as RGB, EXIF orientation applied, and the PDQ of its pixels as stored; or why
    they cannot be decoded."""
    try:
        image.load()
        stored_pdq = _stored_pixels_pdq(image)
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image), stored_pdq
    except Exception as exc:  # noqa: BLE001 - see _open_image
        return _corrupt_reason(exc, name)


def open_sample_image(sample: Sample, options: DecodeOptions) -> Image.Image | None:
    """First step of decoding (header only, cheap): the sample's image checked against the limits, or None with the error recorded."""
    if sample.error is not None or sample.key is None:
        return None
    image_ext = image_extension(sample.members)
    assert image_ext is not None, "samples without an image member carry an error"
    data, name = sample.members[image_ext], sample.member_name(image_ext)
    # Before Pillow reads the header: its own marker walk is slower, and it keeps every APPn and COM segment.
    too_many, sample.jpeg_ended = walk_jpeg_markers(data, name) if data[:3] == JPEG_SIGNATURE else (None, None)
    if too_many is not None:
        fail(sample, too_many)
        return None
    opened = _open_image(data, name, options)
    if isinstance(opened, str):
        fail(sample, opened)
        return None
    return opened


def decode_text_members(sample: Sample) -> bool:
    """The sample's caption and bounded JSON metadata parsed (tasks/io/metadata.py); False with the error recorded when the
    metadata is refused."""
    caption_ext = member_of_format(sample.members, "txt")
    if caption_ext is not None:
        sample.caption = sample.members[caption_ext].decode("utf-8", errors="replace")
    metadata_ext = member_of_format(sample.members, "json")
    if metadata_ext is not None:
        metadata = parse_metadata(sample.members[metadata_ext], sample.member_name(metadata_ext))
        if isinstance(metadata, str):
            fail(sample, metadata)
            return False
        sample.metadata = metadata
    return True


def finish_decoding(sample: Sample, opened: Image.Image | None) -> Sample:
    """Second step: caption, metadata and pixels of a sample whose image passed `open_sample_image`."""
    if sample.error is not None or opened is None or not decode_text_members(sample):
        return sample
    image_ext = image_extension(sample.members)
    decoded = _load_image(opened, sample.member_name(image_ext))
    if isinstance(decoded, str):
        fail(sample, decoded)
    else:
        sample.image, sample.stored_pdq = decoded
    return sample


def hash_sample(sample: Sample) -> Sample:
    """Set the sample's `image_hashes`: MD5 and SHA-1 of its image member's bytes (`hashed_image_extension`) and,
    when its pixels are decoded (`sample.image`), their PDQ; None without a non-empty image member or for a
    shard-level record. Call it before a transform drops the image."""
    extension = hashed_image_extension(sample.members) if sample.key is not None else None
    if extension is None:
        sample.image_hashes = None
        return sample
    md5, sha1 = bytes_hashes(sample.members[extension])
    stored = sample.stored_pdq if sample.image is not None else None
    pdq, quality = stored if stored is not None else (None, None)
    sample.image_hashes = ImageHashes(md5, sha1, pdq, quality)
    return sample


def decode_and_transform(sample: Sample, opened: Image.Image | None, transform: Callable[[Image.Image], object] | None) -> Sample:
    """One worker's whole job for a sample: its pixels decoded (when `opened` passed the header checks), hashed
    (`hash_sample`, also when they could not be decoded), then turned into `transform`'s output (`model_input`:
    the embedding stage's uint8 crop, or the model's input itself) and dropped; with `transform=None` the image is kept."""
    finish_decoding(sample, opened)
    hash_sample(sample)
    if sample.image is not None and transform is not None:
        image_ext = image_extension(sample.members)
        try:
            sample.model_input = transform(sample.image)
        except Exception as exc:  # noqa: BLE001 - an image the model's transform refuses is that sample's error only
            fail(sample, f"image {sample.member_name(image_ext)!r} could not be preprocessed for the model ({type(exc).__name__}: {exc})")
        sample.image = None
    return sample
