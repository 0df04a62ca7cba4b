"""Stream WebDataset shards into samples: key, raw members, decoded RGB image, caption, metadata, error.

Shards are read through fsspec as a tar *stream* (one member in memory at a time) and grouped by the
WebDataset key rule: the key is the member path up to the first dot of the file name
(`dir/a.seg.png` -> key `dir/a`, extension `seg.png`); a new sample starts whenever the key changes. A
member's format is the last component of its extension, and `image_extension` picks the image of a sample.
Every key in the input comes out as exactly one `Sample` per contiguous run of members; a sample that
cannot be scored carries a one-sentence `error` (and its raw members where they were read), and a
damaged tar ends with one shard-level record (`key=None`) for the part that could not be read.

Resource budget: no sample can cost its neighbours their rows. Each limit below, when exceeded, makes
only that sample an error (one sentence) and reading goes on with the next sample:
- a sample's members hold at most `ReadLimits.sample_bytes` (each member counted with its 512-byte tar
  header); members past the limit are skipped unread, so a zip bomb costs time, never memory;
- an image is checked from its header before any pixel is decoded: at most `DecodeOptions.max_pixels`
  pixels; any aspect ratio is scored (the model's transform resizes only what its centre crop keeps,
  tasks/models/bounded_transform.py, so a 1x100000 banner never becomes 224 x 22,400,000 pixels);
- a JPEG holds at most `MAX_JPEG_SCANS` scans and `MAX_JPEG_SEGMENTS` marker segments, counted by walking its
  markers before any pixel is decoded (each scan re-walks the whole image, so a "scan bomb" of thousands of
  tiny scans would decode for hours);
- in a worker process (tasks/io/decode_workers.py), checking, decoding and transforming one image takes at
  most `DecodeOptions.decode_deadline_s`: past it the worker is killed and replaced. Decoding in threads has
  no deadline (a thread cannot be killed); the header limits above bound it there;
- a `.json` member is parsed only up to `MAX_JSON_BYTES`, `MAX_JSON_DEPTH` levels of nesting and numbers of
  `MAX_JSON_NUMBER_CHARS` characters.
A batch closes early, before `task_batch_size`, when its samples' raw bytes plus what decoding them makes
(the RGB image predicted from the header, the parsed caption and metadata) would exceed
`ReadLimits.batch_bytes`, so memory in flight is bounded whatever the samples hold.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.errors import UserError
from tasks.io import decode_workers
from tasks.io.locations import Location, LocationLike, as_location, redacted
from tasks.io.prefetch import prefetched

# Image formats by preference. As in webdataset's decoders, a member's format is the last component of its
# extension, case-insensitive (`a.JPG`, `dir/with.dots.in.name.jpg`: key `dir/with`, extension
# `dots.in.name.jpg`). The image of a sample with several is picked by `image_extension`.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tiff", "tif", "gif")
# Image extensions we recognise but do not decode: the sample gets "unsupported format", not "no image".
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    "heic heif avif jxl jp2 j2k jpx ppm pgm pbm pnm ico icns svg psd tga dds eps exr hdr pcx raw cr2 nef dng arw".split()
)
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
DECODE_MODES = ("exact", "reduced")
DEFAULT_DECODE_MODE = "exact"
# From benchmarks/bench_read.py on 1024-2048 px JPEGs: decode 2x and decode + open_clip transform 3-4x
# faster, pixels after the 224 px transform within 1/255 on average; >= 256 also suits 240/256 px models.
REDUCED_JPEG_SIZE = 256
# A sample's raw members (with their tar headers) beyond this are not read; the sample is an error.
DEFAULT_SAMPLE_BYTES = 256 << 20
# Raw plus decoded bytes of one batch: far above ordinary batches (100 photos hold ~50 MB), so only huge
# samples make batches smaller than task_batch_size.
DEFAULT_BATCH_BYTES = 512 << 20
# Encoders write about 10 scans (libjpeg's progressive script), and no real one comes near a few hundred;
# every scan re-walks the image's coefficients, so the decode time grows with the count (djpeg's -maxscans).
MAX_JPEG_SCANS = 256
# Marker segments walked to count the scans: a real JPEG has tens (APPn, tables per scan); this bounds the walk.
MAX_JPEG_SEGMENTS = 65_536
# Seconds one image may take to be checked, decoded and transformed in a worker process: on one core an
# 89-megapixel progressive photo decodes in 1.6 s, and a scan bomb that large at the scan limit in 25 s.
DEFAULT_DECODE_DEADLINE_S = 60.0
# JSON metadata limits: SA-1B's mask annotations (a few MB per image) fit; Rust's serde_json stops at 128
# levels; a 64-bit integer has 20 digits and a float's repr at most 24 characters.
MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 128
MAX_JSON_NUMBER_CHARS = 100
# Most bytes of Python objects one byte of JSON can parse into (`{},` is 3 bytes, an empty dict and its slot 72).
_JSON_OBJECT_BYTES_PER_BYTE = 24
_TAR_HEADER_BYTES = 512
# Skipped member data is read in pieces this large: tarfile's own skipping copies its decompressed buffer
# for every 10 KB, which is quadratic on highly compressed data.
_DRAIN_CHUNK_BYTES = 8 << 20
# s3/gcs/http read-ahead per open shard: large enough for throughput, small enough to keep memory flat.
_REMOTE_BLOCK_BYTES = 8 << 20

# WebDataset's key rule (webdataset.tariterators.base_plus_ext) and its metadata-member rules.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
# Damage in the tar or its compression, as opposed to I/O errors, which propagate so the task is retried.
_TAR_DAMAGE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)
_MAX_REASON_CHARS = 160


@dataclass
class Sample:
    """One WebDataset sample, or (key=None) the unreadable rest of a damaged shard."""

    key: str | None  # WebDataset __key__; None only for a shard-level error record
    shard: str  # source shard URL
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> raw bytes, in tar order
    image: Image.Image | None = None  # decoded RGB, EXIF orientation applied
    model_input: object | None = None  # `transform(image)` when the reader was given a transform (the image is then dropped)
    caption: str | None = None
    metadata: dict | None = None
    error: str | None = None  # why this sample cannot be scored (one short sentence); None when fine

    def member_name(self, extension: str) -> str:
        """The member's name in the tar, as the writer re-creates it."""
        return f"{self.key}.{extension}"


