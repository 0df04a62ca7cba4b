"""open_clip's inference transform on a decoded uint8 tensor, where the tensor lives (the GPU in `decode_mode="gpu"`).

open_clip's 'shortest' inference transform is torchvision's `Resize(S)` of the shorter side on a PIL image, a
centre crop of S x S, ToTensor and Normalize. `DeviceTransform.pixels` computes the first two steps on a
[3, H, W] uint8 tensor: the output size and crop box exactly as torchvision computes them, and the resize as
`F.interpolate(..., antialias=True)` in float32 (PyTorch's port of Pillow's separable filters, a = -0.5 for
bicubic) on one image at a time, clamped to 0..255 and rounded to 8 bits as Pillow stores its result. What
differs from Pillow is only Pillow's 22-bit fixed-point weights and its rounding to 8 bits between its two
passes: on the test photos the model input is within a mean of 0.5/255 (tests/test_device_decode.py). The
result is uint8 [3, S, S], normalised with the model's mean and std in the batch (tasks/models/embed.py), as the
CPU path's crops are. 'squash' (both sides to S) is the same resize without the crop.

Images whose resize would make over `NAIVE_RESIZE_MAX_RATIO` times the crop's pixels (a 1 x 100000 banner) are
not for this path: the CPU's bounded transform (tasks/models/bounded_transform.py) computes only their crop, so
`fits` says so before decoding and the caller sends them there. `orient` applies an EXIF orientation to the tensor
as Pillow's `ImageOps.exif_transpose` does to an image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tasks.errors import UserError
from tasks.models.bounded_transform import NAIVE_RESIZE_MAX_RATIO

_INTERPOLATIONS = ("bicubic", "bilinear")
_RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class DeviceTransform:
    """The resize and centre crop of a model's open_clip inference transform, for tensors."""

    crop_size: tuple[int, int]  # (height, width) the model takes
    interpolation: str  # 'bicubic' or 'bilinear'
    resize_mode: str  # 'shortest' (resize the shorter side, centre crop) or 'squash' (both sides)

    @classmethod
    def of(cls, preprocess_cfg: Mapping[str, object]) -> "DeviceTransform":
        """The transform for open_clip's preprocess config (ClipWeights.preprocess_cfg); UserError for one it cannot reproduce."""
        size = preprocess_cfg.get("size")
        crop = (int(size), int(size)) if isinstance(size, int) else tuple(int(side) for side in size)  # type: ignore[union-attr]
        interpolation, resize_mode = preprocess_cfg.get("interpolation"), preprocess_cfg.get("resize_mode")
        if interpolation not in _INTERPOLATIONS or resize_mode not in _RESIZE_MODES or len(crop) != 2:
            raise UserError(
                f"decode_mode 'gpu' reproduces open_clip's {'/'.join(_RESIZE_MODES)} resize with {'/'.join(_INTERPOLATIONS)} "
                f"interpolation, and this model's preprocessing is {resize_mode!r} with {interpolation!r}; use decode_mode 'exact'."
            )
        if resize_mode == "shortest" and crop[0] != crop[1]:
            raise UserError(f"decode_mode 'gpu' needs a square input for the 'shortest' resize, and this model takes {crop}; use decode_mode 'exact'.")
        return cls(crop, str(interpolation), str(resize_mode))

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, as torchvision's Resize computes it for an int size (or both sides when squashing)."""
        if self.resize_mode == "squash":
            return self.crop_size
        side = self.crop_size[0]
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = side, int(side * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def crop_box(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of torchvision's centre crop of a resized (height, width) image."""
        crop_h, crop_w = self.crop_size
        return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))

    def fits(self, height: int, width: int) -> bool:
        """Whether the whole resize stays within NAIVE_RESIZE_MAX_RATIO crops (else the CPU's bounded transform takes the image)."""
        new_h, new_w = self.resized_size(height, width)
        return new_h * new_w <= NAIVE_RESIZE_MAX_RATIO * self.crop_size[0] * self.crop_size[1]

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """The model's uint8 [3, S, S] crop of one decoded image (uint8 [3, H, W], oriented), on the image's device."""
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3, "a decoded RGB image, uint8 [3, H, W]"
        height, width = int(image.shape[1]), int(image.shape[2])
        new_h, new_w = self.resized_size(height, width)
        if (new_h, new_w) != (height, width):  # torchvision leaves an image of the asked size as it is
            # float32 for one image at a time: a batch of decoded photos in float would hold 4x their bytes
            resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode=self.interpolation, antialias=True, align_corners=False)
            image = resized[0].clamp_(0, 255).round_().to(torch.uint8)
        if self.resize_mode == "squash":
            return image.contiguous()
        top, left = self.crop_box(new_h, new_w)
        crop_h, crop_w = self.crop_size
        return image[:, top : top + crop_h, left : left + crop_w].contiguous()


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """The [C, H, W] image turned upright by its EXIF orientation (1-8), as Pillow's `exif_transpose` does."""
    if orientation == 2:  # mirrored left to right
        return image.flip(-1)
    if orientation == 3:  # rotated 180
        return image.flip(-2, -1)
    if orientation == 4:  # mirrored top to bottom
        return image.flip(-2)
    if orientation == 5:  # Pillow's TRANSPOSE
        return image.transpose(-2, -1)
    if orientation == 6:  # Pillow's ROTATE_270: a quarter turn clockwise
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:  # Pillow's TRANSVERSE
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # Pillow's ROTATE_90: a quarter turn counter-clockwise
        return torch.rot90(image, 1, dims=(-2, -1))
    return image
