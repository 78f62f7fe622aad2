"""A deterministic synthetic "products" data set, embedded so every pipeline runs offline.

Each product group is a recipe: a shape, a 2-3 colour palette, a pattern and a one-glyph
"logo" on a badge. Groups come in families that share shape and palette and differ only in
the logo or the pattern, so every family is a nest of hard negatives (like listings of one
product line). Each image is one listing photo of its group: viewpoint (rotation, scale,
shear, perspective), position, background clutter, shadow, lighting, occlusion, blur and
sensor noise all change per image, so raw pixels are a weak feature but the recipe is
learnable at 64 px.

Determinism: image ``i`` depends only on (spec, i). Per-image random numbers come from a
counter-based hash (SplitMix64) of (seed, index), never from a stateful generator, and the
per-pixel pipeline uses only element-wise IEEE operations (+ - * / sqrt, min/max, gathers)
and ``grid_sample``, which computes each sample separately. So ``render`` returns the same
bytes for an image whatever batch it is rendered in, in any order, with any thread count.
Transcendental functions (sin, atan2), whose vectorised and scalar versions may differ in
the last bit, only run once per data set on fixed-size tensors (masks, banks). Across
different CPUs or torch builds (other SIMD paths in ``grid_sample``) a rare pixel may still
differ by one level; ``GENERATOR_VERSION`` marks deliberate changes.

The set can also write itself out as image files plus a Shopee-style CSV
(``posting_id,image,label_group,image_phash,title``) or as ImageFolder class folders, so the
file ingestion paths are exercised by the very same data.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared.data.publish import build_once

# Bump when a change alters any rendered byte or title: on-disk copies keyed on it go stale.
GENERATOR_VERSION = 2

# ---------------------------------------------------------------------------------------
# Vocabulary: colours, shapes, patterns, glyphs, words.
# ---------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 140, 20),
    "yellow": (240, 210, 30),
    "lime": (150, 210, 50),
    "green": (30, 130, 60),
    "teal": (0, 150, 150),
    "sky": (90, 180, 240),
    "navy": (25, 45, 120),
    "purple": (130, 60, 170),
    "pink": (240, 120, 190),
    "brown": (120, 75, 35),
    "black": (25, 25, 25),
    "white": (245, 245, 240),
    "grey": (140, 140, 140),
}
# Palette colours must be this far apart (RGB distance) so a pattern or a badge is visible.
_MIN_COLOUR_DISTANCE = 100.0

SHAPES = (
    "round", "square", "triangle", "diamond", "hexagon", "star", "cross", "oval", "bottle",
    "arch",
)  # fmt: skip
PATTERNS = (
    "plain", "striped", "pinstripe", "diagonal", "checked", "polka-dot", "ringed",
    "gradient", "zigzag", "two-tone", "grid", "banded",
)  # fmt: skip
NOUNS = ("tin", "jar", "box", "pouch", "flask", "case", "mug", "pack", "tube", "bag", "can")

# 5x7 bitmap font: the "logo" glyphs. Row strings, '#' = ink.
_FONT = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "####. ....# ....# .###. ....# ....# ####.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
}
GLYPHS = tuple(_FONT)
_SYLLABLES = ("ka", "vo", "ri", "lu", "me", "sa", "to", "ni", "po", "de", "za", "mi", "ro")
_TITLE_PREFIXES = ("[READY STOCK]", "ORIGINAL", "PROMO", "NEW", "Hot Sale", "COD", "Murah")
_SHOP_WORDS = ("grosir", "free ongkir", "best seller", "kualitas premium", "import", "viral")
_TITLE_SUFFIXES = ("250ml", "500ml", "1kg", "isi 12", "1 pcs", "2 pcs", "termurah", "bpom")

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


def _rgb(name: str) -> tuple[float, float, float]:
    return tuple(c / 255.0 for c in COLOURS[name])


def _luma(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _valid_palette(names: Sequence[str]) -> bool:
    cols = [np.array(COLOURS[n], dtype=float) for n in names]
    return all(np.linalg.norm(a - b) >= _MIN_COLOUR_DISTANCE for a, b in combinations(cols, 2))


_PALETTE_SETS = [
    frozenset(c) for k in (2, 3) for c in combinations(sorted(COLOURS), k) if _valid_palette(c)
]
MAX_FAMILIES = len(SHAPES) * len(_PALETTE_SETS)
# A family's groups differ from its base group in exactly one of pattern or glyph.
MAX_GROUPS_PER_FAMILY = len(PATTERNS) + len(GLYPHS) - 1


# ---------------------------------------------------------------------------------------
# Counter-based randomness: a value depends on (seed, stream, id, k) only.
# ---------------------------------------------------------------------------------------

_U64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic is what we want)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, stream: int, ids: np.ndarray, n: int) -> np.ndarray:
    """[len(ids), n] float64 uniforms in [0, 1), a pure function of (seed, stream, id, k)."""
    key = _mix64(
        np.array(
            [(seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) & _U64], dtype=np.uint64
        )
    )
    base = _mix64(key ^ np.asarray(ids, dtype=np.uint64))
    k = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h = _mix64(base[:, None] + k[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ---------------------------------------------------------------------------------------
# Spec and recipes.
# ---------------------------------------------------------------------------------------


@dataclass
class SyntheticProductsSpec:
    """Sizes and seed of a synthetic products set; plain values so Hydra can build it.

    Group sizes are drawn in [min_instances, max_instances], skewed towards small groups as
    in Shopee's listings. ``nuisance`` scales every per-image nuisance (0 = centred product
    on a plain background, 1 = the default difficulty).
    """

    num_families: int = 40
    groups_per_family: int = 4
    min_instances: int = 2
    max_instances: int = 8
    image_size: int = 64
    seed: int = 0
    nuisance: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.num_families <= MAX_FAMILIES:
            raise ValueError(
                f"num_families must be in [1, {MAX_FAMILIES}], got {self.num_families}"
            )
        if not 1 <= self.groups_per_family <= MAX_GROUPS_PER_FAMILY:
            raise ValueError(
                f"groups_per_family must be in [1, {MAX_GROUPS_PER_FAMILY}], "
                f"got {self.groups_per_family}"
            )
        if self.min_instances < 2:
            raise ValueError(
                "min_instances must be >= 2: a product group is only matchable "
                f"if it has another listing, got {self.min_instances}"
            )
        if self.max_instances < self.min_instances:
            raise ValueError(
                f"max_instances ({self.max_instances}) must be >= min_instances "
                f"({self.min_instances})"
            )
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [16, 1024], got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.nuisance <= 2.0:
            raise ValueError(f"nuisance must be in [0, 2], got {self.nuisance}")


@dataclass(frozen=True)
class GroupRecipe:
    """What makes a product group: family traits (shape, palette) plus pattern and logo."""

    group: int
    family: int
    shape: str
    palette: tuple[str, ...]
    pattern: str
    glyph: str
    brand: str
    noun: str
    label_group: int

    @property
    def title(self) -> str:
        """The clean listing title; instances add noise to it."""
        colours = "/".join(self.palette[:2])
        return f"{self.brand} {self.pattern} {self.shape} {self.noun} {colours}"


def _brand(seed: int, glyph: str) -> str:
    """A made-up brand name that starts with (or ends in) the logo glyph."""
    rng = random.Random(f"brand-{seed}-{glyph}")
    word = "".join(rng.choice(_SYLLABLES) for _ in range(2))
    return glyph + word if glyph.isalpha() else word.capitalize() + glyph


def _make_recipes(spec: SyntheticProductsSpec) -> list[GroupRecipe]:
    """Families draw a unique (shape, colour set); groups vary pattern or logo off a base.

    Family ``f`` depends only on the seed and families before it, so growing
    ``num_families`` keeps the earlier families unchanged.
    """
    recipes: list[GroupRecipe] = []
    used: set[tuple[int, frozenset]] = set()
    colour_names = sorted(COLOURS)
    label_offset = int(_uniforms(spec.seed, 7, np.array([0]), 1)[0, 0] * 2**32)
    for f in range(spec.num_families):
        rng = np.random.default_rng([spec.seed, 1, f])
        while True:
            shape = int(rng.integers(len(SHAPES)))
            k = int(rng.integers(2, 4))
            palette = tuple(colour_names[i] for i in rng.choice(len(colour_names), k, False))
            key = (shape, frozenset(palette))
            if key not in used and _valid_palette(palette):
                used.add(key)
                break
        noun = NOUNS[int(rng.integers(len(NOUNS)))]
        base_pattern = int(rng.integers(len(PATTERNS)))
        base_glyph = int(rng.integers(len(GLYPHS)))
        other_patterns = [p for p in rng.permutation(len(PATTERNS)) if p != base_pattern]
        other_glyphs = [g for g in rng.permutation(len(GLYPHS)) if g != base_glyph]
        variants = [(base_pattern, base_glyph)]
        for _ in range(spec.groups_per_family - 1):
            vary_logo = (rng.random() < 0.5 and other_glyphs) or not other_patterns
            if vary_logo:
                variants.append((base_pattern, int(other_glyphs.pop(0))))
            else:
                variants.append((int(other_patterns.pop(0)), base_glyph))
        for pattern, glyph in variants:
            g = len(recipes)
            recipes.append(
                GroupRecipe(
                    group=g,
                    family=f,
                    shape=SHAPES[shape],
                    palette=palette,
                    pattern=PATTERNS[pattern],
                    glyph=GLYPHS[glyph],
                    brand=_brand(spec.seed, GLYPHS[glyph]),
                    noun=noun,
                    # An odd multiplier makes this a bijection mod 2**32: ids never collide.
                    label_group=(g * 2654435761 + label_offset) % 2**32,
                )
            )
    return recipes


def _noisy_title(title: str, seed: int, index: int) -> str:
    """Listing-style noise, so titles alone do not solve the set: sellers often leave out
    the pattern or the brand (what tells a family's groups apart), reorder, abbreviate or
    misspell a word, and add shop words; case varies."""
    rng = random.Random(f"title-{seed}-{index}")
    brand, pattern, *rest = title.split()
    words = (
        ([brand] if rng.random() >= 0.35 else [])
        + ([pattern] if rng.random() >= 0.5 else [])
        + rest
    )
    if rng.random() < 0.3:
        tail = words[1:]
        rng.shuffle(tail)
        words[1:] = tail
    i = rng.randrange(len(words))
    w = words[i]
    edit = rng.random()
    if edit < 0.3 and len(w) > 4:  # a typo: a letter dropped or doubled
        j = rng.randrange(1, len(w) - 1)
        words[i] = w[:j] + w[j + 1 :] if rng.random() < 0.5 else w[:j] + w[j] + w[j:]
    elif edit < 0.55 and len(w) > 4 and "/" not in w:  # an abbreviation
        words[i] = w[: rng.choice((3, 4))]
    if rng.random() < 0.5:
        words.insert(0, rng.choice(_TITLE_PREFIXES))
    if rng.random() < 0.5:
        words.append(rng.choice(_TITLE_SUFFIXES))
    if rng.random() < 0.3:
        words.append(rng.choice(_SHOP_WORDS))
    out = " ".join(words)
    case = rng.random()
    if case < 0.2:
        return out.lower()
    if case < 0.35:
        return out.upper()
    if case < 0.5:
        return out.title()
    return out


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
            bits = _FONT[g].replace(" ", "")
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


# ---------------------------------------------------------------------------------------
# The data set.
# ---------------------------------------------------------------------------------------


class SyntheticProducts:
    """The synthetic products set: labels up front, images rendered on demand in batches.

    Images are ordered by group (group 0's instances first). ``labels`` are group ids
    0..G-1, ``families`` the family id of each image.
    """

    def __init__(self, spec: SyntheticProductsSpec | Mapping | None = None, **overrides) -> None:
        if spec is None:
            spec = SyntheticProductsSpec(**overrides)
        elif isinstance(spec, Mapping):
            spec = SyntheticProductsSpec(**{**spec, **overrides})
        elif overrides:
            spec = replace(spec, **overrides)
        self.spec = spec
        self.recipes: tuple[GroupRecipe, ...] = tuple(_make_recipes(spec))
        g = len(self.recipes)
        u = _uniforms(spec.seed, 2, np.arange(g), 1)[:, 0]
        span = spec.max_instances - spec.min_instances + 1
        # u**2 skews sizes towards the minimum: most listings have few duplicates.
        sizes = spec.min_instances + np.minimum(np.floor(span * u * u), span - 1)
        self.group_sizes = torch.as_tensor(sizes, dtype=torch.int64)
        self.labels = torch.repeat_interleave(torch.arange(g), self.group_sizes)
        fam = torch.tensor([r.family for r in self.recipes], dtype=torch.int64)
        self.families = fam[self.labels]
        self.label_groups = torch.tensor([r.label_group for r in self.recipes])[self.labels]
        self._shape_id = torch.tensor([SHAPES.index(r.shape) for r in self.recipes])
        self._pattern_id = torch.tensor([PATTERNS.index(r.pattern) for r in self.recipes])
        self._glyph_id = torch.tensor([GLYPHS.index(r.glyph) for r in self.recipes])
        self._colours = torch.tensor([self._group_colours(r) for r in self.recipes])
        # Render in chunks of about 2**17 pixels: each chunk's tensors stay in cache.
        self._chunk = max(1, 2**17 // spec.image_size**2)

    # --- sizes and metadata ------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """One (uint8 [3,H,W], label) pair; render in batches where speed matters."""
        return self.render([index])[0], int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return len(self.recipes)

    @property
    def num_families(self) -> int:
        return self.spec.num_families

    @cached_property
    def titles(self) -> list[str]:
        """One noisy listing title per image."""
        seed = self.spec.seed
        return [
            _noisy_title(self.recipes[g].title, seed, i) for i, g in enumerate(self.labels.tolist())
        ]

    @cached_property
    def posting_ids(self) -> list[str]:
        """Shopee-like ids; an odd multiplier mod 2**32 keeps them unique."""
        off = int(_uniforms(self.spec.seed, 8, np.array([0]), 1)[0, 0] * 2**32)
        return [f"train_{(i * 2246822519 + off) % 2**32:010d}" for i in range(len(self))]

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
            zip(_PARAMS, _uniforms(self.spec.seed, 3, idx.numpy(), len(_PARAMS)).T, strict=True)
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

    def _as_index(self, indices) -> torch.Tensor:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(
                f"indices must be in [0, {len(self)}), got [{int(idx.min())}, {int(idx.max())}]"
            )
        return idx

    def render(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Render images ``indices`` as uint8 [N,3,H,W]; each depends on (spec, index) only."""
        idx = self._as_index(indices)
        size = self.spec.image_size
        out = torch.empty(len(idx), 3, size, size, dtype=torch.uint8)
        for start in range(0, len(idx), self._chunk):
            chunk = idx[start : start + self._chunk]
            out[start : start + len(chunk)] = self._render_chunk(chunk)
        return out

    def _render_chunk(self, idx: torch.Tensor) -> torch.Tensor:
        """The per-image pipeline. Only element-wise ops, slices and ``grid_sample``: an
        image's bytes never depend on which other images share its chunk."""
        p = self._params(idx)
        x, y = self._grid  # [1,S,S]
        n, size = len(idx), self.spec.image_size

        def col(name: str, sel=slice(None)) -> torch.Tensor:  # [n,1,1] for [n,S,S] maths
            return p[name][sel, 0]

        # Product: sample its texture through the inverse viewpoint map with perspective.
        uniq, inv = torch.unique(self.labels[idx], return_inverse=True)
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

    def iter_batches(
        self,
        batch_size: int = 256,
        *,
        indices: Sequence[int] | None = None,
        progress: bool = False,
        desc: str = "render",
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (images uint8 [B,3,H,W], labels [B], indices [B]) over the set in order."""
        idx = self._as_index(range(len(self)) if indices is None else indices)
        with tqdm(total=len(idx), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                yield self.render(chunk), self.labels[chunk], chunk
                bar.update(len(chunk))


# ---------------------------------------------------------------------------------------
# Perceptual hash and writers.
# ---------------------------------------------------------------------------------------


def image_phash(images: torch.Tensor) -> list[str]:
    """8x8 mean hash of uint8 [N,3,H,W] images as 16 hex digits; equal images, equal hash.

    Integer arithmetic throughout, so the hash is exact and independent of the batch.
    """
    x = images.to(torch.int64)
    gray = (299 * x[:, 0] + 587 * x[:, 1] + 114 * x[:, 2]) // 1000  # [N,H,W]
    n, h, w = gray.shape
    rb = torch.arange(h) * 8 // h
    cb = torch.arange(w) * 8 // w
    cell = (rb[:, None] * 8 + cb[None, :]).flatten()
    sums = torch.zeros(n, 64, dtype=torch.int64).index_add_(1, cell, gray.flatten(1))
    counts = torch.bincount(cell, minlength=64)
    # bit = cell mean > image mean, compared by cross-multiplying (exact).
    bits = sums * (h * w) > gray.flatten(1).sum(1, keepdim=True) * counts
    # Two 32-bit halves: a 64-bit weight would overflow int64.
    w = 2 ** torch.arange(31, -1, -1, dtype=torch.int64)
    hi, lo = (bits[:, :32] * w).sum(1).tolist(), (bits[:, 32:] * w).sum(1).tolist()
    return [f"{a:08x}{b:08x}" for a, b in zip(hi, lo, strict=True)]


_MARKER = ".complete.json"


def _marker(products: SyntheticProducts, kind: str, **extra) -> dict:
    return {
        "kind": kind,
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(products.spec),
        "rows": len(products),
        **extra,
    }


def _is_complete(out_dir: Path, marker: dict) -> bool:
    try:
        return json.loads((out_dir / _MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _write_atomically(
    out_dir: Path, marker: dict, fill: Callable[[Path], None], overwrite: bool
) -> bool:
    """Build in a temp dir beside ``out_dir``, then rename it into place.

    Returns False when a complete copy with the same marker is already there (idempotent),
    also when another process wrote it while this one waited for the build lock. A crash
    leaves at most a temp dir (removed by the next build), never a half-written ``out_dir``.
    """
    out_dir = Path(out_dir)

    def fill_new(tmp: Path) -> None:
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not this data set; pass overwrite=True")
        fill(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))

    return build_once(out_dir, lambda at: _is_complete(at, marker), fill_new)


def _save_batch(
    images: torch.Tensor, paths: Sequence[Path], fmt: str, quality: int, pool: ThreadPoolExecutor
) -> None:
    from PIL import Image

    arrays = images.permute(0, 2, 3, 1).contiguous().numpy()

    def save(i: int) -> None:
        img = Image.fromarray(arrays[i])
        if fmt == "png":
            img.save(paths[i], format="PNG", compress_level=1)
        else:
            img.save(paths[i], format="JPEG", quality=quality)

    list(pool.map(save, range(len(paths))))


def write_image_folder_csv(
    products: SyntheticProducts,
    out_dir: str | Path,
    *,
    image_format: str = "png",
    jpeg_quality: int = 90,
    batch_size: int = 256,
    num_threads: int = 2,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/images/<posting_id>.<ext>`` plus ``out_dir/postings.csv``; return the CSV.

    The CSV has Shopee's columns, ``posting_id,image,label_group,image_phash,title``, with
    ``image`` relative to ``images/``. Skips the work if a complete copy of the same spec is
    there already.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out_dir = Path(out_dir)
    marker = _marker(
        products,
        "image_folder_csv",
        image_format=image_format,
        jpeg_quality=jpeg_quality if image_format == "jpg" else None,
    )

    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        ids, titles, lgs = products.posting_ids, products.titles, products.label_groups.tolist()
        with (
            open(tmp / "postings.csv", "w", newline="") as fh,
            ThreadPoolExecutor(max(1, num_threads)) as pool,
        ):
            writer = csv.writer(fh)
            writer.writerow(["posting_id", "image", "label_group", "image_phash", "title"])
            for images, _, idx in products.iter_batches(
                batch_size, progress=progress, desc=f"write {out_dir.name}"
            ):
                names = [f"{ids[i]}.{image_format}" for i in idx.tolist()]
                _save_batch(
                    images, [tmp / "images" / n for n in names], image_format, jpeg_quality, pool
                )
                for i, name, ph in zip(idx.tolist(), names, image_phash(images), strict=True):
                    writer.writerow([ids[i], name, lgs[i], ph, titles[i]])

    _write_atomically(out_dir, marker, fill, overwrite)
    return out_dir / "postings.csv"


def write_class_folders(
    products: SyntheticProducts,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    num_threads: int = 2,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the ImageFolder layout ``out_dir/<label>/<index>.png``; return ``out_dir``.

    Names are zero-padded so that ImageFolder's sorted class order equals the label ids.
    """
    out_dir = Path(out_dir)
    marker = _marker(products, "class_folders")
    lw = len(str(max(products.num_classes - 1, 0)))
    iw = len(str(max(len(products) - 1, 0)))

    def fill(tmp: Path) -> None:
        for c in range(products.num_classes):
            (tmp / f"{c:0{lw}d}").mkdir()
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            for images, labels, idx in products.iter_batches(
                batch_size, progress=progress, desc=f"write {out_dir.name}"
            ):
                paths = [
                    tmp / f"{c:0{lw}d}" / f"{i:0{iw}d}.png"
                    for c, i in zip(labels.tolist(), idx.tolist(), strict=True)
                ]
                _save_batch(images, paths, "png", 0, pool)

    _write_atomically(out_dir, marker, fill, overwrite)
    return out_dir


__all__ = [
    "GENERATOR_VERSION",
    "GroupRecipe",
    "SyntheticProducts",
    "SyntheticProductsSpec",
    "image_phash",
    "write_class_folders",
    "write_image_folder_csv",
]
