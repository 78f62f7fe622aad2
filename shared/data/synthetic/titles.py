"""Listing titles and posting ids: the text side of the synthetic set's Shopee-style postings."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from shared.data.synthetic.recipes import GroupRecipe, uniforms

_TITLE_PREFIXES = ("[READY STOCK]", "ORIGINAL", "PROMO", "NEW", "Hot Sale", "COD", "Murah")
_SHOP_WORDS = ("grosir", "free ongkir", "best seller", "kualitas premium", "import", "viral")
_TITLE_SUFFIXES = ("250ml", "500ml", "1kg", "isi 12", "1 pcs", "2 pcs", "termurah", "bpom")


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


def listing_titles(recipes: Sequence[GroupRecipe], labels: Sequence[int], seed: int) -> list[str]:
    """One noisy title per image: image ``i`` is a listing of group ``labels[i]``."""
    return [_noisy_title(recipes[g].title, seed, i) for i, g in enumerate(labels)]


def posting_ids(seed: int, n: int) -> list[str]:
    """Shopee-like ids for ``n`` postings; an odd multiplier mod 2**32 keeps them unique."""
    off = int(uniforms(seed, 8, np.array([0]), 1)[0, 0] * 2**32)
    return [f"train_{(i * 2246822519 + off) % 2**32:010d}" for i in range(n)]
