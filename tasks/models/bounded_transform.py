"""open_clip's inference transform with bounded memory for images of any aspect ratio.

open_clip's 'shortest' transform resizes the image's shorter side to the model's input size S and then
keeps the centre S x S crop, so a 1 x 100000 banner would first become 224 x 22,400,000 pixels (15 GB).
`BoundedTransform` wraps the transform open_clip builds and computes only the pixels the centre crop keeps:

- A resize that makes at most `NAIVE_RESIZE_MAX_RATIO` times the crop's pixels runs exactly as open_clip
  runs it (every image the former 100:1 aspect-ratio limit let through keeps today's pixels byte for byte).
- A larger one computes the crop alone from the source rows and columns it depends on (the crop's source
  box plus the filter's support), with Pillow's own sampling grid, weights, 22-bit fixed-point arithmetic,
  8-bit rounding between its two passes and pass order, as the whole-image resize would: for 8-bit modes
  (L, RGB, RGBA, ...) the pixels equal open_clip's exactly, and memory stays within a few times the
  crop's source region. Other modes (I;16, I, F, P, 1) use Pillow's `resize(box=...)` on that region,
  pass by pass, within 2/255 of open_clip (Pillow keeps the box in float32).
- Everything after the resize and crop (mode conversion, ToTensor, Normalize) is open_clip's own.

Where each step runs: the host pipeline (tasks/models/embed.py `feed_model_batches`) applies
`pixel_step(transform)` to each image, and the model's side turns the batch into the model's input with
`model_input(transform, batch)`. For open_clip's shape, [resize, crop, RGB conversion, ToTensor, Normalize],
`BoundedTransform.pixels` (a `PixelTransform`) runs every step before ToTensor and returns the uint8 crop
[3, H, W], C-contiguous (a quarter of the float input's bytes to send between processes), and
`BoundedTransform.normalise` (a `Normalise`) does ToTensor's scaling and Normalize on a uint8 batch
[N, 3, H, W] on whatever device holds it, by a table of what torchvision's own float32 operations make of
each 8-bit level, so on any device the result equals `transform(image)` on the CPU bit for bit. Any other transform (one not of that shape, or a wrapper
around a `BoundedTransform`) is its own pixel step, and its output, float or not, is the model's input as it is.

Why not one `resize(box=...)`: Pillow (13) picks the order of its two passes from the whole source's size
against the output's, `horizontal_first = not (in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w))`,
so a box in a tall image (20 x 4000 -> 224 x 224 from a 4000-row source) runs the vertical pass first
while the whole-image resize (4000 -> 44,800 rows) runs the horizontal one first; each pass rounds to 8
bits, hence up to 24/255 apart. Which rule the installed Pillow follows is checked once per process on
a small image (`_pass_order_rule`); if neither known rule reproduces it, the Pillow-box path is used.

The wrapper is a plain picklable class (the decoding worker processes unpickle it) whose repr is the
wrapped transform's; the embedding identity describes open_clip's transform and is unchanged by it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# Resizes up to this many times the crop's pixels run as open_clip runs them: what the former 100:1
# aspect-ratio limit admitted (at most 100 S^2 pixels, 15 MB at 224 px), so those pixels never change.
NAIVE_RESIZE_MAX_RATIO = 100
# Pillow's resampling: 32 - 8 - 2 bits of fixed-point weights for 8-bit images (libImaging/Resample.c).
_PRECISION_BITS = 22
# Modes Pillow resamples 8 bits per band, as numpy holds them; RGBA and LA are resampled premultiplied.
_EIGHT_BIT_MODES = frozenset({"L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "RGBa", "La", "PA"})
_PREMULTIPLIED = {"RGBA": "RGBa", "LA": "La"}


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Pillow's bicubic_filter (a = -0.5), operation for operation so the doubles match.
    x = np.abs(x)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


# Pillow filter constant -> (filter, support in source pixels at scale 1).
_FILTERS: dict[int, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    int(Image.Resampling.BICUBIC): (_bicubic, 2.0),
    int(Image.Resampling.BILINEAR): (_bilinear, 1.0),
}


@dataclass(frozen=True)
class _Taps:
    """Pillow's coefficients for some output positions of one axis: first source index and fixed-point weights."""

    first: np.ndarray  # int64 [outputs]
    weights: np.ndarray  # int64 [outputs, ksize]; zero past each output's support

    @property
    def source_range(self) -> tuple[int, int]:
        return int(self.first.min()), int((self.first + self.weights.shape[1]).max())


