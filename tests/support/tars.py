"""Builders for real WebDataset tars: photos from scikit-image, PIL-drawn images, and every bad case.

`bad_case_members()` returns the members of one shard that holds each kind of unreadable sample
together with a few good ones, and `BAD_CASE_EXPECTED` says what each key must become.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Photos bundled with scikit-image (no download); all RGB after conversion.
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "hubble_deep_field", "retina", "immunohistochemistry")


@functools.lru_cache(maxsize=None)
def _photo_pixels(name: str) -> np.ndarray:
    import skimage.data

    pixels = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return pixels


def photo(name: str) -> Image.Image:
    """A scikit-image sample photo as an RGB PIL image."""
    return Image.fromarray(_photo_pixels(name)).convert("RGB")


def drawn_image(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A PIL-drawn RGB picture: a coloured background with random ellipses, rectangles and lines."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 8)))
    return image


def large_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image of the given size: a mosaic of scikit-image photos at their native scale."""
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (width, height))
    y = 0
    while y < height:
        x, row_height = 0, 0
        while x < width:
            tile = photo(PHOTO_NAMES[int(rng.integers(0, len(PHOTO_NAMES)))])
            canvas.paste(tile, (x, y))
            x += tile.width
            row_height = max(row_height, tile.height)
        y += row_height
    return canvas


def encode(image: Image.Image, image_format: str = "JPEG", **save_options) -> bytes:
    """The image file's bytes in the given Pillow format."""
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_options)
    return buffer.getvalue()


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    """A JPEG whose EXIF Orientation tag is `orientation` (pixels stored as given)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=90, exif=exif.tobytes())


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (width + 1) * 16)  # a few rows; the header alone is the bomb
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def animated_gif(colours: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (0, 0, 255)), size: int = 64) -> bytes:
    """A GIF whose frames are solid colours, first frame first."""
    frames = [Image.new("RGB", (size, size), colour) for colour in colours]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


@dataclass(frozen=True)
class Member:
    """A tar member: a regular file, or (kind) a 'symlink', 'hardlink' or 'dir'."""

    name: str
    data: bytes = b""
    kind: str = "file"
    target: str = ""


def as_member(entry: Member | tuple[str, bytes]) -> Member:
    return entry if isinstance(entry, Member) else Member(*entry)


def tar_bytes(entries, gzip: bool = False) -> bytes:
    """A tar (optionally gzip-compressed) holding the entries in order, with a proper end-of-archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in map(as_member, entries):
            info = tarfile.TarInfo(entry.name)
            info.mtime = 1_700_000_000
            if entry.kind == "file":
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE}[entry.kind]
                info.linkname = entry.target
                tar.addfile(info)
    return buffer.getvalue()


def write_tar(path: str | Path, entries, gzip: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(entries, gzip=gzip))
    return path


