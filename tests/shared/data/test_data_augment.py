"""Batch augmentations against torchvision / torch references, and per-image randomness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from shared.data import augment as A

MEAN, STD = torch.tensor(A.IMAGENET_MEAN), torch.tensor(A.IMAGENET_STD)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen(seed))


def _denorm(y: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return y * torch.as_tensor(std).view(1, -1, 1, 1) + torch.as_tensor(mean).view(1, -1, 1, 1)


# --- crops -------------------------------------------------------------------------------


def test_identical_images_get_different_crops():
    x = _rand(1, 3, 24, 24).expand(6, -1, -1, -1).contiguous()
    y = A.random_resized_crop(x, 12, generator=_gen(1))
    assert y.shape == (6, 3, 12, 12)
    flat = y.flatten(1)
    assert torch.cdist(flat, flat).triu(1)[torch.ones(6, 6).triu(1).bool()].min() > 1e-3
    again = A.random_resized_crop(x, 12, generator=_gen(1))
    assert torch.equal(y, again)  # the generator fixes every draw


@pytest.mark.parametrize("size", [8, 16, 24, 40])
def test_full_crop_is_antialiased_bilinear_resize(size):
    """scale (1, 1), ratio (1, 1): the box is the image, so the crop is a plain resize."""
    x = _rand(3, 3, 16, 16)
    y = A.random_resized_crop(x, size, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_gen())
    ref = TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    if size == 16:
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)  # same size: the identity
    if size == 8:  # halving averages a 4-pixel triangle window per axis (1, 3, 3, 1) / 8
        w = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
        pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
        manual = torch.einsum("ncyxab,a,b->ncyx", pad.unfold(2, 4, 2).unfold(3, 4, 2), w, w)
        torch.testing.assert_close(y[..., 1:-1, 1:-1], manual[..., 1:-1, 1:-1], atol=1e-6, rtol=0)


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


def test_hflip_per_image():
    x = _rand(1, 3, 5, 7).expand(64, -1, -1, -1)
    y = A.random_hflip(x, 0.5, generator=_gen(3))
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert (flipped ^ kept).all() and 10 < flipped.sum() < 54
    assert torch.equal(A.random_hflip(x, 1.0), x.flip(-1))
    assert torch.equal(A.random_hflip(x, 0.0), x)


# --- colour ------------------------------------------------------------------------------


def test_grayscale_matches_torchvision():
    x = _rand(4, 3, 9, 9)
    y = A.random_grayscale(x, p=1.0)
    ref = TF.rgb_to_grayscale(x, num_output_channels=3)  # ITU-R 601-2 luma
    torch.testing.assert_close(y, ref, atol=1e-3, rtol=0)
    assert torch.equal(y[:, 0], y[:, 2])
    assert torch.equal(A.random_grayscale(x, p=0.0), x)


def test_solarize_matches_torchvision():
    x = _rand(4, 3, 9, 9)
    x[0, 0, 0, 0] = 0.5  # on the threshold: inverted, as in torchvision
    y = A.random_solarize(x, p=1.0)
    assert torch.equal(y, TF.solarize(x, threshold=0.5))
    assert torch.equal(A.random_solarize(x, p=1.0, threshold=0.3), TF.solarize(x, 0.3))
    assert torch.equal(A.random_solarize(x, p=0.0), x)


def test_color_jitter_zero_strength_is_identity():
    x = _rand(5, 3, 8, 8)
    y = A.color_jitter(x, 0.0, 0.0, 0.0, 0.0, p=1.0, generator=_gen())
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    assert torch.equal(A.color_jitter(x, p=0.0, generator=_gen()), x)


def test_color_jitter_brightness_is_a_per_image_factor():
    x = _rand(16, 3, 6, 6) * 0.5 + 0.1  # stays below 1 after x1.5: no clamping
    y = A.color_jitter(x, 0.5, 0.0, 0.0, 0.0, p=1.0, generator=_gen(4))
    ratio = (y / x).flatten(1)
    factor = ratio.mean(1)
    torch.testing.assert_close(ratio, factor[:, None].expand_as(ratio), atol=1e-4, rtol=0)
    assert factor.min() >= 0.5 - 1e-4 and factor.max() <= 1.5 + 1e-4
    assert factor.std() > 0.1  # drawn per image


def test_color_jitter_hue_keeps_luma_and_stays_in_range():
    x = _rand(8, 3, 6, 6) * 0.6 + 0.2
    y = A.color_jitter(x, 0.0, 0.0, 0.0, 0.5, p=1.0, generator=_gen(5))
    assert y.min() >= 0 and y.max() <= 1
    luma = TF.rgb_to_grayscale(x)
    inside = ((y > 1e-4) & (y < 1 - 1e-4)).all(1, keepdim=True)  # unclamped pixels
    torch.testing.assert_close(A._gray(y)[inside], luma[inside], atol=2e-3, rtol=0)
    assert (y - x).abs().amax() > 0.05


# --- blur --------------------------------------------------------------------------------


def test_blur_keeps_constant_image():
    x = torch.full((3, 3, 32, 32), 0.3)
    y = A.gaussian_blur(x, p=1.0, generator=_gen())
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


def test_blur_impulse_response():
    x = torch.zeros(2, 1, 224, 224)
    x[:, :, 112, 112] = 1.0
    y = A.gaussian_blur(x, p=1.0, sigma=(0.1, 2.0), generator=_gen(6))
    torch.testing.assert_close(y.sum((1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    patch = y[:, :, 100:125, 100:125]  # centred on the impulse
    torch.testing.assert_close(patch, patch.flip(-1), atol=1e-7, rtol=0)
    torch.testing.assert_close(patch, patch.flip(-2), atol=1e-7, rtol=0)
    torch.testing.assert_close(patch, patch.transpose(-1, -2), atol=1e-7, rtol=0)
    assert not torch.allclose(y[0], y[1])  # each image draws its own sigma


def test_blur_matches_torchvision_kernel():
    """At 224 px and a fixed sigma, the blur is torchvision's separable Gaussian (radius 3
    sigma, reflect padding)."""
    x = _rand(2, 3, 224, 224)
    y = A.gaussian_blur(x, p=1.0, sigma=(1.5, 1.5))
    radius = math.ceil(3 * 1.5)
    ref = TF.gaussian_blur(x, kernel_size=[2 * radius + 1] * 2, sigma=[1.5, 1.5])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    assert torch.equal(A.gaussian_blur(x, p=0.0), x)


def test_blur_per_image_sigma_and_radius_match_torchvision():
    """Each image blurred with its own drawn sigma, kernel cut at ceil(3 sigma): torchvision's
    blur at that sigma and kernel size, image by image (some images skipped by p)."""
    x = _rand(12, 3, 96, 96, seed=3)
    y = A.gaussian_blur(x, p=0.7, sigma=(0.1, 2.0), generator=_gen(4))
    g = _gen(4)  # the draws, in gaussian_blur's order: apply, then sigma
    apply = torch.rand(12, generator=g) < 0.7
    sigma = (0.1 + 1.9 * torch.rand(12, generator=g)) * 96 / 224
    assert 0 < apply.sum() < 12 and len(set(torch.ceil(3 * sigma).tolist())) > 1
    for i in range(12):
        if not apply[i]:
            assert torch.equal(y[i], x[i])
            continue
        s, r = sigma[i].item(), max(1, math.ceil(3 * sigma[i].item()))
        ref = TF.gaussian_blur(x[i], kernel_size=[2 * r + 1] * 2, sigma=[s, s])
        torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=0)


# --- views -------------------------------------------------------------------------------


def test_multicrop_views_sizes_and_range():
    mc = A.MultiCrop(global_size=24, local_size=12, n_local=3)
    images = (_rand(4, 3, 32, 32) * 255).to(torch.uint8)
    views = mc(images, generator=_gen())
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 3
    assert all(v.dtype == torch.float32 for v in views) and mc.n_global == 2
    for v in views:  # every op keeps [0, 1]; normalising maps it to ((0, 1) - mean) / std
        d = _denorm(v)
        assert d.min() >= -1e-5 and d.max() <= 1 + 1e-5


def test_multicrop_normalises_with_its_mean_std():
    """A constant image survives crop, flip and blur unchanged, so each view is exactly
    `normalize` of the colour; solarize (p=1) hits global view 2 only."""
    colour = torch.tensor([200, 60, 140], dtype=torch.uint8)
    images = colour.view(1, 3, 1, 1).expand(2, 3, 20, 20).contiguous()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    mc = A.MultiCrop(
        global_size=16,
        local_size=8,
        n_local=2,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=(1.0, 1.0, 1.0),
        solarize_p=1.0,
        mean=mean,
        std=std,
    )
    views = mc(images, generator=_gen(7))
    c = A.to_float(images)[:, :, :1, :1]
    plain = A.normalize(c, mean, std)
    solar = A.normalize(torch.where(c >= 0.5, 1 - c, c), mean, std)
    manual = (c - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(plain, manual)
    for i, v in enumerate(views):
        ref = solar if i == 1 else plain
        torch.testing.assert_close(v, ref.expand_as(v), atol=1e-5, rtol=0)


def test_eval_transform_resizes_and_normalises():
    images = (_rand(2, 3, 20, 20) * 255).to(torch.uint8)
    y = A.EvalTransform(size=12)(images)
    x = images.float() / 255
    resized = TF.resize(x, [12, 12], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    ref = (resized - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    same = A.EvalTransform(size=20)(images)  # already the right size: normalise only
    torch.testing.assert_close(same, (x - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1))
    torch.testing.assert_close(A.EvalTransform()(images), same)


def test_train_transform_shapes_and_range():
    images = (_rand(4, 3, 20, 20) * 255).to(torch.uint8)
    y = A.TrainTransform(size=16)(images, generator=_gen())
    assert y.shape == (4, 3, 16, 16)
    d = _denorm(y)
    assert d.min() >= -1e-5 and d.max() <= 1 + 1e-5


# --- MultiCrop's fused views against the per-op functions ---------------------------------


def _per_op_view(mc: A.MultiCrop, x: torch.Tensor, r: A.ViewRecipe, g) -> torch.Tensor:
    """One view of uint8 images by the public per-op functions in turn (each tested above
    against torchvision): the reference for MultiCrop's chunked, in-place path."""
    if mc.subpixel_boxes:
        boxes = A.random_resized_crop_boxes(
            len(x), *x.shape[2:], r.scale, generator=g, whole_pixels=False
        )
        y = A.subpixel_crops(x, boxes, r.size) / 255
    else:
        y = A.to_float(A.random_resized_crop(x, r.size, r.scale, generator=g))
    y = A.random_hflip(y, mc.flip_p, g)
    y = A.color_jitter(y, *mc.jitter, p=mc.jitter_p, generator=g)
    y = A.random_grayscale(y, mc.grayscale_p, g)
    y = A.gaussian_blur(y, r.blur_p, generator=g)
    y = A.random_solarize(y, r.solarize_p, generator=g)
    return A.normalize(y, mc.mean, mc.std)