def _taps(in_size: int, out_size: int, start: int, count: int, resample: int) -> _Taps:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for outputs [start, start + count) of a whole-axis resize."""
    function, filter_support = _FILTERS[resample]
    span = float(np.float32(in_size))  # the box Pillow resamples is float32, even for the whole image
    scale = span / out_size
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(start, start + count, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count_used = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first
    inverse = 1.0 / filterscale
    weights = np.zeros((count, ksize))
    total = np.zeros(count)
    for tap in range(ksize):  # summed tap by tap, in Pillow's order, so the normalisation rounds alike
        weight = np.where(tap < count_used, function(((tap + first).astype(np.float64) - center + 0.5) * inverse), 0.0)
        weights[:, tap] = weight
        total = total + weight
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << _PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return _Taps(first, fixed)


def _resample_axis(pixels: np.ndarray, axis: int, taps: _Taps, offset: int) -> np.ndarray:
    """One 8-bit pass of Pillow's resampling along `axis` (0 rows, 1 columns); `offset` is the source index of pixels[0]."""
    moved = np.moveaxis(pixels, axis, 0)
    accumulated = np.full((len(taps.first), *moved.shape[1:]), 1 << (_PRECISION_BITS - 1), dtype=np.int64)
    shape = (-1,) + (1,) * (moved.ndim - 1)
    for tap in range(taps.weights.shape[1]):
        source = np.clip(taps.first - offset + tap, 0, moved.shape[0] - 1)  # a clipped index carries weight 0
        accumulated += moved[source].astype(np.int64) * taps.weights[:, tap].reshape(shape)
    return np.moveaxis(np.clip(accumulated >> _PRECISION_BITS, 0, 255).astype(np.uint8), 0, axis)


