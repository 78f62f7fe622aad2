"""Batch augmentations against torchvision's functional ops with the same parameters, and
the statistics of the per-image random draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from shared.data import augment as A

MEAN, STD = torch.tensor(A.IMAGENET_MEAN), torch.tensor(A.IMAGENET_STD)
BILINEAR = TF.InterpolationMode.BILINEAR
# Our luma weights are PIL's (0.299, 0.587, 0.114), torchvision's 0.2989 for red: a luma
# differs by at most 1e-4, so a step that uses luma (grayscale; contrast and saturation,
# scaled by |1 - factor| <= 1) differs from torchvision's by at most 1e-4, float32 rounding
# (~1e-7 a step) aside.
LUMA_ATOL = 1e-4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen(seed))


def _denorm(y: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return y * torch.as_tensor(std).view(1, -1, 1, 1) + torch.as_tensor(mean).view(1, -1, 1, 1)


# --- crops -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 16, 24, 40])
def test_whole_image_box_is_antialiased_bilinear_resize(size):
    x = _rand(3, 3, 16, 16)
    y = A.resized_crops(x, torch.tensor([[0, 0, 16, 16]] * 3), size)
    ref = TF.resize(x, [size, size], interpolation=BILINEAR, antialias=True)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    if size == 16:
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)  # same size: the identity


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("size", [7, 16, 24, 50])  # shrinking 4x ... enlarging 2x
def test_crops_equal_torchvision_resized_crop(dtype, size):
    """Every box (tiny to the whole image, at the borders) and flip against torchvision's
    `resized_crop` + `horizontal_flip` of that image, for uint8 (the loader's path) and float."""
    h, w = 26, 30
    x = _rand(40, 3, h, w, seed=4)
    x = (x * 255).to(torch.uint8) if dtype == torch.uint8 else x
    boxes = A.random_resized_crop_boxes(36, h, w, (0.02, 1.0), generator=_gen(9))
    edges = torch.tensor([[0, 0, w, h], [0, 0, 1, 2], [w - 3, h - 1, w, h], [2, 0, 9, h]])
    boxes = torch.cat([boxes, edges])
    flip = torch.rand(40, generator=_gen(10)) < 0.5
    got = A.resized_crops(x.contiguous(memory_format=torch.channels_last), boxes, size, flip)
    assert got.dtype == dtype and got.shape == (40, 3, size, size)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        mode = TF.InterpolationMode.BILINEAR
        ref = TF.resized_crop(x[i], y1, x1, y2 - y1, x2 - x1, [size, size], mode, antialias=True)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        torch.testing.assert_close(got[i], ref, atol=1e-6, rtol=0)


def test_crop_of_a_box_at_its_own_size_is_that_region():
    x = (_rand(2, 3, 20, 20) * 255).to(torch.uint8)
    boxes = torch.tensor([[4, 6, 14, 16], [0, 0, 10, 10]])
    y = A.resized_crops(x, boxes, 10)
    assert torch.equal(y[0], x[0, :, 6:16, 4:14]) and torch.equal(y[1], x[1, :, :10, :10])


def test_uint8_crop_is_the_float_crop_rounded():
    """The uint8 path (what MultiCrop runs on the CPU) is the float crop to +-1 level."""
    x = (_rand(8, 3, 40, 40, seed=5) * 255).to(torch.uint8)
    boxes = A.random_resized_crop_boxes(8, 40, 40, (0.05, 1.0), generator=_gen(6))
    u8 = A.resized_crops(x.contiguous(memory_format=torch.channels_last), boxes, 24)
    f32 = A.resized_crops(x.float(), boxes, 24)
    assert (u8.float() - f32).abs().max() <= 1.01  # fixed-point weights: a hair over 1


def test_boxes_inside_image():
    h, w = 30, 50  # large scales on a wide image: many boxes must be shrunk to fit
    boxes = A.random_resized_crop_boxes(2000, h, w, (0.08, 1.0), (3 / 4, 4 / 3), generator=_gen(2))
    assert boxes.dtype == torch.int64
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
    assert ((x2 - x1) >= 1).all() and ((y2 - y1) >= 1).all()
    assert ((y2 - y1) == h).any()  # some hit the image height
    assert (x1 == 0).any() and (x2 == w).any()  # every fitting position can be drawn


def test_boxes_area_and_aspect_within_range():
    side, scale, ratio = 40, (0.2, 0.6), (3 / 4, 4 / 3)  # every such box fits in 40 x 40
    boxes = A.random_resized_crop_boxes(4000, side, side, scale, ratio, generator=_gen(3))
    x1, y1, x2, y2 = boxes.unbind(1)
    bw, bh = (x2 - x1).double(), (y2 - y1).double()
    assert (bw < side).all() and (bh < side).all()
    # sides are rounded to whole pixels: up to half a pixel each from the drawn real box
    frac = bw * bh / side**2
    slack = (0.5 * (bw + bh) + 0.25) / side**2
    assert (frac >= scale[0] - slack).all() and (frac <= scale[1] + slack).all()
    aspect = bw / bh
    lo, hi = (bw - 0.5) / (bh + 0.5), (bw + 0.5) / (bh - 0.5)
    assert (hi >= ratio[0]).all() and (lo <= ratio[1]).all()
    # area ~ U(scale), log aspect ~ U(log ratio): means in the middle of the ranges
    assert abs(frac.mean().item() - 0.4) < 0.01
    assert abs(aspect.log().mean().item()) < 0.01
    # positions spread over the free space
    assert x1.double().std() > 1 and y1.double().std() > 1


def _roi_align_reference(x: np.ndarray, box, size: int) -> np.ndarray:
    """roi_align (aligned, adaptive sampling) of one image written out per output pixel:
    n = ceil(side / size) samples per bin and axis, bilinear, clamped at the border."""
    _, h, w = x.shape
    x1, y1, x2, y2 = (float(v) - 0.5 for v in box)  # aligned: pixel centres at +0.5
    bin_h, bin_w = (y2 - y1) / size, (x2 - x1) / size
    ny, nx = math.ceil(bin_h), math.ceil(bin_w)

    def taps(pos: float, n_in: int):
        if pos < -1 or pos > n_in:
            return []
        pos = max(pos, 0.0)
        low = int(pos)
        if low >= n_in - 1:
            return [(n_in - 1, 1.0)]
        return [(low, 1 - (pos - low)), (low + 1, pos - low)]

    out = np.zeros((x.shape[0], size, size))
    for i in range(size):
        for j in range(size):
            acc = np.zeros(x.shape[0])
            for a in range(ny):
                for b in range(nx):
                    py = y1 + i * bin_h + (a + 0.5) * bin_h / ny
                    px = x1 + j * bin_w + (b + 0.5) * bin_w / nx
                    for r, wy in taps(py, h):
                        for c, wx in taps(px, w):
                            acc += wy * wx * x[:, r, c]
            out[:, i, j] = acc / (ny * nx)
    return out


def test_subpixel_crops_equal_a_per_pixel_roi_align():
    """Continuous boxes, enlarging and shrinking (2-3 samples per bin), flipped or not."""
    x = (_rand(6, 3, 20, 17, seed=4) * 255).to(torch.uint8)
    boxes = torch.tensor(
        [[0.0, 0.0, 17.0, 20.0], [2.3, 1.7, 9.8, 6.1], [0.4, 3.2, 16.9, 19.6],
         [5.5, 5.5, 6.7, 7.9], [1.25, 0.5, 13.75, 19.0], [0.0, 10.2, 3.3, 20.0]]
    )  # fmt: skip
    flip = torch.tensor([False, True, False, True, True, False])
    got = A.subpixel_crops(x.contiguous(memory_format=torch.channels_last), boxes, 7, flip)
    assert got.dtype == torch.float32 and got.shape == (6, 3, 7, 7)
    for i in range(6):
        ref = _roi_align_reference(x[i].double().numpy(), boxes[i], 7)
        ref = ref[:, :, ::-1] if flip[i] else ref
        np.testing.assert_allclose(got[i].numpy(), ref, atol=2e-3, rtol=0)


def test_subpixel_boxes_are_the_whole_pixel_draws_unrounded():
    h, w = 37, 53
    exact = A.random_resized_crop_boxes(3000, h, w, (0.02, 1.0), generator=_gen(8))
    cont = A.random_resized_crop_boxes(3000, h, w, (0.02, 1.0), generator=_gen(8),
                                       whole_pixels=False)  # fmt: skip
    assert cont.dtype == torch.float32
    x1, y1, x2, y2 = cont.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w + 1e-4).all() and (y2 <= h + 1e-4).all()
    sides = torch.stack([x2 - x1, y2 - y1], 1)
    whole = torch.stack([exact[:, 2] - exact[:, 0], exact[:, 3] - exact[:, 1]], 1)
    assert ((sides - whole).abs() <= 0.5 + 1e-4).all()  # the same draws, rounded or not
    inside = (sides[:, 0] < w) & (sides[:, 1] < h)  # sides not clamped to the image's
    assert (sides[inside] != sides[inside].round()).all()  # are really continuous
    # positions spread over the whole range a box can take, not only whole pixels
    frac = x1 - x1.floor()
    assert frac.std() > 0.25