@pytest.mark.parametrize(
    "sizes, kwargs",
    [
        ((40, 24, 16, 3), {}),  # official recipe; crops shrink (2 samples) and enlarge
        ((40, 48, 20, 2), dict(jitter=(0.4, 0.4, 0.2, 0.0), grayscale_p=0.0)),  # repo config
        ((32, 32, 12, 2), dict(flip_p=1.0, jitter_p=1.0, grayscale_p=1.0, blur_p=(1.0,) * 3,
                               solarize_p=1.0)),  # every step on every image
        ((32, 16, 8, 1), dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0,) * 3,
                              solarize_p=0.0)),  # crop and normalise only
    ],
)  # fmt: skip
@pytest.mark.parametrize("chunk_floats", [None, 3000])  # one chunk / a chunk per 1-2 images
@pytest.mark.parametrize("subpixel", [False, True])
def test_multicrop_equals_the_per_op_functions(monkeypatch, sizes, kwargs, chunk_floats, subpixel):
    """Same generator state -> the same views as the per-op composition, to float rounding:
    the fused path changes how the views are computed, not what is drawn."""
    if chunk_floats:
        monkeypatch.setattr(A, "_CPU_CHUNK_FLOATS", chunk_floats)
    stored, global_size, local_size, n_local = sizes
    images = (_rand(7, 3, stored, stored, seed=11) * 255).to(torch.uint8)
    mc = A.MultiCrop(global_size, local_size, n_local, **kwargs, subpixel_boxes=subpixel)
    views = mc(images, generator=_gen(5))
    g, x = _gen(5), images
    ref = [_per_op_view(mc, x, r, g) for r in mc.views]
    assert len(views) == len(ref) == 2 + n_local
    for v, r in zip(views, ref):
        assert v.shape == r.shape and v.dtype == torch.float32
        torch.testing.assert_close(v, r, atol=2e-5, rtol=0)
    # the global RNG is drawn from in the same order too (what the loader workers use)
    torch.manual_seed(3)
    a = mc(images)
    torch.manual_seed(3)
    b = [_per_op_view(mc, x, r, None) for r in mc.views]
    for v, r in zip(a, b):
        torch.testing.assert_close(v, r, atol=2e-5, rtol=0)


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


