"""Augmentations on whole batches of image tensors, each image with its own random draw.

torchvision's v2 transforms draw one set of parameters per call, so a batch would get the
same crop everywhere. These functions draw per image and stay vectorised (the crop, whose
boxes differ in size, is one resize call per image), so they run on the GPU right after
the batch is transferred (uint8 over the bus, float on the device), or in the CPU
data-loader workers on whole batches (crops in uint8, like PIL, through torch's SIMD path).

The per-op functions are the readable definitions (each tested against torchvision);
`MultiCrop` draws exactly what they draw and computes the same views in fewer passes
(flip folded into the crop, colour matrices, in-place steps on cache-sized chunks; on the
CPU every step after the crop is one compiled kernel, `shared.data.cpu_views`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shared.data.cpu_views import advise_huge_pages, finish_views_

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma (torchvision's rgb_to_grayscale)
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
    whole_pixels: bool = True,
) -> torch.Tensor:
    """Per-image crop boxes [n, 4] (x1, y1, x2, y2) like RandomResizedCrop.

    Area fraction ~ U(scale), log aspect ~ U(log ratio); boxes that do not fit are shrunk to
    fit instead of re-drawn (a vectorised stand-in for torchvision's 10 tries). Whole pixels
    (int64, torchvision's boxes): sides rounded, the position uniform over the places the box
    fits. Otherwise (float32, same draws): sides and position continuous, for `subpixel_crops`.
    """
    area = height * width
    u = torch.rand(n, 3, device=device, generator=generator)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w, h = torch.sqrt(target * aspect), torch.sqrt(target / aspect)
    pos = torch.rand(n, 2, device=device, generator=generator)
    if not whole_pixels:
        w, h = w.clamp(max=width), h.clamp(max=height)
        x1, y1 = pos[:, 0] * (width - w), pos[:, 1] * (height - h)
        return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
    w, h = w.round().clamp(1, width), h.round().clamp(1, height)
    x1 = torch.minimum((pos[:, 0] * (width - w + 1)).floor(), width - w)
    y1 = torch.minimum((pos[:, 1] * (height - h + 1)).floor(), height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1).long()


def resized_crops(
    x: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    flip: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each image's box [n, 4] resized to size x size, mirrored where `flip` [n] is set.

    Bilinear with antialiasing, torchvision's `resized_crop` (a triangle filter as wide as the
    shrink factor, so shrinking averages like PIL; enlarging is plain bilinear). One call per
    image: boxes differ in size. uint8 images on the CPU take torch's SIMD uint8 path (about
    10x faster than float, and the result is rounded to uint8 as PIL's is); pass them
    channels-last to save a conversion per image. `out` (any dtype, e.g. float for uint8
    crops) receives the views; by default they are new tensors of x's dtype.
    """
    n, c = x.shape[:2]
    out = x.new_empty(n, c, size, size) if out is None else out
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
    x: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    flip: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
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
    xf = x.float().contiguous()
    index = torch.arange(n, device=x.device, dtype=torch.float32)[:, None]
    rois = torch.cat([index, boxes.to(device=x.device, dtype=torch.float32)], 1)
    y = roi_align(xf, rois, output_size=(size, size), sampling_ratio=0, aligned=True)
    if flip is not None and bool(flip.any()):
        y = torch.where(flip.view(-1, 1, 1, 1), y.flip(-1), y)
    if out is None:
        return y
    out.copy_(y)
    return out


def random_resized_crop(
    x: torch.Tensor, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None
) -> torch.Tensor:
    """Crop a different random box from every image and resize it to `size` (`resized_crops`);
    the result has x's dtype (uint8 stays uint8)."""
    b, _, h, w = x.shape
    boxes = random_resized_crop_boxes(b, h, w, scale, ratio, x.device, generator)
    return resized_crops(_fast_layout(x), boxes, size)


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """uint8 CPU images channels-last: the layout of torch's SIMD resampling path."""
    if x.dtype == torch.uint8 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def random_hflip(x: torch.Tensor, p: float = 0.5, generator=None) -> torch.Tensor:
    flip = _bernoulli(x.shape[0], p, x.device, generator).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


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


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Hue shift by rotating chroma in YIQ space (angle in radians, per image)."""
    return torch.einsum("bij,bjhw->bihw", _hue_matrix(angle), x)


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


def _blur_kernels(
    sigma_u: torch.Tensor, size: int, sigma, dtype
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`gaussian_blur`'s per-image 1-D kernels [B, 2R + 1], their radii r [B] and R = max.

    Each image's kernel is cut at its own radius r = ceil(3 sigma) (zero beyond, then
    normalised), as torchvision's kernel of size 2r + 1 is: a small sigma costs few taps.
    """
    s = sigma[0] + (sigma[1] - sigma[0]) * sigma_u
    s = (s * size / 224).clamp(min=1e-3)
    radius = max(1, int(math.ceil(3 * sigma[1] * size / 224)))
    radii = torch.ceil(3 * s).clamp(1, radius).long()
    t = torch.arange(-radius, radius + 1, device=sigma_u.device, dtype=dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * s[:, None].to(dtype) ** 2))
    k = k * (t[None].abs() <= radii[:, None])
    return k / k.sum(1, keepdim=True), radii, radius


def _blur_each(y: torch.Tensor, k: torch.Tensor, radii: torch.Tensor, radius: int):
    """`_blur` of every image with its own kernel row of k [n, 2R + 1] cut to its radius:
    one pass per distinct radius. Returns a new tensor."""
    groups = radii.unique().tolist()
    if len(groups) == 1:
        r = groups[0]
        return _blur(y, k[:, radius - r : radius + r + 1], r)
    out = torch.empty_like(y)
    for r in groups:
        idx = (radii == r).nonzero().flatten()
        taps = k.index_select(0, idx)[:, radius - r : radius + r + 1]
        out.index_copy_(0, idx, _blur(y.index_select(0, idx), taps, r))
    return out


def _blur(y: torch.Tensor, k: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable blur of y [n, c, h, w] with per-image kernels k [n, 2r + 1], reflect padding.

    Shifted multiply-adds, one per tap and axis: the same sums in the same order as a
    grouped conv2d with one kernel per (image, channel), about twice as fast on the CPU.
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


def gaussian_blur(
    x: torch.Tensor, p: float, sigma=BLUR_SIGMA, kernel_frac: float = 0.1, generator=None
) -> torch.Tensor:
    """Per-image Gaussian blur, sigma ~ U(sigma), applied with probability p.

    DINO blurs 224 px crops with radius U(0.1, 2); for smaller crops sigma is scaled by
    size / 224 so the blur covers the same fraction of the image. Each image's kernel spans
    +-ceil(3 sigma) pixels (torchvision's `gaussian_blur` at that kernel size, reflect
    padding).
    """
    if p <= 0:
        return x
    apply = _bernoulli(x.shape[0], p, x.device, generator)
    u = torch.rand(x.shape[0], device=x.device, generator=generator)
    k, radii, radius = _blur_kernels(u, x.shape[-2], sigma, x.dtype)
    return _on_subset(x, apply, lambda y, idx: _blur_each(y, k[idx], radii[idx], radius))


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


@dataclass
class ViewDraw:
    """Every random draw of one view for a batch, taken in the order the per-op functions
    above take them (crop, flip, jitter, grayscale, blur, solarize), so one generator state
    gives the same view either way."""

    boxes: torch.Tensor  # [B, 4] x1, y1, x2, y2
    flip: torch.Tensor  # [B] bool
    jitter_u: torch.Tensor  # [B, 4] in [-1, 1]: brightness, contrast, saturation, hue
    jitter: torch.Tensor  # [B] bool
    gray: torch.Tensor  # [B] bool
    blur: torch.Tensor | None  # [B] bool, None when the recipe never blurs
    sigma_u: torch.Tensor | None  # [B] in [0, 1)
    solarize: torch.Tensor | None  # [B] bool


# CPU views are finished in chunks of about this many floats (4 MiB): a chunk stays in the
# cache through all of its in-place steps, where whole-batch temporaries of a 224 px view
# (~38 MB) would stream through memory once per step and be page-faulted in afresh (glibc
# hands blocks that large straight back to the OS).
_CPU_CHUNK_FLOATS = 1 << 20


def _new_output(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """An empty output tensor; inside a DataLoader worker, in shared memory (as default_collate
    allocates its batches), so handing it to the main process copies nothing; elsewhere on the
    CPU, on huge pages where the OS allows (`advise_huge_pages`)."""
    if like.device.type == "cpu" and torch.utils.data.get_worker_info() is not None:
        numel = math.prod(shape)
        storage = like.untyped_storage()._new_shared(numel * like.element_size())
        return like.new_empty(0).set_(storage).view(shape)
    out = like.new_empty(shape)
    if out.device.type == "cpu":
        advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    return out


def _sat_matrix(s: torch.Tensor) -> torch.Tensor:
    """Per-image 3x3 colour matrix of saturation factor s: s * y + (1 - s) * gray(y)."""
    w = torch.tensor(GRAY_WEIGHTS, device=s.device, dtype=s.dtype)
    eye = torch.eye(3, device=s.device, dtype=s.dtype)
    return s.view(-1, 1, 1) * eye + (1 - s).view(-1, 1, 1) * w.expand(3, 3)


def _apply_colour_matrix_(y: torch.Tensor, m: torch.Tensor, buf: torch.Tensor) -> None:
    """y <- clamp(m @ y) per pixel, m [n, 3, 3]; `buf` is scratch of y's size."""
    n = y.shape[0]
    torch.bmm(m, y.view(n, 3, -1), out=buf.view(n, 3, -1))
    torch.clamp(buf, 0, 1, out=y)


def _cpu_finish_args(d, bright, contrast, matrices, blur, b: int) -> dict:
    """`finish_views_`'s per-image parameters, numpy, each indexed by image (empty where a
    step is off). blur: (kernels, radii) of the view's blur, None when it never blurs."""
    empty = np.zeros(0, np.float32)
    kernels, radii = (
        blur if blur is not None else (torch.ones(b, 1), torch.zeros(b, dtype=torch.long))
    )
    return {
        "jitter": d.jitter.numpy(),
        "bright": empty if bright is None else bright.flatten().numpy(),
        "contrast": empty if contrast is None else contrast.flatten().numpy(),
        "matrices": (torch.stack(matrices, 1) if matrices else torch.zeros(b, 0, 3, 3)).numpy(),
        "gray": d.gray.numpy(),
        "blur": np.zeros(b, bool) if d.blur is None else d.blur.numpy(),
        "kernels": kernels.numpy(),
        "radii": radii.numpy(),
        "solarize": np.zeros(b, bool) if d.solarize is None else d.solarize.numpy(),
    }


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

    def draw(self, b: int, h: int, w: int, recipe: ViewRecipe, device, generator=None):
        """All random choices (a `ViewDraw`) of one view for b images of h x w pixels."""
        dev = device
        boxes = random_resized_crop_boxes(
            b, h, w, recipe.scale, device=dev, generator=generator,
            whole_pixels=not self.subpixel_boxes,
        )  # fmt: skip
        flip = _bernoulli(b, self.flip_p, dev, generator)
        jitter_u = torch.rand(b, 4, device=dev, generator=generator) * 2 - 1
        jitter = _bernoulli(b, self.jitter_p, dev, generator)
        gray = _bernoulli(b, self.grayscale_p, dev, generator)
        blur = sigma_u = solarize = None
        if recipe.blur_p > 0:
            blur = _bernoulli(b, recipe.blur_p, dev, generator)
            sigma_u = torch.rand(b, device=dev, generator=generator)
        if recipe.solarize_p > 0:
            solarize = _bernoulli(b, recipe.solarize_p, dev, generator)
        return ViewDraw(boxes, flip, jitter_u, jitter, gray, blur, sigma_u, solarize)

    def view(self, src: torch.Tensor, recipe: ViewRecipe, generator=None) -> torch.Tensor:
        """One view of a batch `src` [B, 3, H, W], uint8 or float in [0, 1] (see `__call__`):
        the same result as `random_resized_crop`, `to_float`, `random_hflip`,
        `color_jitter`, `random_grayscale`, `gaussian_blur`, `random_solarize`, `normalize`
        in turn with the same generator (tested), in fewer passes: the flip is folded into
        the crop, colour steps are per-image scalars and 3x3 matrices applied in place
        (identity for images that did not draw jitter), rarer steps run on the images that
        drew them only. On the CPU each chunk of images is cropped, then finished image by
        image by the compiled `finish_views_` (every step while the image is in the cache);
        elsewhere by the torch ops below, chunk by chunk."""
        b, size, dev, dt = src.shape[0], recipe.size, src.device, torch.float32
        d = self.draw(b, src.shape[2], src.shape[3], recipe, dev, generator)
        bri, con, sat, hue = self.jitter
        u, on, one = d.jitter_u.to(dt), d.jitter, torch.ones((), device=dev, dtype=dt)
        bright = torch.where(on, 1 + bri * u[:, 0], one).view(-1, 1, 1, 1) if bri else None
        contrast = torch.where(on, 1 + con * u[:, 1], one).view(-1, 1, 1, 1) if con else None
        matrices = []  # saturation, then hue: each followed by a clamp to [0, 1]
        if sat:
            matrices.append(_sat_matrix(torch.where(on, 1 + sat * u[:, 2], one)))
        if hue:  # hue 0 would be a rotation by 0: skipped
            eye = torch.eye(3, device=dev, dtype=dt)
            rot = _hue_matrix(u[:, 3] * hue * 2 * math.pi)
            matrices.append(torch.where(on.view(-1, 1, 1), rot, eye))
        if d.blur is not None:
            kernels, radii, radius = _blur_kernels(d.sigma_u, size, BLUR_SIGMA, dt)
        gray_w = torch.tensor(GRAY_WEIGHTS, device=dev, dtype=dt).view(1, 1, 3)
        mean = torch.tensor(self.mean, device=dev, dtype=dt).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev, dtype=dt).view(1, 3, 1, 1)
        per_image = 3 * size * size
        chunk = b if dev.type != "cpu" else max(1, _CPU_CHUNK_FLOATS // per_image)
        out = _new_output((b, 3, size, size), torch.empty(0, device=dev, dtype=dt))
        torch_steps = matrices and dev.type != "cpu"
        buf = out.new_empty(min(chunk, b), 3, size, size) if torch_steps else None
        jitter_any = bool(on.any()) and any(self.jitter)

        def drawn(flags: torch.Tensor) -> torch.Tensor:
            return flags.nonzero().flatten()

        if dev.type == "cpu":  # every step after the crop compiled, image by image
            blur = (kernels, radii) if d.blur is not None else None
            per_image = _cpu_finish_args(d, bright, contrast, matrices, blur, b)
            fixed = {"gray_w": gray_w, "mean": mean, "std": std}
            fixed = {k: v.flatten().numpy() for k, v in fixed.items()}
        crop = subpixel_crops if self.subpixel_boxes else resized_crops
        for lo in range(0, b, chunk):
            sl = slice(lo, min(lo + chunk, b))
            y = crop(src[sl], d.boxes[sl], size, d.flip[sl], out[sl])
            if dev.type == "cpu":
                part = {k: v[sl] for k, v in per_image.items()}
                finish_views_(y.numpy(), src.dtype == torch.uint8, **part, **fixed)
                continue
            if src.dtype == torch.uint8:
                y.div_(255.0)  # `to_float` of the uint8 crop
            if jitter_any and bool(on[sl].any()):
                if bright is not None:
                    y.mul_(bright[sl]).clamp_(0, 1)
                if contrast is not None:
                    c = contrast[sl]
                    m = (y.mean((2, 3)) * gray_w[0]).sum(1).view(-1, 1, 1, 1)
                    y.mul_(c).add_(m * (1 - c)).clamp_(0, 1)
                for mat in matrices:
                    _apply_colour_matrix_(y, mat[sl], buf[: len(y)])
            # index_select / index_copy_ rather than y[idx]: several times faster
            if len(idx := drawn(d.gray[sl])):
                g = torch.matmul(gray_w, y.index_select(0, idx).view(len(idx), 3, -1))
                y.index_copy_(0, idx, g.view(-1, 1, size, size).expand(-1, 3, -1, -1))
            if d.blur is not None and len(idx := drawn(d.blur[sl])):
                k, r = kernels[sl].index_select(0, idx), radii[sl].index_select(0, idx)
                z = _blur_each(y.index_select(0, idx), k, r, radius)
                y.index_copy_(0, idx, z)
            if d.solarize is not None and len(idx := drawn(d.solarize[sl])):
                z = y.index_select(0, idx)
                y.index_copy_(0, idx, torch.where(z >= 0.5, 1 - z, z))
            y.sub_(mean).div_(std)
        return out

    @no_autocast
    def __call__(self, images: torch.Tensor, generator=None) -> list[torch.Tensor]:
        # uint8 on the CPU: cropped in uint8 (channels-last once for all views, the fast
        # path), then made float. Elsewhere float first (CUDA has no uint8 antialiased resize).
        src = _fast_layout(images) if images.device.type == "cpu" else to_float(images)
        return [self.view(src, r, generator) for r in self.views]


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
        x = to_float(random_resized_crop(images, self.size, self.scale, generator=generator))
        x = random_hflip(x, self.flip_p, generator)
        x = color_jitter(x, *self.jitter, p=self.jitter_p, generator=generator)
        return normalize(x, self.mean, self.std)
