"""Stream WebDataset shards into samples: key, raw members, decoded RGB image, caption, metadata, error.

Shards are read through fsspec as a tar *stream* (one member in memory at a time) and grouped by the
WebDataset key rule: the key is the member path up to the first dot of the file name
(`dir/a.seg.png` -> key `dir/a`, extension `seg.png`); a new sample starts whenever the key changes.
Every key in the input comes out as exactly one `Sample` per contiguous run of members; a sample that
cannot be scored carries a one-sentence `error` (and its raw members where they were read), and a
damaged tar ends with one shard-level record (`key=None`) for the part that could not be read.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.errors import UserError
from tasks.prefetch import prefetched

# Image members by preference: a sample with several images is scored on the first present.
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
# From benchmarks/bench_read.py on 1024-2048 px JPEGs: decode 2x and decode + open_clip transform 3-4x
# faster, pixels after the 224 px transform within 1/255 on average; >= 256 also suits 240/256 px models.
DEFAULT_REDUCED_JPEG_SIZE = 256
# A member larger than this is not read into memory; its sample is recorded as an error.
MAX_MEMBER_BYTES = 1 << 30
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
    caption: str | None = None
    metadata: dict | None = None
    error: str | None = None  # why this sample cannot be scored (one short sentence); None when fine

    def member_name(self, extension: str) -> str:
        """The member's name in the tar, as the writer re-creates it."""
        return f"{self.key}.{extension}"


@dataclass(frozen=True)
class DecodeOptions:
    """How images are decoded; `identity()` names every setting that changes the decoded pixels."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit (width x height before any reduction)
    reduced_jpeg_size: int | None = DEFAULT_REDUCED_JPEG_SIZE  # JPEGs decode at 1/2, 1/4 or 1/8 scale keeping both sides >= this; None = full

    def __post_init__(self) -> None:
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise UserError(f"max_pixels must be a positive whole number of pixels, not {self.max_pixels!r}.")
        size = self.reduced_jpeg_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UserError(f"reduced_jpeg_size must be a positive number of pixels or None, not {size!r}.")

    @classmethod
    def for_model(cls, image_size: Sequence[int]) -> "DecodeOptions":
        """The default for a model's input size: reduced JPEG decoding never below it (no upscaling at 336 px)."""
        return cls(reduced_jpeg_size=max(DEFAULT_REDUCED_JPEG_SIZE, *image_size))

    def identity(self) -> str:
        # max_pixels only decides which images are refused, never their pixels, so it is not part of it.
        reduced = "off" if self.reduced_jpeg_size is None else str(self.reduced_jpeg_size)
        return f"decode-v1:rgb,exif-orientation,alpha-over-white,first-frame,16bit-msb,jpeg-reduced-min-side={reduced}"


def image_extension(members: dict[str, bytes]) -> str | None:
    """The member holding the sample's image: the first of IMAGE_EXTENSIONS present (case-insensitive)."""
    by_lower = {}
    for extension in members:
        by_lower.setdefault(extension.lower(), extension)
    for extension in IMAGE_EXTENSIONS:
        if extension in by_lower:
            return by_lower[extension]
    return None


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
        unsupported = [ext for ext in sample.members if ext.lower() in UNSUPPORTED_IMAGE_EXTENSIONS]
        if unsupported:
            _fail(sample, f"image member {sample.member_name(unsupported[0])!r} has an unsupported format (.{unsupported[0]})")
        else:
            _fail(sample, f"no image member (expected one of .{', .'.join(IMAGE_EXTENSIONS)})")
    for extension, data in sample.members.items():
        # An empty caption is a legitimate value; any other empty member means a failed write or copy.
        if not data and extension.lower() != "txt":
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