def test_multicrop_views_differ_per_image_and_per_view():
    images = (_rand(1, 3, 32, 32, seed=2) * 255).to(torch.uint8).expand(4, -1, -1, -1)
    views = A.MultiCrop(24, 12, 2)(images.contiguous(), generator=_gen(8))
    for v in views:  # one source image, four different augmentations
        flat = v.flatten(1)
        assert torch.cdist(flat, flat)[~torch.eye(4, dtype=torch.bool)].min() > 1e-3
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[2], views[3])


class _MultiCropInWorker(torch.utils.data.Dataset):
    """Item i: MultiCrop views of a fixed batch from seed i, and whether they were made in
    shared memory (so the worker hands them over without a copy)."""

    def __init__(self, images):
        self.images, self.mc = images, A.MultiCrop(24, 12, 2)

    def __len__(self):
        return 2

    def __getitem__(self, i):
        views = self.mc(self.images, generator=_gen(i))
        return views, [v.is_shared() for v in views]


def test_multicrop_in_a_loader_worker():
    images = (_rand(3, 3, 32, 32, seed=6) * 255).to(torch.uint8)
    data = _MultiCropInWorker(images)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=1)
    for i, (views, shared) in enumerate(loader):
        assert all(shared)
        for v, ref in zip(views, data.mc(images, generator=_gen(i))):
            assert torch.equal(v, ref)
    assert not any(v.is_shared() for v in data.mc(images))  # main process: plain memory


