"""The synthetic set's vocabulary, its counter-based randomness, its spec and group recipes.

Everything else (titles, rendering, writers) derives from a `SyntheticProductsSpec` and the
`GroupRecipe`s `make_recipes` draws from it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

# Bump when a change alters any rendered byte or title: on-disk copies keyed on it go stale.
GENERATOR_VERSION = 3

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
# Title-only words: a family's product line, and the details that tell its groups apart
# (sizes or model numbers; `titles.py` writes each several ways).
LINES = (
    "premium", "travel", "mini", "jumbo", "classic", "kids", "outdoor", "deluxe", "slim",
    "eco", "pro", "home",
)  # fmt: skip
SIZES = ("100ml", "250ml", "350ml", "500ml", "750ml", "1L", "100g", "250g", "500g", "1kg")

# 5x7 bitmap font: the "logo" glyphs. Row strings, '#' = ink.
FONT = {
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
GLYPHS = tuple(FONT)
_SYLLABLES = ("ka", "vo", "ri", "lu", "me", "sa", "to", "ni", "po", "de", "za", "mi", "ro")


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


def uniforms(seed: int, stream: int, ids: np.ndarray, n: int) -> np.ndarray:
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
    """What makes a product group: family traits (shape, palette) plus pattern and logo.

    Title-only traits: the family's ``brand``, ``noun`` and product ``line`` word; the
    group's ``detail`` (a size or a model number) is the one title word siblings differ in."""

    group: int
    family: int
    shape: str
    palette: tuple[str, ...]
    pattern: str
    glyph: str
    brand: str
    noun: str
    label_group: int
    line: str
    detail: str

    @property
    def title(self) -> str:
        """The clean listing title; listings reword it (`titles.py`)."""
        colours = "/".join(self.palette[:2])
        return f"{self.brand} {self.line} {self.shape} {self.noun} {colours} {self.detail}"


def _brand(seed: int, family: int) -> str:
    """A made-up brand; four consecutive families share one (a brand sells several lines)."""
    rng = random.Random(f"brand-{seed}-{family // 4}")
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()


def _title_traits(seed: int, family: int, n: int) -> tuple[str, list[str]]:
    """A family's line word and its ``n`` groups' details, from their own random stream
    (the recipes' draws, hence the images, do not depend on them)."""
    rng = random.Random(f"title-traits-{seed}-{family}")
    line = rng.choice(LINES)
    if rng.random() < 0.5 and n <= len(SIZES):  # siblings: the product in other sizes
        return line, rng.sample(SIZES, n)
    letter = rng.choice(GLYPHS[:26])  # or models of one series: one letter, other numbers
    return line, [f"{letter}{k}" for k in rng.sample(range(10, 100), n)]


def make_recipes(spec: SyntheticProductsSpec) -> list[GroupRecipe]:
    """Families draw a unique (shape, colour set); groups vary pattern or logo off a base.

    Family ``f`` depends only on the seed and families before it, so growing
    ``num_families`` keeps the earlier families unchanged.
    """
    recipes: list[GroupRecipe] = []
    used: set[tuple[int, frozenset]] = set()
    colour_names = sorted(COLOURS)
    label_offset = int(uniforms(spec.seed, 7, np.array([0]), 1)[0, 0] * 2**32)
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
        line, details = _title_traits(spec.seed, f, len(variants))
        for (pattern, glyph), detail in zip(variants, details, strict=True):
            g = len(recipes)
            recipes.append(
                GroupRecipe(
                    group=g,
                    family=f,
                    shape=SHAPES[shape],
                    palette=palette,
                    pattern=PATTERNS[pattern],
                    glyph=GLYPHS[glyph],
                    brand=_brand(spec.seed, f),
                    noun=noun,
                    # An odd multiplier makes this a bijection mod 2**32: ids never collide.
                    label_group=(g * 2654435761 + label_offset) % 2**32,
                    line=line,
                    detail=detail,
                )
            )
    return recipes
