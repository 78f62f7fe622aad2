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

One module per concern: ``recipes`` (vocabulary, counter-based randomness, spec, group
recipes), ``titles`` (listing titles, posting ids), ``render`` (masks, banks, the per-image
pipeline), ``products`` (the data set), ``writers`` (files on disk).
"""

from shared.data.synthetic.products import SyntheticProducts
from shared.data.synthetic.recipes import (
    GENERATOR_VERSION,
    GLYPHS,
    MAX_FAMILIES,
    MAX_GROUPS_PER_FAMILY,
    GroupRecipe,
    SyntheticProductsSpec,
)
from shared.data.synthetic.writers import image_phash, write_class_folders, write_image_folder_csv

__all__ = [
    "GENERATOR_VERSION",
    "GLYPHS",
    "MAX_FAMILIES",
    "MAX_GROUPS_PER_FAMILY",
    "GroupRecipe",
    "SyntheticProducts",
    "SyntheticProductsSpec",
    "image_phash",
    "write_class_folders",
    "write_image_folder_csv",
]
