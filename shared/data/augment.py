"""Augmentations on whole batches of image tensors, each image with its own random draw.

torchvision's v2 transforms draw one set of parameters per call, so a batch would get the
same crop everywhere. Here the draws are made per image (`MultiCrop.draw`), and each step is
a function of the batch and those draws, tested against torchvision's functional op with
the same parameters. The same code runs in the CPU data-loader workers (uint8 crops, like
PIL, through torch's SIMD path) or on the GPU after the uint8 batch is transferred.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma (PIL's; torchvision's is 0.2989)
BLUR_SIGMA = (0.1, 2.0)  # DINO's blur radius range for 224 px crops


def no_autocast(fn):
    """Augment in fp32 even inside a mixed-precision step (mixed dtypes break index_put)."""

    def wrapped(self, images, *args, **kwargs):
        with torch.autocast(device_type=images.device.type, enabled=False):
            return fn(self, images, *args, **kwargs)

    return wrapped


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float in [0, 1]."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _bernoulli(n: int, p: float, device, generator=None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) < p


def _on_subset(x: torch.Tensor, apply: torch.Tensor, fn) -> torch.Tensor:
    """`fn(x[idx], idx)` for the images drawn (idx: where `apply`), the rest untouched.

    Computing only the chosen images saves most of the work of rare steps (blur p 0.1 on
    global view 2, solarize p 0.2); index_select / index_copy are several times faster on
    the CPU than boolean indexing.
    """
    idx = apply.flatten().nonzero().flatten()
    if len(idx) == 0:
        return x
    if len(idx) == len(x):
        return fn(x, idx)
    return x.index_copy(0, idx, fn(x.index_select(0, idx), idx))


def random_resized_crop_boxes(
    n: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    device=None,
    generator=None,
    whole_pixels: bool = True,
) -> torch.Tensor:
    """Per-image crop boxes [n, 4] (x1, y1, x2, y2) like RandomResizedCrop.

    Area fraction ~ U(scale) of each image's own area, log aspect ~ U(log ratio); boxes that
    do not fit are shrunk to fit instead of re-drawn (a vectorised stand-in for torchvision's
    10 tries). `height` / `width`: one size for all, or [n] tensors, each image its own (whole
    images at their own aspect, padded into one batch). Whole pixels (int64, torchvision's
    boxes): sides rounded, the position uniform over the places the box fits. Otherwise
    (float32, same draws): sides and position continuous, for `subpixel_crops`.
    """
    height, width = (
        torch.as_tensor(v, dtype=torch.float32, device=device) for v in (height, width)
    )
    area = height * width
    u = torch.rand(n, 3, device=device, generator=generator)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w, h = torch.sqrt(target * aspect), torch.sqrt(target / aspect)
    pos = torch.rand(n, 2, device=device, generator=generator)
    if not whole_pixels:
        w, h = torch.minimum(w, width), torch.minimum(h, height)
        x1, y1 = pos[:, 0] * (width - w), pos[:, 1] * (height - h)
        return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
    w = torch.minimum(w.round().clamp(min=1), width)
    h = torch.minimum(h.round().clamp(min=1), height)
    x1 = torch.minimum((pos[:, 0] * (width - w + 1)).floor(), width - w)
    y1 = torch.minimum((pos[:, 1] * (height - h + 1)).floor(), height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1).long()


def resized_crops(
    x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Each image's box [n, 4] resized to size x size, mirrored where `flip` [n] is set.

    Bilinear with antialiasing, torchvision's `resized_crop` (a triangle filter as wide as the
    shrink factor, so shrinking averages like PIL; enlarging is plain bilinear). One call per
    image: boxes differ in size. uint8 images on the CPU take torch's SIMD uint8 path (about
    10x faster than float, rounded to uint8 as PIL is); pass them channels-last to save a
    conversion per image. The views have x's dtype.
    """
    n, c = x.shape[:2]
    out = x.new_empty(n, c, size, size)
    flips = flip.tolist() if flip is not None else [False] * n
    for i, ((x1, y1, x2, y2), mirror) in enumerate(zip(boxes.tolist(), flips, strict=True)):
        y = F.interpolate(
            x[i : i + 1, :, y1:y2, x1:x2],
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        out[i].copy_(y.flip(-1) if mirror else y)
    return out


def subpixel_crops(
    x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Each image's continuous box [n, 4] (float) resampled to size x size, mirrored where
    `flip` [n] is set; float32 views (uint8 images keep their 0-255 scale).

    torchvision's `roi_align` with `aligned=True` (pixel centres at +0.5, as in resizing) and
    adaptive sampling (ceil(box side / size) bilinear samples per output pixel and axis): an
    enlarging crop is plain bilinear, a shrinking one averages like a box filter. Unlike
    whole-pixel boxes, the crop's scale and its sampling phase vary continuously, which is
    a richer augmentation when boxes are only a few pixels wide (small stored images).
    """
    from torchvision.ops import roi_align  # only this path needs it

    n = x.shape[0]
    index = torch.arange(n, device=x.device, dtype=torch.float32)[:, None]
    rois = torch.cat([index, boxes.to(device=x.device, dtype=torch.float32)], 1)
    y = roi_align(x.float().contiguous(), rois, (size, size), sampling_ratio=0, aligned=True)
    if flip is not None and bool(flip.any()):
        y = torch.where(flip.view(-1, 1, 1, 1), y.flip(-1), y)
    return y


def image_sizes(images: torch.Tensor, sizes: torch.Tensor | None):
    """(heights, widths) to draw crop boxes in: the batch's H, W, or per image from `sizes`."""
    if sizes is None:
        return images.shape[2], images.shape[3]
    sizes = torch.as_tensor(sizes, device=images.device)
    return sizes[:, 0], sizes[:, 1]


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [3, h_i, w_i] of different sizes -> (one batch [B, 3, H, W], sizes [B, 2]).

    Each image sits top-left, its last row and column repeated into the padding: a crop box
    inside the image then samples exactly what it would from the image alone, even where
    bilinear sampling at the border reaches one pixel past it (roi_align clamps there too)."""
    sizes = torch.tensor([img.shape[1:] for img in images], dtype=torch.int64)
    height, width = sizes.max(0).values.tolist()
    out = images[0].new_empty(len(images), images[0].shape[0], height, width)
    for i, img in enumerate(images):
        h, w = img.shape[1:]
        out[i, :, :h, :w] = img
        out[i, :, h:, :w] = img[:, h - 1 : h, :]
        out[i, :, :, w:] = out[i, :, :, w - 1 : w]
    return out, sizes


class TransformBatch:
    """Train-loader collate: replaces a batch's uint8 `images` by `views = transform(images)`.

    Runs where the batch is fetched, so in each loader worker (each with one torch thread)
    or in the main process at `num_workers=0`.
    """

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        images, sizes = batch.pop("images"), batch.pop("sizes", None)
        # `sizes` only with whole images (a shard store): a transform for squares needs none
        batch["views"] = (
            self.transform(images) if sizes is None else self.transform(images, sizes=sizes)
        )
        return batch


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """uint8 CPU images channels-last: the layout of torch's SIMD resampling path."""
    if x.dtype == torch.uint8 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = GRAY_WEIGHTS
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def _hue_matrix(angle: torch.Tensor) -> torch.Tensor:
    """Per-image 3x3 colour matrices that rotate chroma in YIQ space by `angle` (radians)."""
    yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        device=angle.device,
        dtype=angle.dtype,
    )
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(angle.shape[0], 3, 3, device=angle.device, dtype=angle.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return torch.linalg.inv(yiq) @ rot @ yiq


def color_jitter(
    x: torch.Tensor, u: torch.Tensor, strength: tuple, apply: torch.Tensor
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue of the images where `apply` [B], in that
    fixed order, each clamped to [0, 1]; u [B, 4] in [-1, 1], `strength` 4 floats.

    Brightness, contrast, saturation: torchvision's `adjust_*` with factor 1 + strength * u
    (contrast blends with the mean luma, saturation with each pixel's luma). Hue: chroma
    rotated in YIQ space by strength * u turns (a linear stand-in for torchvision's HSV
    shift, which keeps luma). A zero strength skips its step.
    """
    bri, con, sat, hue = strength

    def jitter(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        f = u.index_select(0, idx).to(y.dtype)
        factor = [(1 + s * f[:, k]).view(-1, 1, 1, 1) for k, s in enumerate(strength)]
        if bri:
            y = (y * factor[0]).clamp_(0, 1)
        if con:
            w = torch.tensor(GRAY_WEIGHTS, device=y.device, dtype=y.dtype)
            mean = (y.mean((2, 3)) * w).sum(1).view(-1, 1, 1, 1)
            y = (y * factor[1]).add_(mean * (1 - factor[1])).clamp_(0, 1)
        if sat:
            y = (y * factor[2]).add_(_gray(y) * (1 - factor[2])).clamp_(0, 1)
        if hue:
            m = _hue_matrix(f[:, 3] * hue * 2 * math.pi)
            y = torch.bmm(m, y.flatten(2)).view_as(y).clamp_(0, 1)
        return y

    return _on_subset(x, apply, jitter) if any(strength) else x


def grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """The images where `apply` [B] turned to their luma on all three channels."""
    return _on_subset(x, apply, lambda y, _: _gray(y).expand_as(y).contiguous())


def blur_sigmas(u: torch.Tensor, size: int, sigma=BLUR_SIGMA) -> torch.Tensor:
    """Blur sigmas ~ U(sigma) from u ~ U(0, 1), scaled by size / 224.

    DINO blurs 224 px crops with radius U(0.1, 2); a smaller crop gets a proportionally
    smaller sigma, so the blur covers the same fraction of the image.
    """
    s = sigma[0] + (sigma[1] - sigma[0]) * u
    return (s * size / 224).clamp(min=1e-3)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """The images where `apply` [B] blurred, each with its own sigma [B]: torchvision's
    `gaussian_blur` with a kernel of 2 ceil(3 sigma) + 1 taps and reflect padding."""

    def blur(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        s = sigma.index_select(0, idx).to(y.dtype)[:, None]
        radii = torch.ceil(3 * s).clamp(min=1)
        r = int(radii.max())  # shorter kernels are zero beyond their own radius
        t = torch.arange(-r, r + 1, device=y.device, dtype=y.dtype)
        k = torch.exp(-(t**2) / (2 * s**2)) * (t.abs() <= radii)
        return _blur(y, k / k.sum(1, keepdim=True), r)

    return _on_subset(x, apply, blur)


def _blur(y: torch.Tensor, k: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable blur of y [n, c, h, w] with per-image kernels k [n, 2r + 1], reflect padding.

    Shifted multiply-adds, one per tap and axis: the same sums as a grouped conv2d with one
    kernel per (image, channel), about twice as fast on the CPU.
    """
    n, _, h, w = y.shape
    taps = k.view(n, 1, 1, 1, -1)
    p = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    out = p[..., 0:w] * taps[..., 0]
    for t in range(1, k.shape[1]):
        out.addcmul_(p[..., t : t + w], taps[..., t])
    p = F.pad(out, (0, 0, radius, radius), mode="reflect")
    out = p[..., 0:h, :] * taps[..., 0]
    for t in range(1, k.shape[1]):
        out.addcmul_(p[..., t : t + h, :], taps[..., t])
    return out


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The images where `apply` [B] solarized: values >= threshold inverted (torchvision's)."""
    return _on_subset(x, apply, lambda y, _: torch.where(y >= threshold, 1 - y, y))


@dataclass
class ViewRecipe:
    """One DINO view: crop size and scale plus its blur / solarize probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


@dataclass
class ViewDraw:
    """Every random draw of one view for a batch, in the order the steps run (crop, flip,
    jitter, grayscale, blur, solarize)."""

    boxes: torch.Tensor  # [B, 4] x1, y1, x2, y2
    flip: torch.Tensor  # [B] bool
    jitter_u: torch.Tensor  # [B, 4] in [-1, 1]: brightness, contrast, saturation, hue
    jitter: torch.Tensor  # [B] bool
    gray: torch.Tensor | None  # [B] bool; None: not drawn (TrainTransform)
    blur: torch.Tensor | None  # [B] bool, None when the recipe never blurs
    sigma_u: torch.Tensor | None  # [B] in [0, 1)
    solarize: torch.Tensor | None  # [B] bool


def draw_view(
    b: int,
    h: int | torch.Tensor,
    w: int | torch.Tensor,
    scale,
    flip_p: float,
    jitter_p: float,
    grayscale_p: float | None,
    blur_p: float = 0.0,
    solarize_p: float = 0.0,
    whole_pixels: bool = True,
    device=None,
    generator=None,
) -> ViewDraw:
    """All random choices (a `ViewDraw`) of one view for b images of h x w pixels (ints, or
    [b] tensors: each image its own size).

    grayscale_p None draws no grayscale flags; a zero blur_p / solarize_p draws nothing for
    that step. One generator state therefore gives one set of views.
    """
    dev, gen = device, generator
    boxes = random_resized_crop_boxes(
        b, h, w, scale, device=dev, generator=gen, whole_pixels=whole_pixels
    )
    flip = _bernoulli(b, flip_p, dev, gen)
    jitter_u = torch.rand(b, 4, device=dev, generator=gen) * 2 - 1
    jitter = _bernoulli(b, jitter_p, dev, gen)
    gray = None if grayscale_p is None else _bernoulli(b, grayscale_p, dev, gen)
    blur = sigma_u = solar = None
    if blur_p > 0:
        blur = _bernoulli(b, blur_p, dev, gen)
        sigma_u = torch.rand(b, device=dev, generator=gen)
    if solarize_p > 0:
        solar = _bernoulli(b, solarize_p, dev, gen)
    return ViewDraw(boxes, flip, jitter_u, jitter, gray, blur, sigma_u, solar)


def apply_view(
    src: torch.Tensor, d: ViewDraw, size: int, jitter: tuple, mean, std, subpixel: bool = False
) -> torch.Tensor:
    """The view of `src` [B, 3, H, W] (uint8, or float in [0, 1]) that the draws `d` give:
    crop (flip folded in), colour jitter, grayscale, blur, solarize, normalise."""
    crop = subpixel_crops if subpixel else resized_crops
    y = crop(src, d.boxes, size, d.flip).float()
    y = y.div_(255.0) if src.dtype == torch.uint8 else y
    y = color_jitter(y, d.jitter_u, jitter, d.jitter)
    if d.gray is not None:
        y = grayscale(y, d.gray)
    if d.blur is not None:
        y = gaussian_blur(y, blur_sigmas(d.sigma_u, size), d.blur)
    if d.solarize is not None:
        y = solarize(y, d.solarize)
    return normalize(y, mean, std)


class MultiCrop:
    """DINO multi-crop on a uint8 batch: 2 global views + `n_local` local views.

    Defaults follow Caron et al. 2021 (Emerging Properties in Self-Supervised Vision
    Transformers, appendix): global scale (0.4, 1), local (0.05, 0.4),
    flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, blur 1.0 / 0.1 /
    0.5 (global 1 / global 2 / locals), solarize 0.2 on global 2 only. Sizes are parameters
    so small images (the 64 px synthetic set) use proportionally small crops.

    `subpixel_boxes`: crop continuous boxes (`subpixel_crops`, roi_align) instead of
    torchvision's whole-pixel ones. Same draws; it matters when boxes are a few pixels wide.
    """

    def __init__(
        self,
        global_size: int = 64,
        local_size: int = 32,
        n_local: int = 4,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.0),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.0,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize_p: float = 0.2,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        subpixel_boxes: bool = True,
    ) -> None:
        gs, ls = tuple(global_scale), tuple(local_scale)
        self.subpixel_boxes = subpixel_boxes
        self.views = [
            ViewRecipe(global_size, gs, blur_p[0], 0.0),
            ViewRecipe(global_size, gs, blur_p[1], solarize_p),
        ] + [ViewRecipe(local_size, ls, blur_p[2], 0.0) for _ in range(n_local)]
        for name, size in (("global_size", global_size), ("local_size", local_size)):
            if size < 2:  # a blur's reflect padding needs a pixel beside the edge one
                raise ValueError(f"multicrop.{name} must be at least 2 px, got {size}")
        self.flip_p, self.jitter, self.jitter_p = flip_p, tuple(jitter), jitter_p
        self.grayscale_p, self.mean, self.std = grayscale_p, mean, std
        self.n_global = 2

    def view(
        self, src: torch.Tensor, recipe: ViewRecipe, generator=None, sizes=None
    ) -> torch.Tensor:
        """One view of a batch `src` [B, 3, H, W], uint8 or float in [0, 1]; `sizes` [B, 2]:
        each image's (h, w) in the top-left of a padded batch (None: all H x W)."""
        h, w = image_sizes(src, sizes)
        d = draw_view(
            src.shape[0], h, w, recipe.scale, self.flip_p,
            self.jitter_p, self.grayscale_p, recipe.blur_p, recipe.solarize_p,
            whole_pixels=not self.subpixel_boxes, device=src.device, generator=generator,
        )  # fmt: skip
        return apply_view(
            src, d, recipe.size, self.jitter, self.mean, self.std, self.subpixel_boxes
        )

    @no_autocast
    def __call__(self, images: torch.Tensor, generator=None, sizes=None) -> list[torch.Tensor]:
        # uint8 on the CPU: cropped in uint8 (channels-last once for all views, the fast
        # path), then made float. Elsewhere float first (CUDA has no uint8 antialiased resize).
        src = _fast_layout(images) if images.device.type == "cpu" else to_float(images)
        return [self.view(src, r, generator, sizes) for r in self.views]


class EvalTransform:
    """Un-augmented view for evaluation: resize the stored image to `size`, normalise."""

    def __init__(self, size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.mean, self.std = size, mean, std

    @no_autocast
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images)
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        return normalize(x, self.mean, self.std)


class TrainTransform:
    """Light augmentation for metric learning: random resized crop (mild), flip, jitter."""

    def __init__(
        self,
        size: int,
        scale=(0.5, 1.0),
        flip_p=0.5,
        jitter=(0.2, 0.2, 0.1, 0.02),
        jitter_p=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        self.size, self.scale, self.flip_p = size, tuple(scale), flip_p
        self.jitter, self.jitter_p, self.mean, self.std = tuple(jitter), jitter_p, mean, std

    @no_autocast
    def __call__(self, images: torch.Tensor, generator=None, sizes=None) -> torch.Tensor:
        h, w = image_sizes(images, sizes)
        d = draw_view(images.shape[0], h, w, self.scale, self.flip_p, self.jitter_p, None,
                      device=images.device, generator=generator)  # fmt: skip
        src = _fast_layout(images) if images.device.type == "cpu" else to_float(images)
        return apply_view(src, d, self.size, self.jitter, self.mean, self.std)
