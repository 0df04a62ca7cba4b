"""The hashes an image is matched by: MD5 and SHA-1 of its member's bytes, and PDQ of its decoded pixels.

`bytes_hashes(data)` gives the MD5 and SHA-1 hex digests of an image member's bytes exactly as stored in the
shard (what exact-match lists hold). `pdq_of_image(image)` gives the PDQ perceptual hash (Meta's, from
facebook/ThreatExchange) of a decoded PIL image, as 32 bytes and a quality from 0 to 100: what the pipeline
calls per image. `pdq_hash(pixels)` gives the same hash of an RGB numpy array. `pdq_hex` writes those bytes as
ThreatExchange writes PDQ hashes (64 hex digits, bit 255 first). Nothing here decodes an image: the pipeline
decodes each image once and hands it here.

PDQ is computed here in numpy, following ThreatExchange's C++ reference (pdq/cpp/hashing/pdqhashing.cpp,
downscaling.cpp) step by step: luma `0.299 R + 0.587 G + 0.114 B` in float32; two passes of the Jarosz box
filter along rows and columns with window `ceil(side / 128)` and its shrinking windows at the edges; the
64 x 64 decimation at pixel centres; the quality from the truncated 64 x 64 gradients (`sum // 90`, at most
100); the 16 x 16 DCT of coefficients 1..16; and bit `16 i + j` set where coefficient (i, j) is above the
lower median (Torben's). The filter and decimation are linear, so they are applied as 64 precomputed weight
bands per axis, each touching only the rows (then columns) that reach one output cell: one pass over the
pixels. On the test photos this gives the same 256 bits as the `pdqhash` package (the reference C++ built
with Cython) at full size; only a flat image (quality 0, every coefficient equal up to rounding) can differ.

`pdq_of_image` never copies the RGB pixels: Pillow's own RGB to "F" conversion computes the reference's
float32 luma (the same formula in float32, within 1e-5 of it in float64) into a 4-byte-per-pixel image,
which is read in place through Arrow (Pillow 11.2 and newer, images up to 4 MP at Pillow's 16 MiB blocks;
a larger one is copied). It is 0 bits from the reference hash on every test photo (scikit-image's eight
samples, the tests' REFERENCE_PDQ) and on the benchmark's 1-2 MP photos, where the reference takes the RGB
pixels; Pillow's 8-bit "L" luma, which rounds each pixel, moved 0-2 bits on those photos and costs as much.

Resolution: PDQ reduces any image to 64 x 64 itself and every pixel counts, so it takes the image at the
size it was decoded; nothing is gained by giving it more than that. Measured on one core
(benchmarks/bench_hashes.py, figures in benchmarks/README.md): `pdq_of_image` takes 0.36-0.50 ms for a
512 px JPEG's image and 1.6-2.2 ms for a 1.2-2 MP photo's (MD5 + SHA-1 + PDQ: 10-11% over its decode and
CLIP transform; 17-23% with the RGB copy), against 3-4 ms and 43-47 ms for `pdqhash` on the pixels (its
column pass is cache-hostile). ThreatExchange's tools reduce first for that cost (Python:
`thumbnail((512, 512))`; C++: a 512 x 512 resize); here a reduction moves the hash: on the test photos
0-22 of 256 bits for ThreatExchange's thumbnail and 4-14 for the reader's reduced-size JPEG decode, out of
the 31 a match allows. So the full-size hash is the one computed, as python-threatexchange (which HMA uses)
computes it; hashes from the reducing tools still match it. An image under 5 pixels on a side has the
all-zero hash and quality 0, as in the reference.
"""

from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

PDQ_BYTES = 32  # 256 bits
PDQ_HEX_DIGITS = 64
MIN_HASHABLE_SIDE = 5  # the reference's smallest side; below it, the all-zero hash of quality 0
_CELLS = 64  # PDQ's downsampled image is 64 x 64
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Up to this many values, one gather of every band beats 64 products of one band each (measured).
_GATHER_VALUES = 1 << 20


