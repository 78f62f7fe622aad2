"""Rendering: fixed masks and banks built once per set, then a per-image pipeline whose bytes
depend on (spec, index) only (see the package docstring on determinism)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from shared.data.synthetic.recipes import (
    COLOURS,
    FONT,
    GLYPHS,
    PATTERNS,
    SHAPES,
    GroupRecipe,
    SyntheticProductsSpec,
    uniforms,
)


def _rgb(name: str) -> tuple[float, float, float]:
    return tuple(c / 255.0 for c in COLOURS[name])


def _luma(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


# Badge (centre x, centre y, radius) per shape, in texture units [-1, 1]: where the logo
# sits so that it stays inside every shape.
_BADGES = {
    "round": (0.0, 0.0, 0.5),
    "square": (0.0, 0.0, 0.5),
    "triangle": (0.0, 0.3, 0.4),
    "diamond": (0.0, 0.0, 0.45),
    "hexagon": (0.0, 0.0, 0.5),
    "star": (0.0, 0.04, 0.36),
    "cross": (0.0, 0.0, 0.36),
    "oval": (0.0, 0.0, 0.46),
    "bottle": (0.0, 0.3, 0.44),
    "arch": (0.0, 0.12, 0.48),
}

# ---------------------------------------------------------------------------------------
# Fixed masks (computed once per data set): shapes, badges, glyph cells, patterns.
# ---------------------------------------------------------------------------------------


def _coords(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1] (grid_sample's align_corners=False convention)."""
    t = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    return t[None, :].expand(size, size), t[:, None].expand(size, size)


def _soft(d: torch.Tensor, width: float) -> torch.Tensor:
    """Anti-aliased inside mask of a signed distance (negative inside)."""
    return (0.5 - d / width).clamp(0.0, 1.0)


def _box(u, v, hx, hy, r=0.0, cx=0.0, cy=0.0):
    qx = (u - cx).abs() - hx + r
    qy = (v - cy).abs() - hy + r
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0) - r