# --- colour ------------------------------------------------------------------------------

STEPS = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}


@pytest.mark.parametrize("step", [0, 1, 2])
def test_color_jitter_step_equals_torchvision_adjust(step):
    """One step on (0.5 strength): each drawn image is torchvision's adjust_* with factor
    1 + 0.5 u; the others are returned untouched."""
    x = _rand(12, 3, 9, 11, seed=step)
    u = _rand(12, 4, seed=10 + step) * 2 - 1
    apply = torch.arange(12) % 3 != 0
    strength = tuple(0.5 if k == step else 0.0 for k in range(4))
    y = A.color_jitter(x, u, strength, apply)
    atol = 1e-6 if step == 0 else LUMA_ATOL  # brightness is a product: rounding only
    for i in range(12):
        if not apply[i]:
            assert torch.equal(y[i], x[i])
            continue
        ref = STEPS[step](x[i], 1 + 0.5 * u[i, step].item())
        torch.testing.assert_close(y[i], ref, atol=atol, rtol=0)


def test_color_jitter_applies_its_steps_in_order():
    x = _rand(6, 3, 8, 8, seed=3)
    u = _rand(6, 4, seed=4) * 2 - 1
    y = A.color_jitter(x, u, (0.4, 0.4, 0.2, 0.0), torch.ones(6, dtype=torch.bool))
    for i in range(6):
        ref = x[i]
        for k, s in enumerate((0.4, 0.4, 0.2)):
            ref = STEPS[k](ref, 1 + s * u[i, k].item())
        torch.testing.assert_close(y[i], ref, atol=2 * LUMA_ATOL, rtol=0)


