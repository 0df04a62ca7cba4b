"""PDQ of decoded pixels where they lie (the GPU in `decode_mode="gpu"`), so no image is decoded a second time for it.

The reference's steps up to its 64 x 64 luma (tasks/hashes/image_hashes.py): float32 luma `0.299 R + 0.587 G +
0.114 B`, then the two-pass Jarosz box filter and decimation along each axis, which are linear, so each axis is
one [64, side] weight matrix (the same bands `image_hashes` uses) and the 64 x 64 cells are `rows @ luma @
columns^T`, two matrix products on the device. The cells (16 KB) come back to the host, where the DCT, the
median threshold and the quality are the CPU path's own code. Float sums in another order move a cell by about
1e-5, which flips a bit only where a coefficient sits on the median: on the test photos the hash is within a few
bits of the reference (tests/test_device_decode.py measures it), against the 31 a match allows.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from tasks.hashes.image_hashes import MIN_HASHABLE_SIDE, PDQ_BYTES, _bands, _pdq_of_cells

_CELLS = 64


@functools.lru_cache(maxsize=256)
def _axis_weights(side: int) -> np.ndarray:
    """[64, side] float32: the filter and decimation along one axis of `side` pixels, as a dense matrix."""
    starts, band_weights = _bands(side)
    dense = np.zeros((_CELLS, side), dtype=np.float32)
    columns = starts[:, None] + np.arange(band_weights.shape[1])[None, :]
    np.put_along_axis(dense, columns, band_weights, axis=1)
    return dense


def pdq_cells(pixels: torch.Tensor) -> np.ndarray:
    """The reference's 64 x 64 float32 luma of RGB pixels (uint8 [3, H, W], on any device), as a host array."""
    assert pixels.dtype == torch.uint8 and pixels.ndim == 3 and pixels.shape[0] == 3, "RGB pixels, uint8 [3, H, W]"
    _, height, width = pixels.shape
    device = pixels.device
    luma = torch.zeros((height, width), dtype=torch.float32, device=device)
    for channel, weight in enumerate((0.299, 0.587, 0.114)):  # one float32 plane at a time, as the reference sums them
        luma.add_(pixels[channel], alpha=weight)
    rows = torch.tensor(_axis_weights(int(height)), device=device)  # a copy: the cached matrix stays unshared
    columns = torch.tensor(_axis_weights(int(width)), device=device)
    return (rows @ luma @ columns.T).cpu().numpy()


def pdq_of_pixels(pixels: torch.Tensor) -> tuple[bytes, int]:
    """PDQ of RGB pixels (uint8 [3, H, W], as the file stores them: before EXIF orientation): 32 bytes and quality 0-100."""
    if pixels.shape[1] < MIN_HASHABLE_SIDE or pixels.shape[2] < MIN_HASHABLE_SIDE:
        return bytes(PDQ_BYTES), 0
    return _pdq_of_cells(pdq_cells(pixels))