def _horizontal_first(rule: str, in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether Pillow runs its horizontal pass first when resizing the whole image `in_size` -> `out_size` (w, h)."""
    if rule == "horizontal-first":  # Pillow before 13
        return True
    (in_w, in_h), (out_w, out_h) = in_size, out_size
    return not (in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2)


def _exact_region(image: Image.Image, resized: tuple[int, int], crop: tuple[int, int, int, int], resample: int, rule: str) -> Image.Image:
    """`image.resize(resized, resample).crop(crop)` for an 8-bit mode, computing the crop's pixels only."""
    (width, height), (out_w, out_h) = image.size, resized
    left, top, right, bottom = crop
    horizontal = _taps(width, out_w, left, right - left, resample) if out_w != width else None  # Pillow skips an unchanged axis
    vertical = _taps(height, out_h, top, bottom - top, resample) if out_h != height else None
    x0, x1 = horizontal.source_range if horizontal else (left, right)
    y0, y1 = vertical.source_range if vertical else (top, bottom)
    x1, y1 = min(x1, width), min(y1, height)
    region = image.crop((x0, y0, x1, y1))
    mode = image.mode
    if mode in _PREMULTIPLIED:
        region = region.convert(_PREMULTIPLIED[mode])
    pixels = np.asarray(region)

    def across(values: np.ndarray) -> np.ndarray:
        return _resample_axis(values, 1, horizontal, x0) if horizontal else values[:, left - x0 : right - x0]

    def down(values: np.ndarray) -> np.ndarray:
        return _resample_axis(values, 0, vertical, y0) if vertical else values[top - y0 : bottom - y0]

    pixels = down(across(pixels)) if _horizontal_first(rule, image.size, resized) else across(down(pixels))
    out = Image.frombytes(region.mode, (right - left, bottom - top), np.ascontiguousarray(pixels).tobytes())
    return out.convert(mode) if mode in _PREMULTIPLIED else out


def _pillow_box_region(image: Image.Image, resized: tuple[int, int], crop: tuple[int, int, int, int], resample: int, rule: str) -> Image.Image:
    """The crop of the resize by Pillow's `resize(box=...)` on the region it depends on, one pass at a time in the whole resize's order."""
    (width, height), (out_w, out_h) = image.size, resized
    left, top, right, bottom = crop
    scale_x, scale_y = width / out_w, height / out_h
    _, filter_support = _FILTERS.get(resample, (None, 3.0))
    margin_x, margin_y = filter_support * max(scale_x, 1.0) + 1, filter_support * max(scale_y, 1.0) + 1
    x0, x1 = max(0, math.floor(left * scale_x - margin_x)), min(width, math.ceil(right * scale_x + margin_x))
    y0, y1 = max(0, math.floor(top * scale_y - margin_y)), min(height, math.ceil(bottom * scale_y + margin_y))
    region = image.crop((x0, y0, x1, y1))
    box_x = (left * scale_x - x0, right * scale_x - x0)
    box_y = (top * scale_y - y0, bottom * scale_y - y0)

    def across(part: Image.Image) -> Image.Image:
        if out_w == width:
            return part.crop((left - x0, 0, right - x0, part.height))
        return part.resize((right - left, part.height), resample, box=(box_x[0], 0, box_x[1], part.height))

    def down(part: Image.Image) -> Image.Image:
        if out_h == height:
            return part.crop((0, top - y0, part.width, bottom - y0))
        return part.resize((part.width, bottom - top), resample, box=(0, box_y[0], part.width, box_y[1]))

    return down(across(region)) if _horizontal_first(rule, image.size, resized) else across(down(region))


_rule: list[str | None] = []  # this process's `_pass_order_rule`, found once


def _pass_order_rule() -> str | None:
    """Which pass order the installed Pillow follows ('size' or 'horizontal-first'), or None if the emulation reproduces neither."""
    if not _rule:
        # A tall downscale by more than twice the width's: Pillow 13 runs the vertical pass first, older Pillow the horizontal.
        probe = Image.fromarray(np.random.default_rng(7).integers(0, 256, (120, 10, 3), dtype=np.uint8))
        expected = np.asarray(probe.resize((4, 48), Image.Resampling.BICUBIC))
        found = None
        for rule in ("size", "horizontal-first"):
            emulated = np.asarray(_exact_region(probe, (4, 48), (0, 0, 4, 48), int(Image.Resampling.BICUBIC), rule))
            if np.array_equal(emulated, expected):
                found = rule
                break
        _rule.append(found)
    return _rule[0]


@dataclass(frozen=True)
class _ResizeThenCrop:
    """The shape of open_clip's 'shortest' inference transform: a resize of the shorter side, then a centre crop."""

    resize: object  # torchvision Resize(int) or open_clip ResizeKeepRatio(longest=0)
    resample: int  # the Pillow filter the resize uses on PIL images
    crop_size: tuple[int, int]  # (height, width)

    def resized_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) the resize makes of `image`, computed as the resize itself computes it."""
        width, height = image.size
        if type(self.resize).__name__ == "ResizeKeepRatio":
            new_h, new_w = self.resize.get_params(image, self.resize.size, self.resize.longest)
        else:
            from torchvision.transforms.functional import _compute_resized_output_size

            size = self.resize.size
            new_h, new_w = _compute_resized_output_size((height, width), [size] if isinstance(size, int) else list(size), self.resize.max_size)
        return new_w, new_h

    def crop_box(self, resized: tuple[int, int]) -> tuple[int, int, int, int] | None:
        """torchvision's centre crop of the resized image (left, top, right, bottom), or None when it would pad."""
        (width, height), (crop_h, crop_w) = resized, self.crop_size
        if crop_w > width or crop_h > height:
            return None
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
        return left, top, left + crop_w, top + crop_h


