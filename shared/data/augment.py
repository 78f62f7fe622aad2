"""Augmentations on whole batches of image tensors, each image with its own random draw.

torchvision's v2 transforms draw one set of parameters per call, so a batch would get the
same crop everywhere. These functions draw per image and stay vectorised, so they run on
the GPU right after the batch is transferred (uint8 over the bus, float on the device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """`fn(x[i], i)` for the images drawn (`apply[i]`), the rest untouched.

    Computing only the chosen images, instead of all then selecting with `where`, saves most
    of the work of rare steps (blur p 0.1 on global view 2, solarize p 0.2).
    """
    idx = apply.flatten().nonzero().flatten()
    if len(idx) == 0:
        return x
    if len(idx) == len(x):
        return fn(x, idx)
    out = x.clone()
    out[idx] = fn(x[idx], idx)
    return out


def random_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    device=None,
    generator=None,
) -> torch.Tensor:
    """Per-image crop boxes [n, 4] (x1, y1, x2, y2) like RandomResizedCrop.

    Area fraction ~ U(scale), log aspect ~ U(log ratio); boxes that do not fit are
    shrunk to fit instead of re-drawn (a vectorised stand-in for torchvision's 10 tries).
    """
    area = height * width
    u = torch.rand(n, 3, device=device, generator=generator)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect).clamp(max=width)
    h = torch.sqrt(target / aspect).clamp(max=height)
    pos = torch.rand(n, 2, device=device, generator=generator)
    x1 = pos[:, 0] * (width - w)
    y1 = pos[:, 1] * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def random_resized_crop(
    x: torch.Tensor, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None
) -> torch.Tensor:
    """Crop a different random box from every image and resize it to `size` (bilinear)."""
    b, _, h, w = x.shape
    boxes = random_resized_crop_boxes(b, h, w, scale, ratio, x.device, generator)
    rois = torch.cat([torch.arange(b, device=x.device, dtype=x.dtype)[:, None], boxes.to(x)], 1)
    # aligned=True treats pixel centres at +0.5, the same convention as resize.
    # sampling_ratio=0 (adaptive: ceil(box / size) samples per output pixel and axis) makes an
    # enlarging crop plain bilinear resampling and a shrinking one a box-filtered average; a
    # fixed 2 would also average two points half a pixel apart, blurring enlarged crops.
    return roi_align(
        x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True
    )


def random_hflip(x: torch.Tensor, p: float = 0.5, generator=None) -> torch.Tensor:
    flip = _bernoulli(x.shape[0], p, x.device, generator).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Hue shift by rotating chroma in YIQ space (angle in radians, per image)."""
    yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        device=x.device,
        dtype=x.dtype,
    )
    rgb = torch.linalg.inv(yiq)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = rgb @ rot @ yiq  # [B,3,3]
    return torch.einsum("bij,bjhw->bihw", m, x)


def color_jitter(
    x: torch.Tensor,
    brightness=0.4,
    contrast=0.4,
    saturation=0.2,
    hue=0.1,
    p=0.8,
    generator=None,
) -> torch.Tensor:
    """Per-image brightness, contrast, saturation, hue factors (fixed order), applied with p."""
    b = x.shape[0]
    dev = x.device
    u_all = torch.rand(b, 4, device=dev, generator=generator) * 2 - 1
    apply = _bernoulli(b, p, dev, generator)

    def jitter(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        u = u_all[idx]
        y = (y * (1 + brightness * u[:, 0]).view(-1, 1, 1, 1)).clamp(0, 1)
        mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - mean) * (1 + contrast * u[:, 1]).view(-1, 1, 1, 1) + mean).clamp(0, 1)
        g = _gray(y)
        y = ((y - g) * (1 + saturation * u[:, 2]).view(-1, 1, 1, 1) + g).clamp(0, 1)
        return _rotate_hue(y, u[:, 3] * hue * 2 * math.pi).clamp(0, 1)

    return _on_subset(x, apply, jitter)


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator=None) -> torch.Tensor:
    apply = _bernoulli(x.shape[0], p, x.device, generator)
    return _on_subset(x, apply, lambda y, _: _gray(y).expand_as(y))