def _hue_reference(x: torch.Tensor, turns: float) -> torch.Tensor:
    """Chroma (I + iQ in YIQ) times exp(2 pi i turns), in float64, clamped to [0, 1]."""
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c = np.einsum("ij,jhw->ihw", yiq, x.double().numpy())
    chroma = (c[1] + 1j * c[2]) * np.exp(2j * np.pi * turns)
    c = np.stack([c[0], chroma.real, chroma.imag])
    return torch.from_numpy(np.einsum("ij,jhw->ihw", np.linalg.inv(yiq), c).clip(0, 1))


def test_color_jitter_hue_rotates_chroma_and_keeps_luma():
    """Hue (YIQ rotation, not torchvision's HSV shift) against a complex-number reference."""
    x = _rand(8, 3, 6, 6) * 0.6 + 0.2
    u = _rand(8, 4, seed=5) * 2 - 1
    y = A.color_jitter(x, u, (0.0, 0.0, 0.0, 0.5), torch.ones(8, dtype=torch.bool))
    for i in range(8):
        ref = _hue_reference(x[i], 0.5 * u[i, 3].item()).float()
        torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=0)  # float32 matrices
    inside = ((y > 1e-4) & (y < 1 - 1e-4)).all(1, keepdim=True)  # unclamped pixels
    torch.testing.assert_close(A._gray(y)[inside], A._gray(x)[inside], atol=1e-5, rtol=0)
    assert (y - x).abs().amax() > 0.05