def _resize_then_crop(transform: object) -> _ResizeThenCrop | None:
    """The resize and crop leading `transform` when they can make a large image (open_clip's 'shortest'), else None."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, list) or len(steps) < 2:
        return None
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    resize, crop = steps[0], steps[1]
    if not isinstance(crop, CenterCrop):
        return None
    if isinstance(resize, Resize):
        size = resize.size
        if not (isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1)):
            return None  # both sides given ('squash'): never larger than asked
    elif type(resize).__name__ == "ResizeKeepRatio" and type(resize).__module__.startswith("open_clip"):
        if resize.longest != 0 or resize.random_scale_prob > 0 or resize.random_aspect_prob > 0:
            return None  # 'longest' fits the image inside the crop: never large
    else:
        return None
    filters = {InterpolationMode.BICUBIC: int(Image.Resampling.BICUBIC), InterpolationMode.BILINEAR: int(Image.Resampling.BILINEAR)}
    if resize.interpolation not in filters:
        return None
    crop_h, crop_w = crop.size
    return _ResizeThenCrop(resize, filters[resize.interpolation], (int(crop_h), int(crop_w)))


@dataclass(frozen=True)
class Normalise:
    """ToTensor's scaling and Normalize of open_clip's transform, on a uint8 batch [N, C, H, W] where it lies.

    Each channel has 256 possible values, so their normalised floats are computed once on the CPU with torchvision's
    own operations (to_tensor's `.to(float32).div(255)`, then normalize's `sub_(mean).div_(std)` in float32) and
    looked up: on any device the batch gets exactly the floats open_clip's preprocess makes on the CPU (CUDA's
    division by a scalar is a multiplication by its inverse, a bit apart), and the table moves to a device once,
    so a batch costs no blocking host-to-device copy.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pixels: "torch.Tensor") -> "torch.Tensor":
        import torch

        assert pixels.dtype == torch.uint8 and pixels.ndim == 4 and pixels.shape[1] == len(self.mean), (pixels.dtype, pixels.shape)
        table = self.table(pixels.device)
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
        for channel in range(pixels.shape[1]):  # one channel's int32 index at a time (a long index of the batch is 8 bytes a value)
            out[:, channel] = table[channel][pixels[:, channel].to(torch.int32)]
        return out

    def table(self, device: "torch.device") -> "torch.Tensor":
        """[C, 256] float32 on `device`: each channel's normalised value of every 8-bit level."""
        key = (self.mean, self.std, str(device))
        with _tables_lock:
            found = _tables.get(key)
            if found is None:
                import torch

                levels = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)  # to_tensor's scaling, on the CPU
                mean = torch.as_tensor(self.mean, dtype=torch.float32).view(-1, 1)
                std = torch.as_tensor(self.std, dtype=torch.float32).view(-1, 1)
                found = _tables[key] = levels.repeat(len(self.mean), 1).sub_(mean).div_(std).to(device)
            return found


_tables: dict[tuple, "torch.Tensor"] = {}
_tables_lock = threading.Lock()


@dataclass(frozen=True)
class _PixelSplit:
    """Where open_clip's transform leaves 8-bit pixels: the index of its ToTensor step, and what follows it as a batch step."""

    tensor_step: int
    normalise: Normalise