def _whole_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ReadLimits:
    """Memory one sample and one batch may hold while reading (see the module docstring)."""

    sample_bytes: int = DEFAULT_SAMPLE_BYTES  # raw members of one sample, each counted with its tar header
    batch_bytes: int = DEFAULT_BATCH_BYTES  # raw plus predicted decoded bytes of one batch

    def __post_init__(self) -> None:
        for name in ("sample_bytes", "batch_bytes"):
            value = getattr(self, name)
            if not _whole_number(value) or value < _TAR_HEADER_BYTES:
                raise UserError(f"{name} must be a whole number of bytes of at least {_TAR_HEADER_BYTES}, not {value!r}.")


@dataclass(frozen=True)
class DecodeOptions:
    """How images are decoded; `identity()` names every setting that changes the decoded pixels."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit (width x height before any reduction)
    reduced_jpeg_size: int | None = None  # JPEGs decode at 1/2, 1/4 or 1/8 scale keeping both sides >= this; None = every pixel
    decode_deadline_s: float = DEFAULT_DECODE_DEADLINE_S  # per image in a worker process (see the module docstring)

    def __post_init__(self) -> None:
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise UserError(f"max_pixels must be a positive whole number of pixels, not {self.max_pixels!r}.")
        size = self.reduced_jpeg_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UserError(f"reduced_jpeg_size must be a positive number of pixels or None, not {size!r}.")
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
        raise UserError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, not {decode_mode!r}.")

    def identity(self) -> str:
        # The size, scan and time limits only decide which images are refused, never their pixels, so they are not part of it.
        reduced = "off" if self.reduced_jpeg_size is None else str(self.reduced_jpeg_size)
        return f"decode-v2:rgb,exif-orientation,alpha-over-white,first-frame,16bit-msb,jpeg-reduced-min-side={reduced}"


def member_format(extension: str) -> str:
    """A member's format: the last component of its extension, lower-cased (`seg.PNG` -> `png`)."""
    return extension.rsplit(".", 1)[-1].lower()