def _open_shard(shard_url: str, storage_options: dict | None):
    """An fsspec file for the shard; one-sentence UserError when it can never be opened (missing, denied, bad URL)."""
    try:
        fs, path = url_to_fs(shard_url, **(storage_options or {}))
        if isinstance(fs, LocalFileSystem):
            return fs.open(path, "rb")
        return fs.open(path, "rb", block_size=_REMOTE_BLOCK_BYTES, cache_type="readahead")
    except FileNotFoundError:
        raise UserError(f"Shard {shard_url} does not exist; list the shards again or fix file_paths.") from None
    except PermissionError:
        raise UserError(f"Cannot read shard {shard_url}: access denied; check the storage credentials in the environment.") from None
    except IsADirectoryError:
        raise UserError(f"Shard {shard_url} is a directory, not a tar file; fix file_paths.") from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        raise UserError(f"Shard {shard_url} uses an unknown protocol; use a local path, file://, s3:// or another fsspec URL.") from None
    except ImportError as exc:
        raise UserError(f"Shard {shard_url} needs a filesystem package that is not installed ({exc}); install it and retry.") from None
    # Anything else (5xx, timeouts, dropped connections) may be transient: it propagates so the task retries.


def _iter_raw_samples(shard_url: str, storage_options: dict | None = None) -> Iterator[Sample]:
    """Samples with raw members and structural errors only (no decoding), streaming the tar."""
    with _open_shard(shard_url, storage_options) as fileobj:
        yield from _samples_from_tar(fileobj, shard_url)


def _samples_from_tar(fileobj, shard_url: str) -> Iterator[Sample]:
    end = _TarEnd()
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=end.tarinfo_class())
    except _TAR_DAMAGE as exc:
        yield Sample(key=None, shard=shard_url, error=_short(f"the shard is not a readable tar file ({exc})"))
        return
    current: Sample | None = None
    current_key: str | None = None  # the key as tarfile decoded it (Sample.key is its printable form)
    seen_keys: set[str] = set()  # per shard only: detects a key whose members are not contiguous
    member_name: str | None = None  # the last member whose header was read
    reading: str | None = None  # the member whose data is being read
    damage: str | None = None
    try:
        for info in tar:
            member_name = info.name
            tar.members = []  # stream mode appends every header; drop them so memory stays flat
            if info.isdir() or _is_meta_member(member_name):
                continue
            match = _KEY_AND_EXTENSION.match(member_name)
            if match is None:
                # WebDataset ignores such a member; we report it under its own name so nothing goes unnoticed.
                if current is not None:
                    _check_structure(current)
                    yield current
                    current = None
                name = _printable(member_name)
                yield Sample(key=name, shard=shard_url, error=_short(f"member {name!r} has no extension, so it belongs to no WebDataset sample"))
                continue
            key, extension = match.group(1), match.group(2)
            if current is None or key != current_key:
                if current is not None:
                    _check_structure(current)
                    yield current
                current, current_key = Sample(key=_printable(key), shard=shard_url), key
                if key in seen_keys:
                    _fail(current, f"key {current.key!r} reappears after other keys; WebDataset reads its later members as a second sample")
                seen_keys.add(key)
            unsafe = _unsafe_name_reason(member_name)
            if unsafe:
                _fail(current, f"member name {_printable(member_name)!r} {unsafe}, so the sample is never written")
            if extension.lower() in {ext.lower() for ext in current.members}:
                _fail(current, f"member {member_name!r} appears twice in the sample")
                continue
            if not info.isreg():
                kind = "a symbolic link" if info.issym() else "a hard link" if info.islnk() else "not a regular file"
                _fail(current, f"member {member_name!r} is {kind}")
                continue
            if info.size > MAX_MEMBER_BYTES:
                _fail(current, f"member {member_name!r} is {info.size} bytes, over the {MAX_MEMBER_BYTES}-byte read limit")
                continue
            reading = member_name
            current.members[extension] = tar.extractfile(info).read()
            reading = None
    except _TAR_DAMAGE as exc:
        damage = _short(str(exc) or type(exc).__name__)
        if current is not None and not current.members:
            current = None  # its first member could not be read: it is part of the unreadable rest
    else:
        damage = end.damage()
    if current is not None:
        if damage is not None:
            _fail(current, "the tar is damaged right after this sample, so some of its members may be missing")
        _check_structure(current)
        yield current
    if damage is not None:
        where = f"inside member {reading!r}" if reading else f"after member {member_name!r}" if member_name else "at its start"
        error = f"the tar is damaged {where} ({damage}); the rest of the shard could not be read"
        yield Sample(key=None, shard=shard_url, error=_printable(error))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # Pillow clips 16-bit values at 255 when converting; keep the 8 most significant bits instead.
        pixels = np.asarray(image).astype(np.int64, copy=False)
        return Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
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


