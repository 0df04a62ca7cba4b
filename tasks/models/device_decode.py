"""The device half of `decode_mode="gpu"`: JPEG bytes decoded in batches on the model's device, hashed and transformed there.

Decoding is TorchCodec's `decode_jpeg(list, device=...)`: on CUDA one nvJPEG call per batch (baseline JPEGs on
the A100/H100 hardware engine, others on nvJPEG's CUDA backend), on the CPU libjpeg-turbo, whose pixels equal
Pillow's (the tests check it). The bytes come without APP1 (tasks/io/device_jpeg.py `without_app1`), so the
decoder applies no EXIF orientation of its own reading; `orient` applies the one Pillow read, as the CPU path's
`exif_transpose` does.

- A batch call fails as a whole when one image in it fails, so a failed call is split in halves until each
  failing image is alone; that image gets `None` (the caller decodes it on the CPU path and counts why).
- Device memory is bounded per call: images are decoded in groups of at most `DECODED_BYTES_PER_CALL` decoded
  bytes (one image larger than that is decoded alone), and each image is hashed and resized on its own (float
  conversion one image at a time) and dropped, leaving only its uint8 crop.
- An image whose decoded size is not what its header said also gets `None`, so every pixel that reaches the
  model is the header-checked image; so does one whose resize or hash runs out of device memory (its float copies).
- PDQ is taken from the pixels as stored (tasks/hashes/device_pdq.py), as the CPU path takes it before
  `exif_transpose`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tasks.hashes.device_pdq import pdq_of_pixels
from tasks.io.device_jpeg import DeviceJpeg
from tasks.models.device_transform import DeviceTransform, orient

# Decoded RGB bytes one decoder call may make on the device: 100 photos of 2 MP, or 1,300 images of 512 px.
DECODED_BYTES_PER_CALL = 768 << 20


@dataclass(frozen=True)
class DeviceInput:
    """One image decoded on the device: the model's uint8 [3, S, S] crop (on the device) and the PDQ of its stored pixels."""

    pixels: torch.Tensor
    pdq: tuple[bytes, int]


def decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG decoded as uint8 RGB [3, H, W] on `device`, EXIF orientation applied; None for one the decoder refuses."""
    from torchcodec.decoders import decode_jpeg

    def decoded(first: int, last: int) -> list[torch.Tensor | None]:
        try:
            return list(decode_jpeg(list(datas[first:last]), mode="RGB", device=device))
        except Exception:  # noqa: BLE001 - whatever the decoder raises (corrupt data, device memory) is one of these images'
            if last - first == 1:
                return [None]
            middle = (first + last) // 2  # one bad image fails the whole call: find it by halves
            return decoded(first, middle) + decoded(middle, last)

    return decoded(0, len(datas)) if datas else []


def _groups(jpegs: Sequence[DeviceJpeg], limit: int) -> Iterator[tuple[int, int]]:
    """[first, last) runs of `jpegs` of at most `limit` decoded bytes each (an image over it alone)."""
    first, held = 0, 0
    for index, jpeg in enumerate(jpegs):
        if index > first and held + jpeg.decoded_bytes > limit:
            yield first, index
            first, held = index, 0
        held += jpeg.decoded_bytes
    if first < len(jpegs):
        yield first, len(jpegs)


def device_inputs(jpegs: Sequence[DeviceJpeg], transform: DeviceTransform, device: torch.device,
                  limit: int = DECODED_BYTES_PER_CALL) -> list[DeviceInput | None]:
    """Each JPEG decoded, hashed and transformed on `device`, in order; None for one the CPU path must decode."""
    results: list[DeviceInput | None] = []
    for first, last in _groups(jpegs, limit):
        group = jpegs[first:last]
        decoded = decode_jpegs([jpeg.data for jpeg in group], device)
        for index, jpeg in enumerate(group):
            stored, decoded[index] = decoded[index], None  # each decoded image is dropped once its crop is made
            if stored is None or tuple(stored.shape) != (3, jpeg.height, jpeg.width):
                results.append(None)
                continue
            try:
                results.append(DeviceInput(transform.pixels(orient(stored, jpeg.orientation)), pdq_of_pixels(stored)))
                out_of_memory = False
            except torch.OutOfMemoryError:  # the image's float copies did not fit beside the model: the CPU path takes it
                results.append(None)
                out_of_memory = True
            del stored
            if out_of_memory and torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results