def member_offsets(data: bytes) -> dict[str, tuple[int, int, int]]:
    """For each member of an uncompressed tar: (offset of its header block, offset of its data, end of its data
    padded to the 512-byte block)."""
    offsets = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            offsets[info.name] = (info.offset, info.offset_data, info.offset_data + -(-info.size // 512) * 512)
    return offsets


def good_sample_members(key: str, seed: int = 0, size: tuple[int, int] = (320, 240)) -> list[Member]:
    """jpg + txt + json members of one ordinary sample."""
    image = drawn_image(*size, seed=seed)
    return [
        Member(f"{key}.jpg", encode(image, "JPEG", quality=90)),
        Member(f"{key}.txt", f"caption {key}".encode()),
        Member(f"{key}.json", json.dumps({"key": key, "seed": seed}).encode()),
    ]


def shard_of_good_samples(keys: list[str], size: tuple[int, int] = (320, 240)) -> list[Member]:
    members: list[Member] = []
    for seed, key in enumerate(keys):
        members.extend(good_sample_members(key, seed, size))
    return members


def _cmyk_jpeg() -> bytes:
    return encode(photo("coffee").convert("CMYK"), "JPEG", quality=90)


def _transparent_png() -> bytes:
    image = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # fully transparent black
    ImageDraw.Draw(image).rectangle((0, 0, 9, 29), fill=(255, 0, 0, 255))  # opaque red stripe
    return encode(image, "PNG")


def _sixteen_bit_png() -> bytes:
    pixels = np.full((8, 8), 0x8000, dtype=np.uint16)  # mid-grey on 16 bits
    return encode(Image.fromarray(pixels), "PNG")


def bad_case_members() -> list[Member]:
    """One shard holding every bad case (and the good cases they must not disturb), in tar order."""
    astronaut = encode(photo("astronaut"), "JPEG", quality=90)
    truncated = astronaut[: len(astronaut) // 2]
    chelsea = photo("chelsea")
    return [
        Member("good.jpg", astronaut),
        Member("good.txt", b"an astronaut"),
        Member("good.json", b'{"source": "skimage"}'),
        Member("png.png", encode(photo("coffee"), "PNG")),
        Member("webp.webp", encode(photo("rocket"), "WEBP", quality=90)),
        Member("bmp.bmp", encode(drawn_image(64, 48, seed=3), "BMP")),
        Member("tiff.tiff", encode(photo("chelsea"), "TIFF")),
        Member("gif.gif", animated_gif()),
        Member("grey.png", encode(photo("coffee").convert("L"), "PNG")),
        Member("cmyk.jpg", _cmyk_jpeg()),
        Member("alpha.png", _transparent_png()),
        Member("deep.png", _sixteen_bit_png()),
        Member("rotated.jpg", jpeg_with_orientation(chelsea, 6)),  # 451x300 stored, 300x451 shown
        Member("upper.JPG", encode(drawn_image(50, 40, seed=4), "JPEG")),
        Member("pngnamedjpg.jpg", encode(drawn_image(50, 40, seed=5), "PNG")),
        Member("emptycaption.jpg", encode(drawn_image(50, 40, seed=6), "JPEG")),
        Member("emptycaption.txt", b""),
        Member("multi.jpg", encode(drawn_image(50, 40, seed=7), "JPEG")),
        Member("multi.seg.png", encode(drawn_image(50, 40, seed=8).convert("L"), "PNG")),
        Member("two.png", encode(Image.new("RGB", (30, 20), (0, 255, 0)), "PNG")),  # green PNG first in the tar
        Member("two.jpg", encode(Image.new("RGB", (30, 20), (0, 0, 255)), "JPEG", quality=95)),  # blue JPEG wins
        Member("d1/same.jpg", encode(drawn_image(40, 30, seed=9), "JPEG")),
        Member("d2/same.jpg", encode(drawn_image(40, 30, seed=10), "JPEG")),
        Member("split.jpg", encode(drawn_image(40, 30, seed=11), "JPEG")),
        Member("between.jpg", encode(drawn_image(40, 30, seed=12), "JPEG")),
        Member("split.txt", b"the caption arrives after another key"),
        # --- unreadable samples ---
        Member("corrupt.jpg", bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8))),
        Member("corrupt.txt", b"kept with the error"),
        Member("truncated.jpg", truncated),
        Member("zero.jpg", b""),
        Member("zero.txt", b"the image is empty"),
        Member("noimage.txt", b"no picture here"),
        Member("noimage.json", b"{}"),
        Member("bomb.png", png_bomb()),
        Member("heic.heic", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64),
        Member("ppm.jpg", encode(drawn_image(20, 10, seed=13), "PPM")),
        Member("../escape.jpg", astronaut),
        Member("/absolute.jpg", astronaut),
        Member("dup.jpg", astronaut),
        Member("dup.jpg", astronaut),
        Member("link.jpg", kind="symlink", target="good.jpg"),
        Member("badjson.jpg", encode(drawn_image(40, 30, seed=14), "JPEG")),
        Member("badjson.json", b"{not json"),
        Member("README", b"not part of any sample"),
        Member("emptyseg.jpg", encode(drawn_image(40, 30, seed=15), "JPEG")),
        Member("emptyseg.seg.png", b""),
        Member("last.jpg", encode(drawn_image(40, 30, seed=16), "JPEG")),
    ]


# key -> None for a good sample, else a piece of the error text it must carry (keys in output order).
BAD_CASE_EXPECTED: list[tuple[str, str | None]] = [
    ("good", None),
    ("png", None),
    ("webp", None),
    ("bmp", None),
    ("tiff", None),
    ("gif", None),
    ("grey", None),
    ("cmyk", None),
    ("alpha", None),
    ("deep", None),
    ("rotated", None),
    ("upper", None),
    ("pngnamedjpg", None),
    ("emptycaption", None),
    ("multi", None),
    ("two", None),
    ("d1/same", None),
    ("d2/same", None),
    ("split", None),
    ("between", None),
    ("split", "reappears after other keys"),
    ("corrupt", "is corrupt or not an image"),
    ("truncated", "is truncated"),
    ("zero", "is empty (0 bytes)"),
    ("noimage", "no image member"),
    ("bomb", "decompression"),
    ("heic", "unsupported format"),
    ("ppm", "unsupported format PPM"),
    ("../escape", "climbs out of its directory"),
    ("/absolute", "is an absolute path"),
    ("dup", "appears twice"),
    ("link", "symbolic link"),
    ("badjson", "not valid JSON"),
    ("README", "has no extension"),
    ("emptyseg", "is empty (0 bytes)"),
    ("last", None),
]


# --- hostile samples: each must cost only its own row (the reader's resource budget) ---


def wide_png(width: int = 1, height: int = 100_000) -> bytes:
    """A real, small PNG with extreme sides (1 x 100000 is 140 KB; resized by its shorter side it would be gigapixels)."""
    return encode(Image.new("L", (width, height), 128), "PNG")


def deeply_nested_json(levels: int = 100_000) -> bytes:
    """`levels` opening brackets: Python's json parser recurses once per bracket."""
    return b"[" * levels


def long_number_json(digits: int = 5_000) -> bytes:
    """A JSON object holding an integer with `digits` digits (over Python's 4300-digit conversion limit)."""
    return b'{"n": ' + b"7" * digits + b"}"


def many_members_sample(key: str, count: int = 40_000, seed: int = 0) -> list[Member]:
    """One sample: a JPEG, a caption and `count` one-byte members with distinct extensions."""
    members = [Member(f"{key}.jpg", encode(drawn_image(64, 48, seed=seed), "JPEG")), Member(f"{key}.txt", f"caption {key}".encode())]
    members.extend(Member(f"{key}.m{index:06d}", b"x") for index in range(count))
    return members


@dataclass(frozen=True)
class ZeroMember:
    """A tar member of `size` zero bytes, written as a hole in the file (no disk space, no time)."""

    name: str
    size: int


def write_tar_with_holes(path: str | Path, entries) -> Path:
    """An uncompressed tar of Members and ZeroMembers in order; ZeroMember data is left as a file hole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for entry in entries:
            if isinstance(entry, ZeroMember):
                info, data = tarfile.TarInfo(entry.name), None
                info.size = entry.size
            else:
                entry = as_member(entry)
                assert entry.kind == "file", "only regular files and zero members"
                info, data = tarfile.TarInfo(entry.name), entry.data
                info.size = len(data)
            info.mtime = 1_700_000_000
            handle.write(info.tobuf(tarfile.PAX_FORMAT))
            padded = -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if data is None:
                handle.seek(padded, io.SEEK_CUR)
            else:
                handle.write(data + b"\0" * (padded - len(data)))
        handle.seek(2 * tarfile.BLOCKSIZE, io.SEEK_CUR)  # end-of-archive: two zero blocks (a hole as well)
        handle.truncate()
    return path


def output_shard_keys(output_path: str | Path) -> set[str]:
    """Sample keys in the WebDataset tars under `output_path/shards` (the key rule: the name up to the first dot of its file name)."""
    keys = set()
    for shard in Path(output_path, "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                folder, _, name = member.name.rpartition("/")
                keys.add(f"{folder}/{name.split('.', 1)[0]}" if folder else name.split(".", 1)[0])
    return keys