def test_color_jitter_zero_strength_is_identity():
    x = _rand(5, 3, 8, 8)
    assert A.color_jitter(x, _rand(5, 4), (0.0,) * 4, torch.ones(5, dtype=torch.bool)) is x


def test_grayscale_equals_torchvision():
    x = _rand(4, 3, 9, 9)
    apply = torch.tensor([True, False, True, True])
    y = A.grayscale(x, apply)
    ref = TF.rgb_to_grayscale(x, num_output_channels=3)
    torch.testing.assert_close(y[apply], ref[apply], atol=LUMA_ATOL, rtol=0)
    assert torch.equal(y[1], x[1]) and torch.equal(y[apply, 0], y[apply, 2])


def test_solarize_equals_torchvision():
    x = _rand(4, 3, 9, 9)
    x[0, 0, 0, 0] = 0.5  # on the threshold: inverted, as in torchvision
    apply = torch.tensor([True, True, False, True])
    y = A.solarize(x, apply)
    assert torch.equal(y[apply], TF.solarize(x[apply], threshold=0.5))
    assert torch.equal(y[2], x[2])
    assert torch.equal(A.solarize(x, torch.ones(4, dtype=torch.bool), 0.3), TF.solarize(x, 0.3))


def test_normalize_equals_torchvision():
    x = _rand(2, 3, 5, 5)
    ref = TF.normalize(x, list(A.IMAGENET_MEAN), list(A.IMAGENET_STD))
    torch.testing.assert_close(A.normalize(x), ref, atol=1e-6, rtol=0)


# --- blur --------------------------------------------------------------------------------