def test_huge_page_advice_only_covers_whole_aligned_pages():
    """advise_huge_pages never touches memory outside the buffer: a buffer without one whole
    2 MiB-aligned page inside is left alone; a big one is advised wherever the kernel has
    transparent huge pages (the advice is taken whatever the THP mode), and keeps what is
    written to it."""
    import sys
    from pathlib import Path

    from shared.data.cpu_views import advise_huge_pages

    small = torch.empty(1000)
    assert advise_huge_pages(small.data_ptr(), small.numel() * 4) is False
    big = torch.empty(3 << 20)  # 12 MiB: at least 4 whole huge pages inside
    advised = advise_huge_pages(big.data_ptr(), big.numel() * 4)
    if sys.platform.startswith("linux"):
        assert advised is Path("/sys/kernel/mm/transparent_hugepage").is_dir()
    expected = torch.arange(big.numel(), dtype=torch.float32)
    big.copy_(expected)
    assert torch.equal(big, expected)


@pytest.mark.parametrize("sizes", [(1, 16), (16, 1), (0, 8)])
def test_multicrop_rejects_crops_under_two_pixels(sizes):
    with pytest.raises(ValueError, match="at least 2 px"):
        A.MultiCrop(*sizes, 2)


def test_multicrop_at_two_pixels_blurs_like_the_per_op_functions():
    """The smallest crop the blur's reflect padding allows: the compiled path still equals
    the per-op composition (and reads nothing outside the image)."""
    images = (_rand(4, 3, 12, 12, seed=21) * 255).to(torch.uint8)
    mc = A.MultiCrop(2, 2, 2, blur_p=(1.0, 1.0, 1.0), jitter_p=1.0, solarize_p=1.0)
    views = mc(images, generator=_gen(8))
    g = _gen(8)
    for v, r in zip(views, mc.views):
        torch.testing.assert_close(v, _per_op_view(mc, images, r, g), atol=2e-5, rtol=0)