def gaussian_blur(
    x: torch.Tensor, p: float, sigma=(0.1, 2.0), kernel_frac: float = 0.1, generator=None
) -> torch.Tensor:
    """Per-image Gaussian blur, sigma ~ U(sigma), applied with probability p.

    DINO blurs 224 px crops with radius U(0.1, 2); for smaller crops sigma is scaled by
    size / 224 so the blur covers the same fraction of the image.
    """
    b, c, h, w = x.shape
    if p <= 0:
        return x
    dev = x.device
    apply = _bernoulli(b, p, dev, generator)
    s = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(b, device=dev, generator=generator)
    s = (s * h / 224).clamp(min=1e-3)
    radius = max(1, int(math.ceil(3 * sigma[1] * h / 224)))
    t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * s[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, K]

    def blur(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n = len(idx)
        kc = k[idx].repeat_interleave(c, 0)  # one kernel per (image, channel): grouped conv
        y = F.pad(y.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
        y = F.conv2d(y, kc.view(n * c, 1, 1, -1), groups=n * c)
        y = F.conv2d(y, kc.view(n * c, 1, -1, 1), groups=n * c)
        return y.view(n, c, h, w)

    return _on_subset(x, apply, blur)


def random_solarize(x: torch.Tensor, p: float, threshold: float = 0.5, generator=None):
    if p <= 0:
        return x
    apply = _bernoulli(x.shape[0], p, x.device, generator)
    return _on_subset(x, apply, lambda y, _: torch.where(y >= threshold, 1 - y, y))


@dataclass
class ViewRecipe:
    """One DINO view: crop size and scale plus its blur / solarize probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


class MultiCrop:
    """DINO multi-crop on a uint8 batch: 2 global views + `n_local` local views.

    Defaults follow Caron et al. 2021 (REFERENCE.md): global scale (0.4, 1), local (0.05, 0.4),
    flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, blur 1.0 / 0.1 /
    0.5 (global 1 / global 2 / locals), solarize 0.2 on global 2 only. Sizes are parameters
    so small images (the 64 px synthetic set) use proportionally small crops.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize_p: float = 0.2,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        gs, ls = tuple(global_scale), tuple(local_scale)
        self.views = [
            ViewRecipe(global_size, gs, blur_p[0], 0.0),
            ViewRecipe(global_size, gs, blur_p[1], solarize_p),
        ] + [ViewRecipe(local_size, ls, blur_p[2], 0.0) for _ in range(n_local)]
        self.flip_p, self.jitter, self.jitter_p = flip_p, tuple(jitter), jitter_p
        self.grayscale_p, self.mean, self.std = grayscale_p, mean, std
        self.n_global = 2

    def view(self, x: torch.Tensor, recipe: ViewRecipe, generator=None) -> torch.Tensor:
        y = random_resized_crop(x, recipe.size, recipe.scale, generator=generator)
        y = random_hflip(y, self.flip_p, generator)
        y = color_jitter(y, *self.jitter, p=self.jitter_p, generator=generator)
        y = random_grayscale(y, self.grayscale_p, generator)
        y = gaussian_blur(y, recipe.blur_p, generator=generator)
        y = random_solarize(y, recipe.solarize_p, generator=generator)
        return normalize(y, self.mean, self.std)

    @no_autocast
    def __call__(self, images: torch.Tensor, generator=None) -> list[torch.Tensor]:
        x = to_float(images)
        return [self.view(x, r, generator) for r in self.views]


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
    def __call__(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        x = to_float(images)
        x = random_resized_crop(x, self.size, self.scale, generator=generator)
        x = random_hflip(x, self.flip_p, generator)
        x = color_jitter(x, *self.jitter, p=self.jitter_p, generator=generator)
        return normalize(x, self.mean, self.std)