def _pixel_split(transform: object) -> _PixelSplit | None:
    """The split of a transform of open_clip's shape (..., RGB conversion, ToTensor, Normalize), else None."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, list) or len(steps) < 3:
        return None
    from torchvision.transforms import Normalize, ToTensor

    convert, to_tensor, normalize = steps[-3:]
    # a class (MaybeConvertMode) or a function (_convert_to_rgb): either names open_clip as its module
    from_open_clip = (getattr(convert, "__module__", None) or type(convert).__module__).startswith("open_clip")
    # open_clip's MaybeConvertMode("RGB") or its older _convert_to_rgb: ToTensor then always sees 8-bit RGB
    to_rgb = from_open_clip and (getattr(convert, "mode", None) == "RGB" or getattr(convert, "__name__", None) == "_convert_to_rgb")
    if not (to_rgb and isinstance(to_tensor, ToTensor) and type(normalize) is Normalize):
        return None
    mean, std = normalize.mean, normalize.std
    if not all(isinstance(values, (list, tuple)) and len(values) == 3 for values in (mean, std)):
        return None
    return _PixelSplit(len(steps) - 2, Normalise(tuple(float(v) for v in mean), tuple(float(v) for v in std)))


class BoundedTransform:
    """`transform` (open_clip's inference transform) with the resize limited to the pixels its centre crop keeps."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform
        self.resize_then_crop = _resize_then_crop(transform)  # None: the transform never makes a large image
        self.pixel_split = _pixel_split(transform)  # None: not open_clip's shape, so it has no uint8 step

    def __call__(self, image: object) -> object:
        cropped = self.bounded_crop(image)
        return self.transform(image) if cropped is None else self.after_crop(cropped)

    @property
    def pixels(self) -> "PixelTransform | None":
        """The per-image steps up to the uint8 crop, or None when the transform is not open_clip's shape."""
        return PixelTransform(self) if self.pixel_split is not None else None

    @property
    def normalise(self) -> Normalise | None:
        """The batch step after `pixels` (ToTensor's scaling, Normalize), or None when there is no `pixels`."""
        return self.pixel_split.normalise if self.pixel_split is not None else None

    def bounded_crop(self, image: object) -> Image.Image | None:
        """The centre crop of the resized image computed from its source region, or None when open_clip's own resize runs."""
        plan = self.resize_then_crop
        if plan is None or not isinstance(image, Image.Image):
            return None
        resized = plan.resized_size(image)
        crop = plan.crop_box(resized)
        crop_h, crop_w = plan.crop_size
        if crop is None or resized[0] * resized[1] <= NAIVE_RESIZE_MAX_RATIO * crop_h * crop_w:
            return None
        return self.crop_of_resize(image, resized, crop)

    def crop_of_resize(self, image: Image.Image, resized: tuple[int, int], crop: tuple[int, int, int, int]) -> Image.Image:
        """The centre crop of the resized image, computed from the source region it depends on."""
        resample = self.resize_then_crop.resample
        if resized == image.size:
            return image.crop(crop)  # torchvision leaves an image of the asked size as it is (no premultiplied round trip)
        rule = _pass_order_rule()
        if rule is not None and (image.mode in _EIGHT_BIT_MODES or image.mode in _PREMULTIPLIED):
            return _exact_region(image, resized, crop, resample, rule)
        return _pillow_box_region(image, resized, crop, resample, rule or "size")

    def after_crop(self, image: Image.Image) -> object:
        """The wrapped transform's steps after its resize and crop (mode conversion, ToTensor, Normalize)."""
        for step in self.transform.transforms[2:]:
            image = step(image)
        return image

    def before_tensor(self, image: Image.Image) -> Image.Image:
        """The wrapped transform's steps before ToTensor (resize bounded as in `__call__`, crop, RGB conversion)."""
        assert self.pixel_split is not None
        steps = self.transform.transforms
        cropped = self.bounded_crop(image)
        image, first = (image, 0) if cropped is None else (cropped, 2)
        for step in steps[first : self.pixel_split.tensor_step]:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return repr(self.transform)


class PixelTransform:
    """A `BoundedTransform`'s steps before ToTensor, returning the crop as uint8 [3, H, W], C-contiguous (picklable)."""

    def __init__(self, bounded: BoundedTransform) -> None:
        assert bounded.pixel_split is not None, "only a transform of open_clip's shape has a uint8 step"
        self.bounded = bounded

    def __call__(self, image: Image.Image) -> "torch.Tensor":
        import torch

        if not isinstance(image, Image.Image):
            raise TypeError(f"the pixel step takes a PIL image, not {type(image).__name__}")
        rgb = self.bounded.before_tensor(image)
        assert rgb.mode == "RGB", rgb.mode  # the RGB conversion step is the last one before ToTensor
        # to_tensor's own layout (HWC bytes viewed, then CHW made contiguous), without its float scaling
        pixels = torch.from_numpy(np.array(rgb, np.uint8, copy=True))
        return pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"PixelTransform({self.bounded!r})"


def pixel_step(transform: Callable) -> Callable:
    """What the host pipeline applies to each image for `transform`: a `BoundedTransform`'s uint8 `pixels` when it has
    them, else `transform` itself (its output is then the model's input)."""
    pixels = transform.pixels if isinstance(transform, BoundedTransform) else None
    return pixels if pixels is not None else transform


def model_input(transform: Callable, batch: "torch.Tensor") -> "torch.Tensor":
    """A stacked batch of `pixel_step(transform)` outputs made the model's input: uint8 crops normalised where they
    lie (`BoundedTransform.normalise`); any other batch is the model's input as it is."""
    import torch

    normalise = transform.normalise if isinstance(transform, BoundedTransform) else None
    if normalise is not None and batch.dtype == torch.uint8:
        return normalise(batch)
    return batch