def image_extension(members: dict[str, bytes]) -> str | None:
    """The extension of the member holding the sample's image, or None.

    1. A member whose whole extension is an image format (`jpg`, `PNG`), the first of IMAGE_EXTENSIONS present,
       as webdataset's `to_tuple("jpg;png;...")` picks it;
    2. otherwise the first member, in tar order, whose last extension component is one (`seg.png`, `dots.in.name.jpg`).
    """
    whole = {}
    for extension in members:
        whole.setdefault(extension.lower(), extension)
    for image_format in IMAGE_EXTENSIONS:
        if image_format in whole:
            return whole[image_format]
    return next((extension for extension in members if member_format(extension) in IMAGE_EXTENSIONS), None)


def image_members(members: dict[str, bytes]) -> list[str]:
    """Extensions of every member holding an image, decodable or not, in tar order."""
    return [extension for extension in members if member_format(extension) in IMAGE_EXTENSIONS or member_format(extension) in UNSUPPORTED_IMAGE_EXTENSIONS]


def member_of_format(members: dict[str, bytes], wanted: str) -> str | None:
    """The extension of a sample's `txt` or `json` member: the one named exactly so, else the first of that format in tar order."""
    exact = next((extension for extension in members if extension.lower() == wanted), None)
    return exact or next((extension for extension in members if member_format(extension) == wanted), None)


