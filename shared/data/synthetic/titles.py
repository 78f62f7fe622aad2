"""Listing titles and posting ids: the text side of the synthetic set's Shopee-style postings.

A family's listings share most words (brand, product line, shape, noun, colours); its groups
differ only in one detail, a size or a model number, which sellers often leave out or write
their own way. A brand spans several families and listings drop words, so a title tells the
family loosely and the group only sometimes: titles alone do not solve the set, the images
must add what they lack (`tests/shared/data/test_synthetic.py` checks both).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import numpy as np

from shared.data.synthetic.recipes import GroupRecipe, uniforms

# How often a listing leaves its group's detail out: the default makes the title ambiguous
# between siblings for about that share of listings.
OMIT_DETAIL = 0.45

_SHOP_PREFIXES = (
    "[READY STOCK]", "READY", "ORI", "ORIGINAL", "PROMO", "NEW", "Hot Sale", "COD", "Murah",
)  # fmt: skip
_SHOP_WORDS = (
    "grosir", "free ongkir", "best seller", "kualitas premium", "import", "viral", "termurah",
    "bisa cod", "ready stock", "promo", "ori", "100% original", "1 pcs", "murah",
)  # fmt: skip
_SIZE = re.compile(r"(\d+)(ml|L|g|kg)")


def _written_detail(detail: str, rng: random.Random) -> str:
    """The detail as one seller writes it: "250ml" / "250 ml" / "250ML" / "0.25L",
    "K12" / "K-12" / "type K12" / "k 12"."""
    size = _SIZE.fullmatch(detail)
    if size:
        number, unit = size.groups()
        forms = [detail, f"{number} {unit}", detail.upper(), f"{number}{unit.lower()}"]
        if unit in ("ml", "g") and int(number) >= 100:
            big = "L" if unit == "ml" else "kg"
            forms.append(f"{int(number) / 1000:g}{big}")
        if unit in ("L", "kg"):
            forms.append(f"{int(number) * 1000}{'ml' if unit == 'L' else 'g'}")
        return rng.choice(forms)
    letter, number = detail[0], detail[1:]
    return rng.choice(
        (detail, f"{letter}-{number}", f"type {detail}", f"{letter.lower()} {number}",
         f"seri {letter}{number}")
    )  # fmt: skip


def _typo(word: str, rng: random.Random) -> str:
    """A misspelling (a letter dropped, doubled or two swapped) or an abbreviation."""
    if len(word) < 5 or not word.isalpha():
        return word
    j = rng.randrange(1, len(word) - 2)
    edit = rng.random()
    if edit < 0.25:
        return word[:j] + word[j + 1 :]
    if edit < 0.5:
        return word[:j] + word[j] + word[j:]
    if edit < 0.75:
        return word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return word[: rng.choice((3, 4))]


def _listing_title(r: GroupRecipe, seed: int, index: int, omit_detail: float) -> str:
    """Listing ``index``'s title of group ``r``: family words kept or dropped, the detail
    left out (``omit_detail``) or written a seller's way, words reordered, misspelt or
    abbreviated, shop words added, case changed. Its own random stream: images unaffected."""
    rng = random.Random(f"listing-title-{seed}-{index}")
    colours = list(r.palette[:2])
    shown = rng.choice(([], [], colours[:1], colours, ["/".join(colours)]))
    words = [
        *([r.brand] if rng.random() >= 0.2 else []),
        *([r.line] if rng.random() >= 0.4 else []),
        *([r.shape] if rng.random() >= 0.5 else []),
        r.noun,
        *shown,
    ]
    if rng.random() < 0.15:  # a motif the photo shows too
        words.append(f"motif {r.pattern}")
    if rng.random() >= omit_detail:
        words.insert(rng.randrange(1, len(words) + 1), _written_detail(r.detail, rng))
    if rng.random() < 0.5:
        rng.shuffle(words)
    for _ in range(rng.choice((0, 1, 1, 2))):
        i = rng.randrange(len(words))
        words[i] = _typo(words[i], rng)
    if rng.random() < 0.5:
        words.insert(0, rng.choice(_SHOP_PREFIXES))
    for _ in range(rng.choice((0, 0, 1, 2))):
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


def listing_titles(
    recipes: Sequence[GroupRecipe],
    labels: Sequence[int],
    seed: int,
    omit_detail: float = OMIT_DETAIL,
) -> list[str]:
    """One title per image: image ``i`` is a listing of group ``labels[i]``; a listing
    leaves its group's detail out with probability ``omit_detail``."""
    if not 0.0 <= omit_detail <= 1.0:
        raise ValueError(f"omit_detail must be in [0, 1], got {omit_detail}")
    return [_listing_title(recipes[g], seed, i, omit_detail) for i, g in enumerate(labels)]


def posting_ids(seed: int, n: int) -> list[str]:
    """Shopee-like ids for ``n`` postings; an odd multiplier mod 2**32 keeps them unique."""
    off = int(uniforms(seed, 8, np.array([0]), 1)[0, 0] * 2**32)
    return [f"train_{(i * 2246822519 + off) % 2**32:010d}" for i in range(n)]
