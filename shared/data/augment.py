"""Augmentations on whole batches of image tensors, each image with its own random draw.

torchvision's v2 transforms draw one set of parameters per call, so a batch would get the
same crop everywhere. These functions draw per image and stay vectorised, so they run on
the GPU right after the batch is transferred (uint8 over the bus, float on the device), or
in the CPU data-loader workers on whole batches.

The per-op functions are the readable definitions (each tested against torchvision);
`MultiCrop` draws exactly what they draw and computes the same views in fewer passes
(separable crop, colour matrices, in-place steps on cache-sized chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

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


def _axis_taps(lo: torch.Tensor, length: torch.Tensor, size: int, n_in: int):
    """`random_resized_crop`'s sampling along one axis as taps: output s of image i is
    sum_t w[i, s, t] * input[start[i, s] + t].

    roi_align (aligned, adaptive) averages n = ceil(length / size) bilinear samples per output
    pixel; they lie at most one input pixel apart, so n + 1 taps hold them (fewer images: zero
    weights). Positions are computed in roi_align's order of float operations.
    """
    b, dt, dev = lo.shape[0], lo.dtype, lo.device
    n = torch.ceil(length / size).clamp(min=1)
    n_max = int(n.max())
    taps = n_max + 1
    k = torch.arange(n_max, device=dev, dtype=dt)
    i = torch.arange(size, device=dev, dtype=dt)[None, :, None]
    bin_, n = (length / size)[:, None, None], n[:, None, None]
    pos = lo[:, None, None] - 0.5 + i * bin_ + (k + 0.5) * bin_ / n  # [b, size, n_max]
    weight = (k < n).to(dt) / n  # 1 / n per sample, 0 for the padding samples
    pos = pos.clamp(min=0)  # roi_align's border rule: clamp, no zero padding
    low = pos.floor().clamp(max=n_in - 1)
    high_w = torch.where(low >= n_in - 1, 0.0, pos - low) * weight
    low = low.long()
    start = low[..., :1]
    w = torch.zeros(b, size, taps + 1, device=dev, dtype=dt)  # + a slot for zero weights
    w.scatter_add_(2, (low - start).clamp(max=taps), weight - high_w)
    w.scatter_add_(2, (low + 1 - start).clamp(max=taps), high_w)
    return start[..., 0], w[..., :taps]


def _resample_rows(src: torch.Tensor, start: torch.Tensor, w: torch.Tensor, out=None):
    """out[i, c, s] = sum_t w[i, s, t] * src[i, c, start[i, s] + t]: whole rows of src
    [n, c, r, l] gathered and blended (row copies and multiply-adds, all vectorised), into
    `out` [n, c, size, l] (contiguous) when given."""
    n, c, r, l = src.shape
    size, taps = w.shape[1:]
    flat = src.reshape(n * c * r, l)
    base = (torch.arange(n * c, device=src.device) * r).view(n, c, 1)
    out = src.new_empty(n * c * size, l) if out is None else out.view(n * c * size, l)
    rows = src.new_empty(n * c * size, l) if taps > 1 else None
    for t in range(taps):
        idx = (base + (start + t).clamp(max=r - 1)[:, None, :]).flatten()
        wt = w[:, None, :, t].expand(n, c, size).reshape(-1, 1)
        if t == 0:
            torch.index_select(flat, 0, idx, out=out).mul_(wt)
        else:
            out.addcmul_(torch.index_select(flat, 0, idx, out=rows), wt)
    return out.view(n, c, size, l)


def _crop_separable(
    xt: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None, out=None
) -> torch.Tensor:
    """`random_resized_crop`'s crop of every box [n, 4] from images stored transposed, xt
    [n, c, w, h], as two 1-D passes (bilinear sampling is separable); `flip` mirrors an
    image's crop for free by reversing its column taps. The same values as roi_align up to
    float rounding (tested), several times faster on the CPU."""
    _, _, w, h = xt.shape
    x1, y1, x2, y2 = boxes.unbind(1)
    sx, wx = _axis_taps(x1, x2 - x1, size, w)
    if flip is not None:
        sx = torch.where(flip[:, None], sx.flip(1), sx)
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    sy, wy = _axis_taps(y1, y2 - y1, size, h)
    cols = _resample_rows(xt, sx, wx).transpose(2, 3).contiguous()  # [n, c, h, size]
    return _resample_rows(cols, sy, wy, out)


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


def _blur_kernels(sigma_u: torch.Tensor, size: int, sigma, dtype) -> tuple[torch.Tensor, int]:
    """`gaussian_blur`'s per-image 1-D kernels [B, 2r + 1] and radius r at crop size `size`."""
    s = sigma[0] + (sigma[1] - sigma[0]) * sigma_u
    s = (s * size / 224).clamp(min=1e-3)
    radius = max(1, int(math.ceil(3 * sigma[1] * size / 224)))
    t = torch.arange(-radius, radius + 1, device=sigma_u.device, dtype=dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * s[:, None].to(dtype) ** 2))
    return k / k.sum(1, keepdim=True), radius


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
    size / 224 so the blur covers the same fraction of the image.
    """
    if p <= 0:
        return x
    apply = _bernoulli(x.shape[0], p, x.device, generator)
    u = torch.rand(x.shape[0], device=x.device, generator=generator)
    k, radius = _blur_kernels(u, x.shape[-2], sigma, x.dtype)
    return _on_subset(x, apply, lambda y, idx: _blur(y, k[idx], radius))


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
    allocates its batches), so handing it to the main process copies nothing."""
    if like.device.type == "cpu" and torch.utils.data.get_worker_info() is not None:
        numel = math.prod(shape)
        storage = like.untyped_storage()._new_shared(numel * like.element_size())
        return like.new_empty(0).set_(storage).view(shape)
    return like.new_empty(shape)


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

    def draw(self, b: int, h: int, w: int, recipe: ViewRecipe, device, generator=None):
        """All random choices (a `ViewDraw`) of one view for b images of h x w pixels."""
        dev = device
        boxes = random_resized_crop_boxes(b, h, w, recipe.scale, device=dev, generator=generator)
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

    def view(self, xt: torch.Tensor, recipe: ViewRecipe, generator=None) -> torch.Tensor:
        """One view of float images in [0, 1] stored transposed, xt [B, 3, W, H] (see
        `__call__`): the same result as `random_resized_crop`, `random_hflip`,
        `color_jitter`, `random_grayscale`, `gaussian_blur`, `random_solarize`, `normalize`
        in turn with the same generator (tested), in fewer passes: the crop is two 1-D passes
        with the flip folded in, colour steps are per-image scalars and 3x3 matrices applied
        in place (identity for images that did not draw jitter), rarer steps run on the
        images that drew them only, and on the CPU each chunk of images goes through every
        step while it is in the cache."""
        b, size, dev, dt = xt.shape[0], recipe.size, xt.device, xt.dtype
        d = self.draw(b, xt.shape[3], xt.shape[2], recipe, dev, generator)
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
            kernels, radius = _blur_kernels(d.sigma_u, size, BLUR_SIGMA, dt)
        gray_w = torch.tensor(GRAY_WEIGHTS, device=dev, dtype=dt).view(1, 1, 3)
        mean = torch.tensor(self.mean, device=dev, dtype=dt).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev, dtype=dt).view(1, 3, 1, 1)
        per_image = 3 * size * max(size, xt.shape[3])  # the crop's first pass: size x H
        chunk = b if dev.type != "cpu" else max(1, _CPU_CHUNK_FLOATS // per_image)
        out = _new_output((b, 3, size, size), xt)
        buf = xt.new_empty(min(chunk, b), 3, size, size) if matrices else None
        jitter_any = bool(on.any()) and any(self.jitter)

        def drawn(flags: torch.Tensor) -> torch.Tensor:
            return flags.nonzero().flatten()

        for lo in range(0, b, chunk):
            sl = slice(lo, min(lo + chunk, b))
            y = _crop_separable(xt[sl], d.boxes[sl].to(dt), size, d.flip[sl], out[sl])
            if jitter_any and bool(on[sl].any()):
                if bright is not None:
                    y.mul_(bright[sl]).clamp_(0, 1)
                if contrast is not None:
                    c = contrast[sl]
                    m = (y.mean((2, 3)) * gray_w[0]).sum(1).view(-1, 1, 1, 1)
                    y.mul_(c).add_(m * (1 - c)).clamp_(0, 1)
                for mat in matrices:
                    _apply_colour_matrix_(y, mat[sl], buf[: len(y)])
            # index_select / index_copy_ rather than y[idx]: several times faster on the CPU
            if len(idx := drawn(d.gray[sl])):
                g = torch.matmul(gray_w, y.index_select(0, idx).view(len(idx), 3, -1))
                y.index_copy_(0, idx, g.view(-1, 1, size, size).expand(-1, 3, -1, -1))
            if d.blur is not None and len(idx := drawn(d.blur[sl])):
                z = _blur(y.index_select(0, idx), kernels[sl].index_select(0, idx), radius)
                y.index_copy_(0, idx, z)
            if d.solarize is not None and len(idx := drawn(d.solarize[sl])):
                z = y.index_select(0, idx)
                y.index_copy_(0, idx, torch.where(z >= 0.5, 1 - z, z))
            y.sub_(mean).div_(std)
        return out

    @no_autocast
    def __call__(self, images: torch.Tensor, generator=None) -> list[torch.Tensor]:
        # Transposed once for all views: the crops' first pass then gathers whole rows.
        xt = to_float(images.transpose(2, 3).contiguous())
        return [self.view(xt, r, generator) for r in self.views]


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