def _printable(name: str) -> str:
    """The name as valid UTF-8 text: tarfile keeps undecodable bytes as surrogates, which Parquet cannot store."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _short(text: str) -> str:
    """One line of valid UTF-8 text, at most _MAX_REASON_CHARS long."""
    text = " ".join(_printable(str(text)).split())
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def _unsafe_name_reason(name: str) -> str | None:
    """Why a member name must never be used (absolute, `..`, NUL, not UTF-8), or None when it is safe."""
    if "\x00" in name:
        return "contains a NUL character"
    if _printable(name) != name:
        return "is not valid UTF-8"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "climbs out of its directory with '..'"
    return None


def _is_meta_member(name: str) -> bool:
    # WebDataset skips these (e.g. `__index__`); they are shard metadata, not samples.
    return bool(_META_MEMBER.match(name)) or ("/" not in name and name.startswith("__") and name.endswith("__"))


def _fail(sample: Sample, reason: str) -> None:
    """Record why a sample cannot be scored; the first reason wins."""
    if sample.error is None:
        sample.error = _short(reason)


def _check_structure(sample: Sample) -> None:
    """Errors visible without decoding: missing or unsupported image, empty members."""
    image_ext = image_extension(sample.members)
    if image_ext is None:
        unsupported = [ext for ext in sample.members if member_format(ext) in UNSUPPORTED_IMAGE_EXTENSIONS]
        if unsupported:
            _fail(sample, f"image member {sample.member_name(unsupported[0])!r} has an unsupported format (.{member_format(unsupported[0])})")
        else:
            _fail(sample, f"no image member (expected one of .{', .'.join(IMAGE_EXTENSIONS)})")
    for extension, data in sample.members.items():
        # An empty caption is a legitimate value; any other empty member means a failed write or copy.
        if not data and member_format(extension) != "txt":
            _fail(sample, f"member {sample.member_name(extension)!r} is empty (0 bytes)")


class _TarEnd:
    """How tarfile stopped reading headers; tarfile treats damage after the first member as a clean end."""

    def __init__(self) -> None:
        self.header_error: Exception | None = None

    def tarinfo_class(self) -> type[tarfile.TarInfo]:
        end = self

        class _RecordingTarInfo(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
                try:
                    return super().fromtarfile(tar)
                except tarfile.HeaderError as exc:
                    end.header_error = exc
                    raise

        return _RecordingTarInfo

    def damage(self) -> str | None:
        """Why the tar ended early, or None when it ended with a proper end-of-archive block."""
        error = self.header_error
        if error is None or isinstance(error, tarfile.EOFHeaderError):
            return None
        if isinstance(error, tarfile.EmptyHeaderError):
            return "the file ends without the tar end-of-archive marker, so it is probably truncated"
        if isinstance(error, tarfile.TruncatedHeaderError):
            return "the file ends inside a tar header, so it is truncated"
        return f"a tar header is corrupt ({_short(error)})"


def _open_shard(shard: Location):
    """An fsspec file for the shard; one-sentence UserError when it can never be opened (missing, denied, bad URL)."""
    shard_url = shard.url
    try:
        fs, path = url_to_fs(shard_url, **shard.storage_options)
        if isinstance(fs, LocalFileSystem):
            return fs.open(path, "rb")
        return fs.open(path, "rb", block_size=_REMOTE_BLOCK_BYTES, cache_type="readahead")
    except FileNotFoundError:
        raise UserError(f"Shard {redacted(shard_url)} does not exist; list the shards again or fix file_paths.") from None
    except PermissionError:
        raise UserError(f"Cannot read shard {redacted(shard_url)}: access denied; check the storage credentials in the environment.") from None
    except IsADirectoryError:
        raise UserError(f"Shard {redacted(shard_url)} is a directory, not a tar file; fix file_paths.") from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        raise UserError(f"Shard {redacted(shard_url)} uses an unknown protocol; use a local path, file://, s3:// or another fsspec URL.") from None
    except ImportError as exc:
        raise UserError(f"Shard {redacted(shard_url)} needs a filesystem package that is not installed ({exc}); install it and retry.") from None
    # Anything else (5xx, timeouts, dropped connections) may be transient: it propagates so the task retries.


def _iter_raw_samples(shard: Location, limits: ReadLimits = ReadLimits(), local_copy: str | None = None) -> Iterator[Sample]:
    """Samples with raw members and structural errors only (no decoding), streaming the tar.

    `local_copy` is a verified copy of the shard on this machine's disk (tasks/io/spool.py), read instead of
    storage; the samples are still the shard's (its URL names them and their errors).
    """
    with open(local_copy, "rb") if local_copy is not None else _open_shard(shard) as fileobj:
        yield from _samples_from_tar(fileobj, shard.url, limits)


def _drain(data) -> None:
    """Read a member's unread data in large pieces (see _DRAIN_CHUNK_BYTES), keeping none of it."""
    while data.read(_DRAIN_CHUNK_BYTES):
        pass


class _SampleGrouper:
    """WebDataset's grouping of tar members into samples, with the per-sample checks and byte budget."""

    def __init__(self, shard_url: str, limits: ReadLimits) -> None:
        self.shard_url = shard_url
        self.limits = limits
        self.current: Sample | None = None
        self.current_key: str | None = None  # the key as tarfile decoded it (Sample.key is its printable form)
        self.extensions: set[str] = set()  # lower-cased extensions of the current sample's members (O(1) duplicate check)
        self.held_bytes = 0  # the current sample's members and their headers
        self.over_budget = False
        self.seen_keys: set[str] = set()  # per shard only: detects a key whose members are not contiguous

    def finish(self) -> Iterator[Sample]:
        """The current sample, complete (structural checks done)."""
        if self.current is not None:
            _check_structure(self.current)
            yield self.current
        self.current = None

    def add(self, info: tarfile.TarInfo, data) -> Iterator[Sample]:
        """Place one member (`data`: its unread file object, None unless regular); yields completed samples."""
        member_name = info.name
        if info.isdir() or _is_meta_member(member_name):
            return
        match = _KEY_AND_EXTENSION.match(member_name)
        if match is None:
            # WebDataset ignores such a member; we report it under its own name so nothing goes unnoticed.
            yield from self.finish()
            name = _printable(member_name)
            yield Sample(key=name, shard=self.shard_url, error=_short(f"member {name!r} has no extension, so it belongs to no WebDataset sample"))
            return
        key, extension = match.group(1), match.group(2)
        if self.current is None or key != self.current_key:
            yield from self.finish()
            self.current, self.current_key = Sample(key=_printable(key), shard=self.shard_url), key
            self.extensions, self.held_bytes, self.over_budget = set(), 0, False
            if key in self.seen_keys:
                _fail(self.current, f"key {self.current.key!r} reappears after other keys; WebDataset reads its later members as a second sample")
            self.seen_keys.add(key)
        current = self.current
        unsafe = _unsafe_name_reason(member_name)
        if unsafe:
            _fail(current, f"member name {_printable(member_name)!r} {unsafe}, so the sample is never written")
        if extension.lower() in self.extensions:
            _fail(current, f"member {member_name!r} appears twice in the sample")
            return
        if data is None:
            kind = "a symbolic link" if info.issym() else "a hard link" if info.islnk() else "not a regular file"
            _fail(current, f"member {member_name!r} is {kind}")
            return
        self.held_bytes += info.size + _TAR_HEADER_BYTES
        if self.over_budget or self.held_bytes > self.limits.sample_bytes:
            if not self.over_budget:
                _fail(current, f"the sample's members pass the {self.limits.sample_bytes}-byte read limit at member {member_name!r}")
            self.over_budget = True  # this member and the rest of the sample are skipped unread
            return
        current.members[extension] = data.read()
        self.extensions.add(extension.lower())