def _shape_sdf(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance of each shape; all fit inside [-0.95, 0.95]."""
    au, r = u.abs(), torch.sqrt(u * u + v * v)
    if name == "round":
        return r - 0.88
    if name == "square":
        return _box(u, v, 0.78, 0.78, 0.12)
    if name == "triangle":
        side = (1.66 * au - 0.95 * (v + 0.88)) / 1.9126
        return torch.maximum(v - 0.78, side)
    if name == "diamond":
        return (au / 0.85 + v.abs() / 0.95 - 1) * 0.63
    if name == "hexagon":
        return torch.maximum(au - 0.78, 0.5 * au + 0.866 * v.abs() - 0.78)
    if name == "star":
        k = torch.atan2(u, -v) * (5 / (2 * math.pi))
        edge = 0.92 - 0.5 * 2 * (k - k.round()).abs()
        return (r - edge) * 0.7
    if name == "cross":
        return torch.minimum(_box(u, v, 0.38, 0.9, 0.06), _box(u, v, 0.9, 0.38, 0.06))
    if name == "oval":
        return (torch.sqrt((u / 0.93) ** 2 + (v / 0.66) ** 2) - 1) * 0.66
    if name == "bottle":
        return torch.minimum(
            _box(u, v, 0.56, 0.6, 0.16, cy=0.3), _box(u, v, 0.22, 0.3, 0.05, cy=-0.55)
        )
    if name == "arch":
        top = torch.sqrt(u * u + (v + 0.1) ** 2) - 0.8
        return torch.minimum(top, _box(u, v, 0.8, 0.45, 0.04, cy=0.4))
    raise KeyError(name)


def _pattern_mask(name: str, u: torch.Tensor, v: torch.Tensor, aa: float) -> torch.Tensor:
    """Where the second palette colour shows, in [0, 1]."""
    tau = 2 * math.pi

    def wave(s):
        return (0.5 + 3.0 * s).clamp(0.0, 1.0)

    def rep(x, period):
        return x - period * torch.round(x / period)

    if name == "plain":
        return torch.zeros_like(u)
    if name == "striped":
        return wave(torch.sin(tau * v / 0.4))
    if name == "pinstripe":
        return _soft(rep(u, 0.3).abs() - 0.05, aa)
    if name == "diagonal":
        return wave(torch.sin(tau * (u + v) / 0.55))
    if name == "checked":
        return wave(torch.sin(math.pi * u / 0.32) * torch.sin(math.pi * v / 0.32))
    if name == "polka-dot":
        return _soft(torch.sqrt(rep(u, 0.4) ** 2 + rep(v, 0.4) ** 2) - 0.12, aa)
    if name == "ringed":
        return wave(torch.sin(tau * torch.sqrt(u * u + v * v) / 0.36))
    if name == "gradient":
        return ((v + 0.8) / 1.6).clamp(0.0, 1.0)
    if name == "zigzag":
        return wave(torch.sin(tau * (v + 0.5 * rep(u, 0.4).abs()) / 0.4))
    if name == "two-tone":
        return _soft(-u, aa)
    if name == "grid":
        return _soft(torch.minimum(rep(u, 0.36).abs(), rep(v, 0.36).abs()) - 0.045, aa)
    if name == "banded":
        return _soft(v + 0.35, aa)
    raise KeyError(name)


class _Masks:
    """The fixed ingredient masks at texture resolution T: stacked per shape / pattern."""

    def __init__(self, size: int) -> None:
        u, v = _coords(size)
        aa = 2.0 / size
        self.alpha = torch.stack([_soft(_shape_sdf(s, u, v), aa) for s in SHAPES])
        self.pattern = torch.stack([_pattern_mask(p, u, v, aa) for p in PATTERNS])
        badge, cells = [], []
        for s in SHAPES:
            bx, by, br = _BADGES[s]
            badge.append(_soft(torch.sqrt((u - bx) ** 2 + (v - by) ** 2) - br, aa))
            gh = 1.3 * br  # glyph box height; width keeps the 5:7 cell aspect
            gw = gh * 5 / 7
            col = torch.floor((u - (bx - gw / 2)) / gw * 5)
            row = torch.floor((v - (by - gh / 2)) / gh * 7)
            inside = (col >= 0) & (col < 5) & (row >= 0) & (row < 7)
            cells.append(torch.where(inside, row * 5 + col, torch.full_like(u, 35)).long())
        self.badge = torch.stack(badge)
        self.cells = torch.stack(cells).flatten(1)  # [shapes, T*T] index into 36 cells
        font = torch.zeros(len(GLYPHS), 36)
        for i, g in enumerate(GLYPHS):
            bits = FONT[g].replace(" ", "")
            font[i, :35] = torch.tensor([b == "#" for b in bits], dtype=torch.float32)
        self.font = font
        # Soft radial shading so products read as objects, not flat stickers.
        self.shade = 1.06 - 0.16 * (u * u + v * v)


# ---------------------------------------------------------------------------------------
# Per-image parameters.
# ---------------------------------------------------------------------------------------

_PARAMS = (
    "scale", "rot", "aspect", "shear", "tx", "ty", "px", "py",
    "shadow", "shadow_dx", "shadow_dy",
    "plain", "plain_level", "plain_tint", "bank", "bg_perm", "bg_zoom", "bg_rot", "bg_ox",
    "bg_oy", "bg_gain",
    "occ", "occ_x", "occ_y", "occ_w", "occ_h", "occ_round", "occ_r", "occ_g", "occ_b",
    "light", "cast_r", "cast_g", "cast_b", "grad", "grad_t", "grad_sign",
    "spec", "spec_x", "spec_y", "spec_r",
    "blur", "blur2", "noise", "noise_at",
)  # fmt: skip
_BG_BANK = 12  # clutter backgrounds; each is stored in all 6 channel orders
_PERMS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
_NOISE_SPAN = 1 << 16  # noise windows start anywhere in this span of a white-noise strip


def _rot(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of the angle 2*atan(t), rationally: no libm calls, bit-stable everywhere."""
    d = 1 + t * t
    return (1 - t * t) / d, 2 * t / d


def _binomial(img: torch.Tensor) -> torch.Tensor:
    """Separable [1, 2, 1] / 4 blur with replicated edges, from slices (batch-invariant)."""
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    h = p[..., :, :-2] + p[..., :, 2:]
    h += 2 * p[..., :, 1:-1]
    v = h[..., :-2, :] + h[..., 2:, :]
    v += 2 * h[..., 1:-1, :]
    return v.mul_(0.0625)


class Renderer:
    """Renders a set's images: the fixed banks are built once, on first use, then each chunk
    of images goes through the per-image pipeline."""

    def __init__(self, spec: SyntheticProductsSpec, recipes: Sequence[GroupRecipe]) -> None:
        self.spec = spec
        self._shape_id = torch.tensor([SHAPES.index(r.shape) for r in recipes])
        self._pattern_id = torch.tensor([PATTERNS.index(r.pattern) for r in recipes])
        self._glyph_id = torch.tensor([GLYPHS.index(r.glyph) for r in recipes])
        self._colours = torch.tensor([self._group_colours(r) for r in recipes])
        # Render in chunks of about 2**17 pixels: each chunk's tensors stay in cache.
        self._chunk = max(1, 2**17 // spec.image_size**2)

    @staticmethod
    def _group_colours(r: GroupRecipe) -> list[list[float]]:
        """Body, pattern, badge and glyph colours: the glyph gets the best contrast."""
        pal = [_rgb(c) for c in r.palette]
        body, second = pal[0], pal[1]
        badge = pal[2] if len(pal) > 2 else second
        ink = max(pal[:2] if len(pal) > 2 else pal[:1], key=lambda c: abs(_luma(c) - _luma(badge)))
        if abs(_luma(ink) - _luma(badge)) < 0.25:  # still too faint: black or white ink
            ink = _rgb("black") if _luma(badge) > 0.5 else _rgb("white")
        return [list(body), list(second), list(badge), list(ink)]

    # --- fixed banks, built once -------------------------------------------------------

    @cached_property
    def _masks(self) -> _Masks:
        return _Masks(self.spec.image_size)

    @cached_property
    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _coords(self.spec.image_size)
        return x[None].contiguous(), y[None].contiguous()

    @cached_property
    def _bg_atlas(self) -> torch.Tensor:
        """Clutter backgrounds (rects, ellipses, rings, stripes) as one tall atlas.

        Every background is stored in all six channel orders, so a colour-permuted crop is
        one ``grid_sample`` of an expanded view: no copy, no gather per image.
        """
        # numpy, single-threaded: hundreds of small ops that thread pools only slow down.
        size = 2 * self.spec.image_size
        t1 = (np.arange(size, dtype=np.float32) * 2 + 1) / size - 1
        u, v = np.meshgrid(t1, t1)
        rng = random.Random(f"bg-{self.spec.seed}")
        palette = [_rgb(c) for c in COLOURS]

        def box(ur, vr, hx, hy, r):
            qx, qy = np.abs(ur) - hx + r, np.abs(vr) - hy + r
            out = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
            return out + np.minimum(np.maximum(qx, qy), 0) - r

        tiles = []
        for _ in range(_BG_BANK):
            c0 = np.array([0.2 + 0.6 * rng.random() for _ in "rgb"], np.float32)[:, None, None]
            c1 = np.array([0.2 + 0.6 * rng.random() for _ in "rgb"], np.float32)[:, None, None]
            a = rng.uniform(0, 2 * math.pi)
            t = (u * math.cos(a) + v * math.sin(a)) * 0.5 + 0.5
            img = c0 * (1 - t) + c1 * t
            for _ in range(28):
                # Mostly muted colours, some product colours as distractors.
                if rng.random() < 0.25:
                    rgb = rng.choice(palette)
                else:
                    rgb = [0.15 + 0.7 * rng.random() for _ in "rgb"]
                col = np.array(rgb, np.float32)[:, None, None]
                cx, cy = rng.uniform(-1.1, 1.1), rng.uniform(-1.1, 1.1)
                hx, hy = rng.uniform(0.05, 0.45), rng.uniform(0.05, 0.45)
                ang = rng.uniform(0, math.pi)
                ur = (u - cx) * math.cos(ang) + (v - cy) * math.sin(ang)
                vr = (v - cy) * math.cos(ang) - (u - cx) * math.sin(ang)
                kind = rng.randrange(4)
                if kind == 0:
                    d = box(ur, vr, hx, hy, min(hx, hy) * rng.random())
                elif kind == 1:
                    d = (np.sqrt((ur / hx) ** 2 + (vr / hy) ** 2) - 1) * min(hx, hy)
                elif kind == 2:
                    d = np.abs(np.sqrt(ur**2 + vr**2) - hx) - 0.02 - 0.04 * rng.random()
                else:
                    stripes = np.sin(ur * (2 * math.pi / rng.uniform(0.08, 0.3))) * -0.05
                    d = np.maximum(box(ur, vr, hx, hy, 0.0), stripes)
                m = np.clip(0.5 - d * (size / 2.0), 0.0, 1.0)
                img = img + m * (col - img)
            tiles.extend(torch.from_numpy(img[list(perm)].astype(np.float32)) for perm in _PERMS)
        return torch.cat(tiles, dim=1)[None].contiguous()  # [1, 3, BANK*6*2S, 2S]

    @cached_property
    def _noise_windows(self) -> torch.Tensor:
        """A strip of white noise viewed as overlapping windows of one image's size."""
        n = 3 * self.spec.image_size**2
        gen = torch.Generator().manual_seed(self.spec.seed * 7919 + 13)
        return torch.randn(n + _NOISE_SPAN, generator=gen).unfold(0, n, 1)

    # --- rendering ---------------------------------------------------------------------

    def _textures(self, groups: torch.Tensor) -> torch.Tensor:
        """Premultiplied RGBA textures [U,4,T,T] of the given groups, from the fixed masks."""
        m = self._masks
        shape, cols = self._shape_id[groups], self._colours[groups][..., None, None]
        pat = m.pattern[self._pattern_id[groups]][:, None]
        badge = m.badge[shape][:, None]
        glyph = torch.gather(m.font[self._glyph_id[groups]], 1, m.cells[shape])
        glyph = glyph.view(-1, 1, *pat.shape[-2:])
        body = cols[:, 0] + pat * (cols[:, 1] - cols[:, 0])
        inner = cols[:, 2] + glyph * (cols[:, 3] - cols[:, 2])
        rgb = (body + badge * (inner - body)) * m.shade
        alpha = m.alpha[shape][:, None]
        return torch.cat([rgb.clamp(0, 1) * alpha, alpha], dim=1)

    def _params(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image nuisance values from a hash of (seed, index).

        Float values come as [N,1,1,1] float32, on/off switches as [N] bool, integer
        offsets as [N] int64. Arithmetic here is float64 numpy (+ - * / only).
        """
        n, size = self.spec.nuisance, self.spec.image_size
        u = dict(
            zip(_PARAMS, uniforms(self.spec.seed, 3, idx.numpy(), len(_PARAMS)).T, strict=True)
        )

        def spread(x, lo, hi, neutral):
            return neutral + n * (lo + (hi - lo) * x - neutral)

        p: dict[str, np.ndarray] = {}
        # Viewpoint: M maps output coordinates to texture coordinates (the inverse view).
        s = spread(u["scale"], 0.55, 0.95, 0.8)
        c, si = _rot(spread(u["rot"], -0.27, 0.27, 0.0))  # about +-30 degrees
        asp = spread(u["aspect"], 0.82, 1.18, 1.0)
        sh = spread(u["shear"], -0.15, 0.15, 0.0)
        # M = diag(1/asp, asp) @ [[1, sh], [0, 1]] @ R(-theta) / s
        a11, a12, a21, a22 = c / s, si / s, -si / s, c / s
        p["m11"], p["m12"] = (a11 + sh * a21) / asp, (a12 + sh * a22) / asp
        p["m21"], p["m22"] = a21 * asp, a22 * asp
        room = np.maximum(0.0, 1.02 - 0.9 * s)
        p["tx"] = spread(u["tx"], -1, 1, 0) * room
        p["ty"] = spread(u["ty"], -1, 1, 0) * room
        p["px"] = spread(u["px"], -0.12, 0.12, 0.0)
        p["py"] = spread(u["py"], -0.12, 0.12, 0.0)
        p["shadow"] = spread(u["shadow"], 0.0, 0.4, 0.0)
        # Background: a plain "studio" backdrop, or a rotated, zoomed crop of a clutter tile.
        level = 0.72 + 0.26 * u["plain_level"]
        tint = (u["plain_tint"] - 0.5) * 0.08
        p["plain_r"], p["plain_g"], p["plain_b"] = level + tint, level, level - tint
        z = 0.35 + 0.3 * u["bg_zoom"]
        bc, bs = _rot(u["bg_rot"] * 2 - 1)
        free = np.maximum(0.0, 0.98 - z * (np.abs(bc) + np.abs(bs)))  # stay inside the tile
        tiles = _BG_BANK * len(_PERMS)
        tile = np.floor(u["bank"] * _BG_BANK) * len(_PERMS) + np.floor(u["bg_perm"] * 6)
        # Tile k spans atlas rows [2k, 2k+2] / tiles - 1 in grid_sample's [-1, 1].
        p["b11"], p["b12"], p["b21"], p["b22"] = z * bc, -z * bs, z * bs / tiles, z * bc / tiles
        p["box"] = (u["bg_ox"] * 2 - 1) * free
        p["boy"] = ((u["bg_oy"] * 2 - 1) * free + 2 * tile + 1) / tiles - 1
        p["bg_gain"] = 0.6 + 0.5 * u["bg_gain"]
        # Occluder (a hand, a sticker, another item) near the product.
        p["occ_x"] = p["tx"] + (u["occ_x"] * 2 - 1) * 0.5 * s
        p["occ_y"] = p["ty"] + (u["occ_y"] * 2 - 1) * 0.5 * s
        p["occ_w"] = 0.1 + 0.25 * u["occ_w"] * s
        p["occ_h"] = 0.1 + 0.25 * u["occ_h"] * s
        p["occ_round"] = (u["occ_round"] < 0.5).astype(np.float64)
        for ch in "rgb":
            p[f"occ_{ch}"] = u[f"occ_{ch}"]
        # Lighting: exposure, colour cast, a linear falloff, a specular highlight.
        light = spread(u["light"], 0.65, 1.25, 1.0)
        for ch in "rgb":
            p[f"gain_{ch}"] = light * (1 + spread(u[f"cast_{ch}"], -0.12, 0.12, 0.0))
        gc, gs = _rot(u["grad_t"] * 2 - 1)
        g = spread(u["grad"], 0.0, 0.35, 0.0) * np.where(u["grad_sign"] < 0.5, -1.0, 1.0)
        p["grad_x"], p["grad_y"] = g * gc, g * gs
        p["spec_x"] = p["tx"] + (u["spec_x"] * 2 - 1) * 0.4 * s
        p["spec_y"] = p["ty"] + (u["spec_y"] * 2 - 1) * 0.4 * s
        p["spec_r2"] = (0.15 + 0.25 * u["spec_r"] * s) ** 2
        # Camera: defocus blur (one or two binomial passes) and sensor noise.
        p["blur"] = np.clip(spread(u["blur"], -0.5, 1.0, 0.0), 0.0, 1.0)
        p["noise"] = spread(u["noise"], 0.0, 0.06, 0.0)
        out = {k: torch.from_numpy(v.astype(np.float32)).view(-1, 1, 1, 1) for k, v in p.items()}
        flags = {
            "is_plain": u["plain"] < 1 - 0.7 * min(n, 1.0),
            "is_occ": u["occ"] < 0.35 * n,
            "is_spec": u["spec"] < 0.5 * n,
            "is_blur": p["blur"] > 0,
            "is_blur2": u["blur2"] < 0.25 * n,
        }
        out.update({k: torch.from_numpy(v) for k, v in flags.items()})
        shift = max(1, round(0.05 * size))  # shadow offset in whole pixels
        out["shadow_dx"] = torch.from_numpy(np.floor(u["shadow_dx"] * (2 * shift + 1))).long()
        out["shadow_dy"] = torch.from_numpy(np.floor(u["shadow_dy"] * (shift + 1))).long()
        out["noise_at"] = torch.from_numpy(np.floor(u["noise_at"] * _NOISE_SPAN)).long()
        return out

    def render(self, idx: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Images ``idx`` (of groups ``groups``) as uint8 [N,3,H,W], chunk by chunk."""
        size = self.spec.image_size
        out = torch.empty(len(idx), 3, size, size, dtype=torch.uint8)
        for start in range(0, len(idx), self._chunk):
            part = slice(start, start + self._chunk)
            out[part] = self._render_chunk(idx[part], groups[part])
        return out

    def _render_chunk(self, idx: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """The per-image pipeline. Only element-wise ops, slices and ``grid_sample``: an
        image's bytes never depend on which other images share its chunk."""
        p = self._params(idx)
        x, y = self._grid  # [1,S,S]
        n, size = len(idx), self.spec.image_size

        def col(name: str, sel=slice(None)) -> torch.Tensor:  # [n,1,1] for [n,S,S] maths
            return p[name][sel, 0]

        # Product: sample its texture through the inverse viewpoint map with perspective.
        uniq, inv = torch.unique(groups, return_inverse=True)
        tex = self._textures(uniq).index_select(0, inv)
        xs, ys = x - col("tx"), y - col("ty")
        w = col("px") * xs
        w += col("py") * ys
        w += 1
        gu = col("m11") * xs
        gu += col("m12") * ys
        gu /= w
        gv = col("m21") * xs
        gv += col("m22") * ys
        gv /= w
        fg = F.grid_sample(tex, torch.stack((gu, gv), dim=-1), align_corners=False)
        alpha = fg[:, 3:]

        # Background: plain backdrop or a clutter crop; then the product's drop shadow.
        bg = torch.empty(n, 3, size, size)
        plain = p["is_plain"]
        if plain.any():
            rgb = torch.cat([p["plain_r"][plain], p["plain_g"][plain], p["plain_b"][plain]], 1)
            bg[plain] = rgb + 0.04 * y[:, None]  # a soft studio gradient
        clutter = ~plain
        if clutter.any():
            bu = col("b11", clutter) * x
            bu += col("b12", clutter) * y
            bu += col("box", clutter)
            bv = col("b21", clutter) * x
            bv += col("b22", clutter) * y
            bv += col("boy", clutter)
            atlas = self._bg_atlas.expand(int(clutter.sum()), -1, -1, -1)
            crop = F.grid_sample(atlas, torch.stack((bu, bv), dim=-1), align_corners=False)
            bg[clutter] = crop.mul_(p["bg_gain"][clutter])
        shift = max(1, round(0.05 * size))
        padded = F.pad(alpha, (shift, shift, shift, shift))
        shadow = torch.stack(
            [
                padded[i, :, shift - dy : shift - dy + size, shift - dx : shift - dx + size]
                for i, (dx, dy) in enumerate(
                    zip((p["shadow_dx"] - shift).tolist(), p["shadow_dy"].tolist(), strict=True)
                )
            ]
        )
        bg *= 1 - p["shadow"] * shadow

        # Composite (premultiplied texture).
        img = bg.mul_(1 - alpha).add_(fg[:, :3])

        # Specular highlight on the product.
        sel = p["is_spec"]
        if sel.any():
            d2 = (x - col("spec_x", sel)) ** 2 + (y - col("spec_y", sel)) ** 2
            hl = (1 - d2 / col("spec_r2", sel)).clamp_(min=0)[:, None]
            hl = hl * hl * alpha[sel] * 0.45
            img[sel] = img[sel] + hl * (1 - img[sel])

        # Occluder: a rectangle or an ellipse.
        sel = p["is_occ"]
        if sel.any():
            ox, oy = (x - col("occ_x", sel)).abs(), (y - col("occ_y", sel)).abs()
            w, h = col("occ_w", sel), col("occ_h", sel)
            d_rect = torch.maximum(ox - w, oy - h)
            d_ell = (torch.sqrt((ox / w) ** 2 + (oy / h) ** 2) - 1) * torch.minimum(w, h)
            d = d_rect + col("occ_round", sel) * (d_ell - d_rect)
            occ = _soft(d, 2.0 / size)[:, None]
            rgb = torch.cat([p["occ_r"][sel], p["occ_g"][sel], p["occ_b"][sel]], dim=1)
            img[sel] = img[sel] + occ * (rgb - img[sel])

        # Lighting: exposure and colour cast, then a linear falloff across the frame.
        img *= torch.cat([p["gain_r"], p["gain_g"], p["gain_b"]], dim=1)
        falloff = col("grad_x") * x
        falloff += col("grad_y") * y
        falloff += 1
        img *= falloff[:, None]
        img.clamp_(0, 1)

        # Defocus: one or two binomial passes, blended per image.
        sel = p["is_blur"]
        if sel.any():
            part = img[sel]
            b = _binomial(part)
            two = p["is_blur2"][sel]
            if two.any():
                b[two] = _binomial(b[two])
            b -= part
            b *= p["blur"][sel]
            img[sel] = part.add_(b)

        # Sensor noise: a window of a white-noise strip, at a per-image offset.
        noise = self._noise_windows.index_select(0, p["noise_at"]).view_as(img)
        img += noise.mul_(p["noise"])
        return img.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