def bytes_hashes(data: bytes) -> tuple[str, str]:
    """(MD5, SHA-1) of `data` as lowercase hex digests: the image member's bytes exactly as stored."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest(), hashlib.sha1(data, usedforsecurity=False).hexdigest()


def pdq_hash(pixels: np.ndarray) -> tuple[bytes, int]:
    """PDQ of a decoded RGB image (uint8, [height, width, 3]): its 32 bytes (bit 255 first) and quality 0-100.

    Hashes of quality below 50 say little about the image (flat or nearly flat) and are not matched.
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError("pdq_hash takes RGB pixels as a uint8 array of shape [height, width, 3]")
    height, width = pixels.shape[:2]
    if height < MIN_HASHABLE_SIDE or width < MIN_HASHABLE_SIDE:
        return bytes(PDQ_BYTES), 0
    rows = _reduce_rows(np.ascontiguousarray(pixels).reshape(height, width * 3))
    return _pdq_of_cells(_reduce_columns(rows.reshape(_CELLS, width, 3) @ _LUMA))  # the luma is linear, so it commutes


def pdq_of_image(image: Image.Image) -> tuple[bytes, int]:
    """PDQ of a decoded PIL image (any mode; RGB pixels are what PDQ reads): what the pipeline calls per image.

    The same hash as `pdq_hash` of its RGB pixels, from Pillow's float luma instead of a copy of those pixels.
    """
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    if image.height < MIN_HASHABLE_SIDE or image.width < MIN_HASHABLE_SIDE:
        return bytes(PDQ_BYTES), 0
    return _pdq_of_cells(_reduce_columns(_reduce_rows(_float_luma(image))))


def pdq_hex(bits32: bytes) -> str:
    """The hash as ThreatExchange writes it: 64 lowercase hex digits, the first the four most significant bits."""
    if not isinstance(bits32, (bytes, bytearray)) or len(bits32) != PDQ_BYTES:
        raise ValueError("a PDQ hash is 32 bytes")
    return bytes(bits32).hex()


# ---------------------------------------------------------------------------------------------------
# The reference's steps


def _jarosz_window(side: int) -> int:
    """computeJaroszFilterWindowSize(side, 64): half a cell, rounded up."""
    return (side + 2 * _CELLS - 1) // (2 * _CELLS)


def _box_transposed(values: np.ndarray, window: int) -> np.ndarray:
    """B^T @ values, for B the reference's 1-D box filter (box1DFloat) along axis 0 of `values` [side, k].

    Output i of B averages inputs [i - a, i + b] clipped to the vector (a = window - half, b = half - 1,
    half = (window + 2) // 2), so input j feeds outputs [j - b, j + a], each with its own divisor.
    """
    side = values.shape[0]
    half = (window + 2) // 2
    reach_left, reach_right = window - half, half - 1
    index = np.arange(side)
    counts = np.minimum(side - 1, index + reach_right) - np.maximum(0, index - reach_left) + 1
    scaled = values / counts[:, None]
    prefix = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(scaled, axis=0)])
    first, last = np.maximum(0, index - reach_right), np.minimum(side - 1, index + reach_left)
    return prefix[last + 1] - prefix[first]


@functools.lru_cache(maxsize=512)
def _bands(side: int) -> tuple[np.ndarray, np.ndarray]:
    """For one axis of `side` pixels: each of the 64 cells' first input index [64] and weights [64, width].

    Cell c's value is the two-pass Jarosz filter's output at the reference's decimation point
    int((c + 0.5) * side / 64), a weighted sum of a contiguous run of inputs; all runs get one width.
    """
    window = _jarosz_window(side)
    picks = ((np.arange(_CELLS) + 0.5) * side / _CELLS).astype(np.int64)
    selector = np.zeros((side, _CELLS))
    selector[picks, np.arange(_CELLS)] = 1.0
    # (decimate @ B @ B) transposed, for the two passes along this axis
    weights = _box_transposed(_box_transposed(selector, window), window).T
    nonzero = weights != 0
    starts = nonzero.argmax(axis=1)
    ends = side - nonzero[:, ::-1].argmax(axis=1)
    width = int((ends - starts).max())
    starts = np.minimum(starts, side - width)
    columns = starts[:, None] + np.arange(width)[None, :]
    band_weights = np.take_along_axis(weights, columns, axis=1).astype(np.float32)
    starts.setflags(write=False)
    band_weights.setflags(write=False)
    return starts, band_weights