def _samples_from_tar(fileobj, shard_url: str, limits: ReadLimits = ReadLimits()) -> Iterator[Sample]:
    end = _TarEnd()
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=end.tarinfo_class())
    except _TAR_DAMAGE as exc:
        yield Sample(key=None, shard=shard_url, error=_short(f"the shard is not a readable tar file ({exc})"))
        return
    grouper = _SampleGrouper(shard_url, limits)
    member_name: str | None = None  # the last member whose header was read
    reading: str | None = None  # the member whose data is being read
    damage: str | None = None
    try:
        for info in tar:
            member_name = info.name
            tar.members = []  # stream mode appends every header; drop them so memory stays flat
            reading = member_name
            data = tar.extractfile(info) if info.isreg() else None
            yield from grouper.add(info, data)
            if data is not None:
                _drain(data)  # whatever the grouper did not keep
            reading = None
    except _TAR_DAMAGE as exc:
        damage = _short(str(exc) or type(exc).__name__)
        if grouper.current is not None and not grouper.current.members:
            grouper.current = None  # its first member could not be read: it is part of the unreadable rest
    else:
        damage = end.damage()
    if grouper.current is not None and damage is not None:
        _fail(grouper.current, "the tar is damaged right after this sample, so some of its members may be missing")
    yield from grouper.finish()
    if damage is not None:
        where = f"inside member {reading!r}" if reading else f"after member {member_name!r}" if member_name else "at its start"
        error = f"the tar is damaged {where} ({damage}); the rest of the shard could not be read"
        yield Sample(key=None, shard=shard_url, error=_printable(error))


def _to_rgb(image: Image.Image) -> Image.Image:
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


# The 0xFF that starts a marker after entropy-coded data (or garbage): not a stuffed 0xFF00, a fill byte 0xFFFF or a
# restart marker (RSTn, part of a scan's data).
_JPEG_MARKER_IN_DATA = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
# Markers without a length field: TEM and RST0-7 (SOI and EOI are handled apart).
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
# What Pillow opens as a JPEG (or MPO), whatever the member's name: SOI and the start of a marker.
_JPEG_SIGNATURE = b"\xff\xd8\xff"