def _decode_image(data: bytes, name: str, options: DecodeOptions) -> Image.Image | str:
    """The RGB image, or the reason it cannot be decoded."""
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
        return f"image {name!r} is corrupt ({type(exc).__name__}: {exc})"
    try:
        width, height = image.size
        if width * height > options.max_pixels:
            return f"image {name!r} is {width}x{height} pixels, over the limit of {options.max_pixels} (possible decompression bomb)"
        reduced = options.reduced_jpeg_size
        if reduced is not None and image.format in _JPEG_FORMATS and min(width, height) >= 2 * reduced:
            image.draft(None, (reduced, reduced))  # libjpeg DCT scaling: both sides stay >= reduced
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except OSError as exc:
        if "truncated" in str(exc) or "broken data stream" in str(exc):
            return f"image {name!r} is truncated"
        return f"image {name!r} is corrupt ({exc})"
    except Exception as exc:  # noqa: BLE001 - see above
        return f"image {name!r} is corrupt ({type(exc).__name__}: {exc})"


def decode_sample(sample: Sample, options: DecodeOptions) -> Sample:
    """Fill `image`, `caption` and `metadata` of a sample without error (in place; returned for map())."""
    if sample.error is not None or sample.key is None:
        return sample
    for extension, data in sample.members.items():
        lower = extension.lower()
        if lower == "txt" and sample.caption is None:
            sample.caption = data.decode("utf-8", errors="replace")
        elif lower == "json" and sample.metadata is None:
            try:
                metadata = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError):
                _fail(sample, f"member {sample.member_name(extension)!r} is not valid JSON")
                return sample
            if not isinstance(metadata, dict):
                _fail(sample, f"member {sample.member_name(extension)!r} is JSON but not an object")
                return sample
            sample.metadata = metadata
    image_ext = image_extension(sample.members)
    assert image_ext is not None, "samples without an image member carry an error"
    decoded = _decode_image(sample.members[image_ext], sample.member_name(image_ext), options)
    if isinstance(decoded, str):
        _fail(sample, decoded)
    else:
        sample.image = decoded
    return sample


def iter_samples(
    shard_url: str, decode: DecodeOptions | None = DecodeOptions(), storage_options: dict | None = None
) -> Iterator[Sample]:
    """Every sample of one shard, in tar order; `decode=None` yields raw members only (no image decoding)."""
    for sample in _iter_raw_samples(shard_url, storage_options):
        yield sample if decode is None else decode_sample(sample, decode)


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def iter_batches(
    shard_urls: Sequence[str],
    task_batch_size: int = 100,
    decode: DecodeOptions | None = DecodeOptions(),
    storage_options: dict | None = None,
    threads: int | None = None,
    prefetch: int = 2,
) -> Iterator[list[Sample]]:
    """Batches of `task_batch_size` samples from the shards in order (a batch may span shards).

    A background thread streams the tars and hands images to a pool of `threads` decoders (default:
    the CPUs this process may use); up to `prefetch` batches wait ready while the caller works on the
    current one, so memory is bounded by about (prefetch + 2) batches whatever the number of shards.
    """
    if isinstance(task_batch_size, bool) or not isinstance(task_batch_size, int) or task_batch_size < 1:
        raise UserError(f"task_batch_size must be a whole number of at least 1, not {task_batch_size!r}.")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be a whole number of at least 1 or None, not {threads!r}.")
    assert isinstance(prefetch, int) and prefetch >= 1, "prefetch counts batches and must be >= 1"
    if isinstance(shard_urls, str):
        shard_urls = [shard_urls]
    pool = ThreadPoolExecutor(threads or _default_threads(), thread_name_prefix="decode") if decode is not None else None

    def batches_of_pending_samples() -> Iterator[list[Sample | Future]]:
        batch: list[Sample | Future] = []
        for shard_url in shard_urls:
            for sample in _iter_raw_samples(shard_url, storage_options):
                needs_decoding = pool is not None and sample.error is None
                batch.append(pool.submit(decode_sample, sample, decode) if needs_decoding else sample)
                if len(batch) == task_batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    try:
        with closing(prefetched(batches_of_pending_samples(), prefetch, "shard-reader")) as ready:
            for item in ready:
                yield [entry.result() if isinstance(entry, Future) else entry for entry in item]
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