def test_blur_keeps_constant_image():
    x = torch.full((3, 3, 32, 32), 0.3)
    y = A.gaussian_blur(x, torch.tensor([0.5, 1.0, 2.0]), torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


def test_blur_impulse_response_is_symmetric_and_sums_to_one():
    x = torch.zeros(2, 1, 224, 224)
    x[:, :, 112, 112] = 1.0
    y = A.gaussian_blur(x, torch.tensor([0.7, 1.9]), torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(y.sum((1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    patch = y[:, :, 100:125, 100:125]  # centred on the impulse
    torch.testing.assert_close(patch, patch.flip(-1), atol=1e-7, rtol=0)
    torch.testing.assert_close(patch, patch.flip(-2), atol=1e-7, rtol=0)
    torch.testing.assert_close(patch, patch.transpose(-1, -2), atol=1e-7, rtol=0)


def test_blur_per_image_sigma_equals_torchvision():
    """Each drawn image blurred with its own sigma, kernel cut at ceil(3 sigma) (radii from 1
    to 6 in one batch): torchvision's blur at that sigma and kernel size, image by image."""
    x = _rand(12, 3, 40, 40, seed=3)
    sigma = torch.tensor([0.05, 0.2, 0.33, 0.4, 0.7, 1.0, 1.2, 1.5, 1.7, 1.9, 0.9, 0.3])
    apply = torch.arange(12) % 4 != 1
    y = A.gaussian_blur(x, sigma, apply)
    for i in range(12):
        if not apply[i]:
            assert torch.equal(y[i], x[i])
            continue
        s = sigma[i].item()
        r = max(1, math.ceil(3 * s))
        ref = TF.gaussian_blur(x[i], kernel_size=[2 * r + 1] * 2, sigma=[s, s])
        torch.testing.assert_close(y[i], ref, atol=1e-6, rtol=0)


def test_blur_sigmas_scale_dino_range_by_crop_size():
    u = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(A.blur_sigmas(u, 224), torch.tensor([0.1, 1.05, 2.0]))
    torch.testing.assert_close(A.blur_sigmas(u, 112), torch.tensor([0.05, 0.525, 1.0]))


# --- the random draws --------------------------------------------------------------------


def test_draws_follow_their_probabilities():
    n = 20000
    d = A.draw_view(n, 40, 40, (0.05, 0.4), 0.5, 0.8, 0.2, 0.5, 0.2, generator=_gen(1))
    tol = 4.5 * math.sqrt(0.25 / n)  # 4.5 binomial standard deviations at worst (p = 0.5)
    for flags, p in ((d.flip, 0.5), (d.jitter, 0.8), (d.gray, 0.2), (d.blur, 0.5),
                     (d.solarize, 0.2)):  # fmt: skip
        assert flags.dtype == torch.bool and abs(flags.float().mean().item() - p) < tol
    # flags drawn independently: the flip rate is the same among jittered images
    assert abs(d.flip[d.jitter].float().mean().item() - 0.5) < 2 * tol
    u = d.jitter_u
    assert u.min() >= -1 and u.max() < 1 and abs(u.mean().item()) < 0.01
    assert abs((u.abs() < 0.5).float().mean().item() - 0.5) < tol  # uniform on [-1, 1)
    s = d.sigma_u
    assert s.min() >= 0 and s.max() < 1 and abs(s.mean().item() - 0.5) < 0.01
    none = A.draw_view(4, 40, 40, (0.05, 0.4), 0.5, 0.8, None, 0.0, 0.0)
    assert none.gray is none.blur is none.sigma_u is none.solarize is None


def test_identical_images_get_different_views():
    images = (_rand(1, 3, 32, 32, seed=2) * 255).to(torch.uint8).expand(4, -1, -1, -1)
    mc = A.MultiCrop(24, 12, 2)
    views = mc(images.contiguous(), generator=_gen(8))
    for v in views:  # one source image, four different augmentations
        flat = v.flatten(1)
        assert torch.cdist(flat, flat)[~torch.eye(4, dtype=torch.bool)].min() > 1e-3
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[2], views[3])
    again = mc(images.contiguous(), generator=_gen(8))
    assert all(torch.equal(a, b) for a, b in zip(views, again))  # the generator fixes all


# --- whole views against torchvision ------------------------------------------------------


def _torchvision_view(x, d: A.ViewDraw, i: int, size: int, jitter, mean, std):
    """View i of `d` made by torchvision's functional ops (hue by `_hue_reference`), and the
    pixels that went into solarize within 5e-4 of its threshold (where a luma difference of
    LUMA_ATOL may flip them)."""
    x1, y1, x2, y2 = d.boxes[i].tolist()
    y = TF.resized_crop(x[i], y1, x1, y2 - y1, x2 - x1, [size, size], BILINEAR, antialias=True)
    y = TF.horizontal_flip(y) if d.flip[i] else y
    y = TF.to_dtype(y, torch.float32, scale=True)
    if d.jitter[i]:
        factors = [1 + s * d.jitter_u[i, k].item() for k, s in enumerate(jitter)]
        for k in range(3):
            y = STEPS[k](y, factors[k]) if jitter[k] else y
        y = _hue_reference(y, factors[3] - 1).float() if jitter[3] else y
    if d.gray is not None and d.gray[i]:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if d.blur is not None and d.blur[i]:
        s = (0.1 + 1.9 * d.sigma_u[i].item()) * size / 224  # DINO's U(0.1, 2) at 224 px
        r = max(1, math.ceil(3 * s))
        y = TF.gaussian_blur(y, kernel_size=[2 * r + 1] * 2, sigma=[s, s])
    near = torch.zeros_like(y, dtype=torch.bool)
    if d.solarize is not None and d.solarize[i]:
        near = (y - 0.5).abs() < 5e-4
        y = TF.solarize(y, threshold=0.5)
    return TF.normalize(y, list(mean), list(std)), near


# DINO's own augmentation values (Caron et al. 2021), where the repo's 64 px recipe differs.
OFFICIAL = dict(jitter=(0.4, 0.4, 0.2, 0.1), grayscale_p=0.2)


@pytest.mark.parametrize(
    "sizes, kwargs",
    [
        ((40, 24, 16, 3), OFFICIAL),  # official recipe; crops shrink and enlarge
        ((40, 48, 20, 2), {}),  # the repo's defaults (whole-pixel boxes: torchvision's)
        ((32, 32, 12, 2), dict(jitter_p=1.0, grayscale_p=1.0, blur_p=(1.0,) * 3,
                               solarize_p=1.0)),  # every step on every image
        ((12, 2, 2, 1), dict(jitter_p=1.0, blur_p=(1.0,) * 3)),  # 2 px: the smallest blur
    ],
)  # fmt: skip
@pytest.mark.parametrize("on_float", [False, True])
def test_multicrop_views_equal_torchvision_ops_with_the_same_draws(sizes, kwargs, on_float):
    """Every view, image by image: torchvision's crop, flip, adjust_*, grayscale, blur,
    solarize and normalize with the parameters drawn from the same generator state. Float
    input is the GPU path (float crops); uint8 the CPU one (uint8 crops, as torchvision's)."""
    stored, global_size, local_size, n_local = sizes
    images = (_rand(7, 3, stored, stored, seed=11) * 255).to(torch.uint8)
    images = A.to_float(images) if on_float else images
    # torchvision crops whole-pixel boxes (the repo's default crops sub-pixel ones)
    mc = A.MultiCrop(global_size, local_size, n_local, **{"subpixel_boxes": False, **kwargs})
    views = mc(images, generator=_gen(5))
    g = _gen(5)
    assert len(views) == len(mc.views) == 2 + n_local
    for v, r in zip(views, mc.views):
        d = A.draw_view(7, stored, stored, r.scale, mc.flip_p, mc.jitter_p, mc.grayscale_p,
                        r.blur_p, r.solarize_p, generator=g)  # fmt: skip
        assert v.shape == (7, 3, r.size, r.size) and v.dtype == torch.float32
        for i in range(7):
            ref, near = _torchvision_view(images, d, i, r.size, mc.jitter, mc.mean, mc.std)
            assert near.float().mean() < 0.05  # blurred noise gathers near 0.5
            # luma differences (LUMA_ATOL, twice: contrast and saturation or grayscale)
            # divided by std (>= 0.224) on normalising
            torch.testing.assert_close(v[i][~near], ref[~near], atol=1e-3, rtol=0)


def test_multicrop_views_sizes_and_range():
    mc = A.MultiCrop(global_size=24, local_size=12, n_local=3)
    images = (_rand(4, 3, 32, 32) * 255).to(torch.uint8)
    views = mc(images, generator=_gen())
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 3
    assert all(v.dtype == torch.float32 for v in views) and mc.n_global == 2
    for v in views:  # every step keeps [0, 1]; normalising maps it to ((0, 1) - mean) / std
        d = _denorm(v)
        assert d.min() >= -1e-5 and d.max() <= 1 + 1e-5


def test_multicrop_subpixel_views_crop_the_unrounded_boxes():
    """subpixel_boxes: the same draws, the crop by roi_align of the continuous boxes."""
    images = (_rand(5, 3, 30, 30, seed=7) * 255).to(torch.uint8)
    mc = A.MultiCrop(16, 8, 1, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0,) * 3,
                     solarize_p=0.0, subpixel_boxes=True)  # fmt: skip
    views = mc(images, generator=_gen(2))
    g = _gen(2)
    for v, r in zip(views, mc.views):
        d = A.draw_view(5, 30, 30, r.scale, 0.5, 0.0, 0.0, whole_pixels=False, generator=g)
        ref = A.normalize(A.subpixel_crops(images, d.boxes, r.size, d.flip) / 255)
        torch.testing.assert_close(v, ref, atol=1e-5, rtol=0)


def test_multicrop_of_float_images_is_the_uint8_result_unrounded():
    """Float input (the GPU path: CUDA has no uint8 antialiased resize) draws the same and
    differs from the uint8 path only by the crop's rounding to uint8 levels."""
    images = (_rand(5, 3, 40, 40, seed=12) * 255).to(torch.uint8)
    mc = A.MultiCrop(24, 16, 2)
    from_uint8 = mc(images, generator=_gen(3))
    from_float = mc(A.to_float(images), generator=_gen(3))
    level = 1.01 / 255 / min(A.IMAGENET_STD)  # one uint8 level, normalised
    for a, b in zip(from_uint8, from_float):
        diff = (a - b).abs()
        # contrast, saturation and the hue rotation can stretch a level by a few times
        assert diff.max() <= 4 * level and diff.mean() <= 0.5 * level


@pytest.mark.parametrize("sizes", [(1, 16), (16, 1), (0, 8)])
def test_multicrop_rejects_crops_under_two_pixels(sizes):
    with pytest.raises(ValueError, match="at least 2 px"):
        A.MultiCrop(*sizes, 2)


def test_eval_transform_resizes_and_normalises():
    images = (_rand(2, 3, 20, 20) * 255).to(torch.uint8)
    y = A.EvalTransform(size=12)(images)
    x = images.float() / 255
    resized = TF.resize(x, [12, 12], interpolation=BILINEAR, antialias=True)
    ref = (resized - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    same = A.EvalTransform(size=20)(images)  # already the right size: normalise only
    torch.testing.assert_close(same, (x - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1))
    torch.testing.assert_close(A.EvalTransform()(images), same)


def test_train_transform_equals_torchvision_ops_with_its_draws():
    """Metric learning's crop, flip and jitter (hue included), no grayscale / blur /
    solarize: torchvision's ops with the parameters drawn from the same generator state."""
    images = (_rand(6, 3, 20, 20, seed=9) * 255).to(torch.uint8)
    tt = A.TrainTransform(size=16, jitter_p=0.7)
    y = tt(images, generator=_gen(4))
    d = A.draw_view(6, 20, 20, tt.scale, tt.flip_p, tt.jitter_p, None, generator=_gen(4))
    assert y.shape == (6, 3, 16, 16)
    for i in range(6):
        ref, _ = _torchvision_view(images, d, i, 16, tt.jitter, tt.mean, tt.std)
        torch.testing.assert_close(y[i], ref, atol=1e-3, rtol=0)


# --- whole images of different sizes, padded into one batch -----------------------------


def _images_of_sizes(sizes, seed: int = 0) -> list[torch.Tensor]:
    return [(_rand(3, h, w, seed=seed + i) * 255).to(torch.uint8) for i, (h, w) in enumerate(sizes)]


def _one(d: A.ViewDraw, i: int) -> A.ViewDraw:
    """Image i's draws of a batch's ViewDraw."""
    return A.ViewDraw(*(None if v is None else v[i : i + 1] for v in vars(d).values()))


SIZES = [(20, 33), (41, 17), (26, 26), (18, 40), (30, 21)]


def test_pad_images_repeats_the_last_row_and_column():
    images = _images_of_sizes(SIZES)
    batch, sizes = A.pad_images(images)
    assert batch.shape == (5, 3, 41, 40) and sizes.tolist() == [list(s) for s in SIZES]
    for img, padded, (h, w) in zip(images, batch, SIZES):
        assert torch.equal(padded[:, :h, :w], img)
        ref = torch.nn.functional.pad(img[None].float(), (0, 40 - w, 0, 41 - h), mode="replicate")
        assert torch.equal(padded, ref[0].to(torch.uint8))


def _reference_boxes(h, w, scale, ratio, seed: int) -> np.ndarray:
    """Continuous boxes image by image in float64, from the same uniform draws."""
    g = _gen(seed)
    u, pos = torch.rand(len(h), 3, generator=g).double(), torch.rand(len(h), 2, generator=g)
    out = []
    for i in range(len(h)):
        H, W = float(h[i]), float(w[i])
        target = H * W * (scale[0] + (scale[1] - scale[0]) * float(u[i, 0]))
        aspect = math.exp(math.log(ratio[0]) + math.log(ratio[1] / ratio[0]) * float(u[i, 1]))
        bw, bh = min(math.sqrt(target * aspect), W), min(math.sqrt(target / aspect), H)
        x1, y1 = float(pos[i, 0]) * (W - bw), float(pos[i, 1]) * (H - bh)
        out.append([x1, y1, x1 + bw, y1 + bh])
    return np.array(out)


def test_per_image_sizes_draw_boxes_inside_each_image():
    """Sizes as [n] tensors: each box is drawn in its own image (against a per-image float64
    reference), inside it; equal sizes draw exactly what one int size draws (so memmap
    batches are unchanged)."""
    n, scale, ratio = 2000, (0.2, 1.0), (3 / 4, 4 / 3)
    h = torch.randint(16, 300, (n,), generator=_gen(1))
    w = torch.randint(16, 300, (n,), generator=_gen(2))
    cont = A.random_resized_crop_boxes(n, h, w, scale, ratio, generator=_gen(3),
                                       whole_pixels=False)  # fmt: skip
    ref = _reference_boxes(h, w, scale, ratio, seed=3)
    np.testing.assert_allclose(cont.numpy(), ref, atol=2e-4 * 300, rtol=0)
    exact = A.random_resized_crop_boxes(n, h, w, scale, ratio, generator=_gen(3))
    x1, y1, x2, y2 = exact.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
    assert (exact.float() - cont).abs().max() < 2.0  # sides rounded, corners floored
    for whole in (True, False):
        same = A.random_resized_crop_boxes(
            n,
            torch.full((n,), 50),
            torch.full((n,), 70),
            scale,
            generator=_gen(3),
            whole_pixels=whole,
        )
        one = A.random_resized_crop_boxes(n, 50, 70, scale, generator=_gen(3),
                                          whole_pixels=whole)  # fmt: skip
        assert torch.equal(same, one)


@pytest.mark.parametrize("subpixel", [True, False])
def test_views_of_a_padded_batch_are_each_images_own(subpixel):
    """Every step of every view of a padded batch equals that view of the image alone, with
    the same draws: the padding never reaches a view."""
    images = _images_of_sizes(SIZES, seed=20)
    batch, sizes = A.pad_images(images)
    mc = A.MultiCrop(16, 8, 2, subpixel_boxes=subpixel)
    views = mc(batch, generator=_gen(4), sizes=sizes)
    g = _gen(4)
    for v, r in zip(views, mc.views):
        d = A.draw_view(5, sizes[:, 0], sizes[:, 1], r.scale, mc.flip_p, mc.jitter_p,
                        mc.grayscale_p, r.blur_p, r.solarize_p, whole_pixels=not subpixel,
                        generator=g)  # fmt: skip
        for i, img in enumerate(images):
            src = A._fast_layout(img[None])
            alone = A.apply_view(src, _one(d, i), r.size, mc.jitter, mc.mean, mc.std, subpixel)
            torch.testing.assert_close(v[i : i + 1], alone, atol=1e-5, rtol=0)


def test_train_transform_of_a_padded_batch_is_each_images_own():
    images = _images_of_sizes(SIZES, seed=30)
    batch, sizes = A.pad_images(images)
    tt = A.TrainTransform(12)
    out = tt(batch, generator=_gen(6), sizes=sizes)
    d = A.draw_view(5, sizes[:, 0], sizes[:, 1], tt.scale, tt.flip_p, tt.jitter_p, None,
                    generator=_gen(6))  # fmt: skip
    for i, img in enumerate(images):
        alone = A.apply_view(A._fast_layout(img[None]), _one(d, i), 12, tt.jitter, tt.mean, tt.std)
        torch.testing.assert_close(out[i : i + 1], alone, atol=1e-5, rtol=0)