def _jpeg_scans_reason(data: bytes, name: str) -> str | None:
    """Why a JPEG's first image (up to its EOI) holds too many scans or marker segments to decode, or None.

    Walks the marker segments by their lengths, and each scan's entropy-coded data to the next marker, as
    libjpeg reads them, without decoding; the walk stops at the first limit passed, so it is linear in the
    file and at most MAX_JPEG_SEGMENTS steps.
    """
    scans = segments = 0
    position = 2  # after SOI
    while position + 1 < len(data):
        if data[position] != 0xFF or data[position + 1] in (0x00, 0xFF):
            found = _JPEG_MARKER_IN_DATA.search(data, position)  # fill bytes, or garbage libjpeg skips with a warning
            if found is None:
                return None
            position = found.start()
        marker = data[position + 1]
        if marker in (0xD8, 0xD9):  # EOI (an MPO's further images are never decoded), or a second SOI libjpeg refuses
            return None
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return f"image {name!r} has over {MAX_JPEG_SEGMENTS} JPEG marker segments, the limit for reading it"
        if marker in _JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2:
            return None  # malformed: libjpeg refuses it when decoding
        position += 2 + length
        if marker == 0xDA:  # SOS: a scan header, followed by its entropy-coded data up to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                return f"image {name!r} has over {MAX_JPEG_SCANS} JPEG scans (possible scan bomb: each scan decodes the whole image again)"
            found = _JPEG_MARKER_IN_DATA.search(data, position)
            if found is None:
                return None
            position = found.start()
    return None


def _load_image(image: Image.Image, name: str) -> Image.Image | str:
    """The opened image's pixels as RGB, EXIF orientation applied, or why they cannot be decoded."""
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except Exception as exc:  # noqa: BLE001 - see _open_image
        return _corrupt_reason(exc, name)


class _JsonOverLimit(ValueError):
    """A JSON member beyond the parsing limits; the message completes "member 'x.json' ..."."""


