"""A WebDataset sample and the rules that read its members: formats, the image member, structure checks, error text.

A member's format is the last component of its extension, case-insensitive (`a.JPG`, `dir/with.dots.in.name.jpg`:
key `dir/with`, extension `dots.in.name.jpg`), and `image_extension` picks the image of a sample with several.
A sample that cannot be scored carries one short sentence in `error`: `fail` records the first reason only, as
one line of valid UTF-8 text (`short_reason`), so every error fits one Parquet string.

A sample read for embedding carries its `ImageHashes` (what known-abuse hash lists are matched by): the MD5 and
SHA-1 of its hashed image member's bytes (`hashed_image_extension`) and the PDQ of its decoded pixels. Their
`repr` never shows a hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

# Image formats by preference, as in webdataset's decoders (see the module docstring).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tiff", "tif", "gif")
# Image extensions we recognise but do not decode: the sample gets "unsupported format", not "no image".
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    "heic heif avif jxl jp2 j2k jpx ppm pgm pbm pnm ico icns svg psd tga dds eps exr hdr pcx raw cr2 nef dng arw".split()
)
_MAX_REASON_CHARS = 160


@dataclass(frozen=True, repr=False)
class ImageHashes:
    """The hashes one sample's image is matched by (tasks/hashes/image_hashes.py computes them).

    `md5` and `sha1` are the lowercase hex digests of the image member's bytes as stored, present whenever the
    sample has a non-empty image member, decodable or not (a corrupt file still matches an exact list). `pdq`
    (32 bytes) and `pdq_quality` (0-100) are the PDQ of the RGB pixels the embedding decode produced (EXIF
    orientation applied, transparency over white); with decode_mode=reduced those are the reduced-size JPEG
    decode's pixels, not the full-size image's. Both are None where no pixels were decoded.
    """

    md5: str
    sha1: str
    pdq: bytes | None
    pdq_quality: int | None

    def __repr__(self) -> str:
        # Hashes of abuse material are kept out of logs and tracebacks.
        shown = "no PDQ" if self.pdq is None else f"PDQ of quality {self.pdq_quality}"
        return f"ImageHashes(md5, sha1, {shown})"


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
    image_hashes: ImageHashes | None = None  # set by the embedding pass's decoding; None without an image member
    stored_pdq: tuple[bytes, int] | None = None  # PDQ of the decoded pixels as stored (tasks/io/decode.py), for image_hashes
    jpeg_ended: bool | None = None  # whether its JPEG's marker walk reached EOI (False: truncated), set by the header check

    def member_name(self, extension: str) -> str:
        """The member's name in the tar, as the writer re-creates it."""
        return f"{self.key}.{extension}"


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


def hashed_image_extension(members: dict[str, bytes]) -> str | None:
    """The member whose bytes the sample's MD5 and SHA-1 are of: its image (`image_extension`), else its first image
    member in a format not decoded (`.heic`: exact lists match those too), else None; an empty member is none."""
    extension = image_extension(members) or next(iter(image_members(members)), None)
    return extension if extension is not None and members[extension] else None


_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  \r\n", b"\xff\x0a")
_FTYP_BRANDS = (b"heic", b"heix", b"hevc", b"heif", b"mif1", b"msf1", b"avif", b"avis")


def holds_image_bytes(data: bytes) -> bool:
    """Whether a member's bytes are an image file by their magic numbers, whatever its name says (a JPEG named
    `.bin` is still an image: the filtered dataset copies every member, so it must not pass unscored)."""
    if data.startswith(_SIGNATURES):
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    if data[4:8] == b"ftyp" and data[8:12] in _FTYP_BRANDS:
        return True
    return data[:2] == b"BM" and len(data) >= 26 and int.from_bytes(data[2:6], "little") == len(data)  # BMP: its own size


def image_members(members: dict[str, bytes]) -> list[str]:
    """Extensions of every member holding an image, decodable or not, in tar order."""
    return [extension for extension in members if member_format(extension) in IMAGE_EXTENSIONS or member_format(extension) in UNSUPPORTED_IMAGE_EXTENSIONS]


def member_of_format(members: dict[str, bytes], wanted: str) -> str | None:
    """The extension of a sample's `txt` or `json` member: the one named exactly so, else the first of that format in tar order."""
    exact = next((extension for extension in members if extension.lower() == wanted), None)
    return exact or next((extension for extension in members if member_format(extension) == wanted), None)


def printable(name: str) -> str:
    """The name as valid UTF-8 text: tarfile keeps undecodable bytes as surrogates, which Parquet cannot store."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def short_reason(text: object) -> str:
    """One line of valid UTF-8 text, at most _MAX_REASON_CHARS long."""
    text = " ".join(printable(str(text)).split())
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def fail(sample: Sample, reason: str) -> None:
    """Record why a sample cannot be scored; the first reason wins."""
    if sample.error is None:
        sample.error = short_reason(reason)


def check_structure(sample: Sample) -> None:
    """Errors visible without decoding: missing or unsupported image, empty members."""
    image_ext = image_extension(sample.members)
    if image_ext is None:
        unsupported = [ext for ext in sample.members if member_format(ext) in UNSUPPORTED_IMAGE_EXTENSIONS]
        if unsupported:
            fail(sample, f"image member {sample.member_name(unsupported[0])!r} has an unsupported format (.{member_format(unsupported[0])})")
        else:
            fail(sample, f"no image member (expected one of .{', .'.join(IMAGE_EXTENSIONS)})")
    for extension, data in sample.members.items():
        # An empty caption is a legitimate value; any other empty member means a failed write or copy.
        if not data and member_format(extension) != "txt":
            fail(sample, f"member {sample.member_name(extension)!r} is empty (0 bytes)")