def _float_luma(image: Image.Image) -> np.ndarray:
    """The reference's luma as float32 [height, width]: Pillow's RGB to "F", 0.299 R + 0.587 G + 0.114 B in float32.

    Read in place through Arrow when Pillow keeps the image in one block (up to 4 MP at its default 16 MiB
    blocks; Pillow 11.2 and newer), else copied.
    """
    luma_image = image.convert("F")
    if hasattr(luma_image, "__arrow_c_array__"):
        import pyarrow  # only here: importing it costs the command line a tenth of a second

        try:
            exported = pyarrow.array(luma_image)  # zero-copy: the array keeps the image's memory alive
        except ValueError:  # Pillow holds the rows in several blocks
            exported = None
        if exported is not None:
            assert exported.type == pyarrow.float32() and len(exported) == image.width * image.height
            return np.frombuffer(exported.buffers()[1], dtype=np.float32).reshape(image.height, image.width)
    return np.asarray(luma_image)


def _reduce_rows(values: np.ndarray) -> np.ndarray:
    """[64, columns] float32: the two-pass Jarosz filter and decimation along axis 0 of `values` [side, columns]."""
    starts, weights = _bands(values.shape[0])
    band = weights.shape[1]
    if values.size <= _GATHER_VALUES:
        gathered = values[starts[:, None] + np.arange(band)].astype(np.float32, copy=False)  # [64, band, columns]
        return np.matmul(weights[:, None, :], gathered)[:, 0]
    rows = np.empty((_CELLS, values.shape[1]), dtype=np.float32)
    # bytes are widened one band at a time, into a buffer that stays in the CPU cache
    widened = None if values.dtype == np.float32 else np.empty((band, values.shape[1]), dtype=np.float32)
    for cell, start in enumerate(starts.tolist()):
        run = values[start : start + band]
        if widened is not None:
            np.copyto(widened, run, casting="unsafe")
            run = widened
        np.matmul(weights[cell], run, out=rows[cell])
    return rows


def _reduce_columns(luma_rows: np.ndarray) -> np.ndarray:
    """The reference's 64 x 64 float32 luma from the row-reduced luma [64, width]: the same filter along the columns."""
    column_starts, column_weights = _bands(luma_rows.shape[1])
    columns = luma_rows[:, column_starts[:, None] + np.arange(column_weights.shape[1])]  # [64, 64, band]
    return np.einsum("rcb,cb->rc", columns, column_weights).astype(np.float32)


def _pdq_of_cells(cells: np.ndarray) -> tuple[bytes, int]:
    return _bits(_dct16(cells)), _quality(cells)


def _quality(cells: np.ndarray) -> int:
    """pdqImageDomainQualityMetric: the sum of |int((u - v) * 100 / 255)| over neighbouring cells, // 90, at most 100."""
    down = np.trunc((cells[:-1, :] - cells[1:, :]) * np.float32(100) / np.float32(255))
    across = np.trunc((cells[:, :-1] - cells[:, 1:]) * np.float32(100) / np.float32(255))
    gradient_sum = int(np.abs(down).sum(dtype=np.int64)) + int(np.abs(across).sum(dtype=np.int64))
    return min(100, gradient_sum // 90)


@functools.lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    """The reference's 16 x 64 DCT rows 1..16: sqrt(2 / 64) cos(pi / 128 (i + 1) (2 j + 1)), as float32."""
    i = np.arange(1, 17)[:, None]
    j = np.arange(_CELLS)[None, :]
    matrix = (np.float32(np.sqrt(2.0 / _CELLS)) * np.cos((np.pi / 2.0 / _CELLS) * i * (2 * j + 1))).astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def _dct16(cells: np.ndarray) -> np.ndarray:
    dct = _dct_matrix()
    return dct @ cells @ dct.T


def _bits(coefficients: np.ndarray) -> bytes:
    """Bit 16 i + j is set where coefficient (i, j) exceeds the lower median; written from bit 255 down."""
    flat = coefficients.reshape(-1)
    median = np.partition(flat, flat.size // 2 - 1)[flat.size // 2 - 1]  # Torben's median of 256 values
    return np.packbits((flat > median)[::-1]).tobytes()