def _bounded_number(convert: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        if len(text) > MAX_JSON_NUMBER_CHARS:
            raise _JsonOverLimit(f"holds a number of {len(text)} characters, over the limit of {MAX_JSON_NUMBER_CHARS}")
        return convert(text)

    return parse


_PARSE_JSON_INT = _bounded_number(int)
_PARSE_JSON_FLOAT = _bounded_number(float)


def _nests_deeper_than(value: object, limit: int) -> bool:
    """Whether lists/objects nest more than `limit` levels (iterative: deep values must not exhaust the stack)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _parse_metadata(data: bytes, name: str) -> dict | str:
    """The JSON object of a metadata member, parsed within the limits, or why it is refused."""
    if len(data) > MAX_JSON_BYTES:
        return f"member {name!r} is {len(data)} bytes, over the {MAX_JSON_BYTES}-byte limit for JSON metadata"
    too_deep = f"member {name!r} nests JSON deeper than {MAX_JSON_DEPTH} levels"
    try:
        metadata = json.loads(data, parse_int=_PARSE_JSON_INT, parse_float=_PARSE_JSON_FLOAT)
    except _JsonOverLimit as exc:
        return f"member {name!r} {exc}"
    except RecursionError:
        return too_deep  # the parser gives up far beyond MAX_JSON_DEPTH
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"member {name!r} is not valid JSON"
    if not isinstance(metadata, dict):
        return f"member {name!r} is JSON but not an object"
    if _nests_deeper_than(metadata, MAX_JSON_DEPTH):
        return too_deep
    return metadata


def _open_sample_image(sample: Sample, options: DecodeOptions) -> Image.Image | None:
    """First step of decoding (header only, cheap): the sample's image checked against the limits, or None with the error recorded."""
    if sample.error is not None or sample.key is None:
        return None
    image_ext = image_extension(sample.members)
    assert image_ext is not None, "samples without an image member carry an error"
    data, name = sample.members[image_ext], sample.member_name(image_ext)
    # Before Pillow reads the header: its own marker walk is slower, and it keeps every APPn and COM segment.
    too_many = _jpeg_scans_reason(data, name) if data[:3] == _JPEG_SIGNATURE else None
    if too_many is not None:
        _fail(sample, too_many)
        return None
    opened = _open_image(data, name, options)
    if isinstance(opened, str):
        _fail(sample, opened)
        return None
    return opened


def _finish_decoding(sample: Sample, opened: Image.Image | None) -> Sample:
    """Second step: caption, metadata and pixels of a sample whose image passed `_open_sample_image`."""
    if sample.error is not None or opened is None:
        return sample
    caption_ext = member_of_format(sample.members, "txt")
    if caption_ext is not None:
        sample.caption = sample.members[caption_ext].decode("utf-8", errors="replace")
    metadata_ext = member_of_format(sample.members, "json")
    if metadata_ext is not None:
        metadata = _parse_metadata(sample.members[metadata_ext], sample.member_name(metadata_ext))
        if isinstance(metadata, str):
            _fail(sample, metadata)
            return sample
        sample.metadata = metadata
    image_ext = image_extension(sample.members)
    decoded = _load_image(opened, sample.member_name(image_ext))
    if isinstance(decoded, str):
        _fail(sample, decoded)
    else:
        sample.image = decoded
    return sample


def _decode_and_transform(sample: Sample, opened: Image.Image, transform: Callable[[Image.Image], object]) -> Sample:
    """One worker's whole job for a sample: its pixels decoded, then turned into the model's input (the image is dropped)."""
    _finish_decoding(sample, opened)
    if sample.image is not None:
        image_ext = image_extension(sample.members)
        try:
            sample.model_input = transform(sample.image)
        except Exception as exc:  # noqa: BLE001 - an image the model's transform refuses is that sample's error only
            _fail(sample, f"image {sample.member_name(image_ext)!r} could not be preprocessed for the model ({type(exc).__name__}: {exc})")
        sample.image = None
    return sample


def decode_sample(sample: Sample, options: DecodeOptions) -> Sample:
    """Fill `image`, `caption` and `metadata` of a sample without error (in place; returned for map())."""
    return _finish_decoding(sample, _open_sample_image(sample, options))


def _held_bytes(sample: Sample, opened: Image.Image | None) -> int:
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


def _transform_output_bytes(transform: Callable[[Image.Image], object]) -> int:
    """Bytes one transformed sample holds, measured once on a tiny image (a model's transform has a fixed output size)."""
    try:
        output = transform(Image.new("RGB", (8, 8)))
        return int(output.numel() * output.element_size())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not a tensor-making transform: nothing beyond the image to count
        return 0


def iter_samples(
    shard: LocationLike,
    decode: DecodeOptions | None = DecodeOptions(),
    limits: ReadLimits = ReadLimits(),
    local_copy: str | None = None,
) -> Iterator[Sample]:
    """Every sample of one shard, in tar order; `decode=None` yields raw members only (no image decoding).
    `local_copy`: the shard's verified copy on this machine, read instead of storage."""
    for sample in _iter_raw_samples(as_location(shard), limits, local_copy):
        yield sample if decode is None else decode_sample(sample, decode)


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def iter_batches(
    shards: Sequence[LocationLike] | LocationLike,
    task_batch_size: int = 100,
    decode: DecodeOptions | None = DecodeOptions(),
    threads: int | None = None,
    prefetch: int = 2,
    limits: ReadLimits = ReadLimits(),
    transform: Callable[[Image.Image], object] | None = None,
    worker_processes: bool = True,
    local_copies: Mapping[str, str] | None = None,
) -> Iterator[list[Sample]]:
    """Batches of `task_batch_size` samples from the shards in order (a batch may span shards).

    `local_copies` maps a shard URL to its verified copy on this machine (read instead of storage).

    A background thread streams the tars, checks each image's header and hands the decoding to a pool
    of `threads` workers (default: the CPUs this process may use); up to `prefetch` batches wait ready
    while the caller works on the current one. With a `transform` (e.g. open_clip's preprocess) each
    worker also applies it to the image it decoded: samples come with `model_input` set and no `image`,
    so decoding and preprocessing together scale with the workers. With a picklable transform and more
    than one worker, the workers are processes (tasks/io/decode_workers.py; `worker_processes=False`
    keeps them threads), so the interpreter lock does not cap the rate. A batch closes early when its next sample would take it
    over `limits.batch_bytes` (a sample alone may exceed it), so memory is bounded by about
    (prefetch + 2) batches of at most that size, whatever the number of shards or what they hold.
    """
    if isinstance(task_batch_size, bool) or not isinstance(task_batch_size, int) or task_batch_size < 1:
        raise UserError(f"task_batch_size must be a whole number of at least 1, not {task_batch_size!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be a whole number of at least 1 or None, not {threads!r}.")
    assert isinstance(prefetch, int) and prefetch >= 1, "prefetch counts batches and must be >= 1"
    shard_locations = [as_location(shards)] if isinstance(shards, (str, Location, os.PathLike)) else [as_location(shard) for shard in shards]
    workers = threads or _default_threads()
    in_processes = None
    if decode is not None and transform is not None and worker_processes and workers > 1:
        in_processes = decode_workers.WorkerTransform.of(transform)
        if in_processes is not None and not decode_workers.workers_can_load(workers, in_processes):
            in_processes = None
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if decode is not None and in_processes is None else None
    # A transformed sample holds its model input (602 KB at 224 px in float32), often more than its image did.
    input_bytes = _transform_output_bytes(transform) if transform is not None and decode is not None else 0
    # samples handed to worker processes and not yet done (kept by the reader thread), dropped when reading stops early
    pending: deque[_InWorker] = deque()

    def batches_of_pending_samples() -> Iterator[list[Sample | Future | _InWorker]]:
        batch: list[Sample | Future | _InWorker] = []
        batch_bytes = 0
        for shard in shard_locations:
            for sample in _iter_raw_samples(shard, limits, (local_copies or {}).get(shard.url)):
                if in_processes is not None:
                    # the worker checks the header, and the decoded image lives and dies there: this process holds
                    # the raw members and the model input only
                    opened, decoding = None, sample.error is None and sample.key is not None
                else:
                    opened = _open_sample_image(sample, decode) if pool is not None else None
                    decoding = opened is not None
                sample_bytes = _held_bytes(sample, opened) + (input_bytes if decoding else 0)
                if batch and batch_bytes + sample_bytes > limits.batch_bytes:
                    yield batch
                    batch, batch_bytes = [], 0
                if not decoding:
                    batch.append(sample)
                elif in_processes is not None:
                    entry = _InWorker(sample, decode_workers.submit(workers, sample.key, sample.shard, sample.members, decode, in_processes))
                    while pending and pending[0].future.done():
                        pending.popleft()
                    pending.append(entry)
                    batch.append(entry)
                elif transform is None:
                    batch.append(pool.submit(_finish_decoding, sample, opened))
                else:
                    batch.append(pool.submit(_decode_and_transform, sample, opened, transform))
                batch_bytes += sample_bytes
                if len(batch) == task_batch_size:
                    yield batch
                    batch, batch_bytes = [], 0
        if batch:
            yield batch

    try:
        with closing(prefetched(batches_of_pending_samples(), prefetch, "shard-reader")) as ready:
            for item in ready:
                yield [_finished(entry, workers, decode, in_processes) for entry in item]
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for entry in list(pending):  # the shared worker pool stays; only this reading's samples are dropped
            entry.future.cancel()


@dataclass
class _InWorker:
    """A sample being decoded and transformed in a worker process."""

    sample: Sample
    future: decode_workers.Decoding


def _finished(entry: Sample | Future | _InWorker, workers: int, decode: DecodeOptions | None,
              transform: "decode_workers.WorkerTransform | None") -> Sample:
    """The decoded sample behind a batch entry (waiting for its thread or worker process)."""
    if isinstance(entry, Sample):
        return entry
    if isinstance(entry, Future):
        return entry.result()
    sample = entry.sample
    assert decode is not None and transform is not None and sample.key is not None
    image_ext = image_extension(sample.members)
    result = decode_workers.result_of(entry.future, workers, sample.key, sample.shard, sample.members, decode, transform,
                                      sample.member_name(image_ext) if image_ext is not None else sample.key)
    sample.caption, sample.metadata = result.caption, result.metadata
    if result.error is not None:
        _fail(sample, result.error)
    elif result.model_input is not None:
        sample.model_input = _as_tensor(result.model_input) if result.tensor else result.model_input
    return sample


def _as_tensor(array: np.ndarray) -> object:
    import torch  # only samples a torch transform made reach here, so torch is already imported

    return torch.from_numpy(array)
