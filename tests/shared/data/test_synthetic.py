"""The synthetic products set: determinism, structure, learnable signal, and the writers."""

from __future__ import annotations

import csv
import dataclasses
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from shared.data import synthetic
from shared.data.synthetic import (
    SyntheticProducts,
    SyntheticProductsSpec,
    image_phash,
    recipes,
    titles,
    write_class_folders,
    write_image_folder_csv,
    writers,
)
from shared.retrieval.combine import TextCombination, text_matching
from shared.retrieval.text import TitleTfidf, has_title
from shared.retrieval.threshold import image_neighbours, threshold_sweep

SPEC = SyntheticProductsSpec(
    num_families=6, groups_per_family=3, min_instances=2, max_instances=5, image_size=48, seed=3
)


@pytest.fixture(scope="module")
def products() -> SyntheticProducts:
    return SyntheticProducts(SPEC)


@pytest.fixture(scope="module")
def images(products) -> torch.Tensor:
    return products.render(range(len(products)))


@pytest.fixture(scope="module")
def tiny() -> SyntheticProducts:
    return SyntheticProducts(num_families=2, groups_per_family=2, max_instances=3, seed=5)


# --- structure ---------------------------------------------------------------------------


def test_shapes_and_dtypes(products, images):
    n = len(products)
    assert images.shape == (n, 3, 48, 48) and images.dtype == torch.uint8
    assert products.labels.dtype == torch.int64 and products.labels.shape == (n,)
    assert products.families.dtype == torch.int64 and products.families.shape == (n,)
    assert products.num_classes == 18
    assert torch.equal(products.labels.unique(), torch.arange(18))
    assert products.render([]).shape == (0, 3, 48, 48)
    image, label = products[5]
    assert torch.equal(image, images[5]) and label == int(products.labels[5])


def test_group_sizes_in_range(products):
    sizes = products.group_sizes
    assert torch.equal(torch.bincount(products.labels), sizes)
    assert int(sizes.min()) >= 2 and int(sizes.max()) <= 5
    fixed = SyntheticProducts(num_families=3, min_instances=3, max_instances=3)
    assert fixed.group_sizes.tolist() == [3] * fixed.num_classes
    assert len(fixed) == 3 * fixed.num_classes


def test_families_share_shape_and_palette_but_groups_differ(products):
    recipes = products.recipes
    family_keys = set()
    for _, group in itertools.groupby(recipes, key=lambda r: r.family):
        group = list(group)
        assert len({(r.shape, r.palette, r.noun) for r in group}) == 1
        assert len({(r.pattern, r.glyph) for r in group}) == len(group)
        base = group[0]
        for r in group[1:]:  # a hard negative: one attribute changed
            assert (r.pattern != base.pattern) + (r.glyph != base.glyph) == 1
        family_keys.add((base.shape, frozenset(base.palette)))
    assert len(family_keys) == SPEC.num_families
    assert all(2 <= len(r.palette) <= 3 for r in recipes)
    label_groups = [r.label_group for r in recipes]
    assert len(set(label_groups)) == len(recipes)
    fam_of_group = torch.tensor([r.family for r in recipes])
    assert torch.equal(products.families, fam_of_group[products.labels])


def test_growing_the_set_keeps_earlier_families():
    small = SyntheticProducts(num_families=3, seed=9).recipes
    big = SyntheticProducts(num_families=5, seed=9).recipes
    assert [dataclasses.astuple(r) for r in small] == [
        dataclasses.astuple(r) for r in big[: len(small)]
    ]


def test_glyph_font_is_unambiguous():
    bitmaps = [recipes.FONT[g].replace(" ", "") for g in synthetic.GLYPHS]
    assert all(len(b) == 35 for b in bitmaps)
    assert len(set(bitmaps)) == len(bitmaps)


@pytest.mark.parametrize(
    "bad",
    [
        {"min_instances": 1},
        {"min_instances": 5, "max_instances": 4},
        {"num_families": 0},
        {"num_families": synthetic.MAX_FAMILIES + 1},
        {"groups_per_family": synthetic.MAX_GROUPS_PER_FAMILY + 1},
        {"image_size": 8},
        {"seed": -1},
        {"nuisance": -0.5},
    ],
)
def test_bad_spec_raises(bad):
    with pytest.raises(ValueError):
        SyntheticProductsSpec(**bad)
    with pytest.raises(ValueError):
        SyntheticProducts(**bad)


def test_spec_from_mapping_and_overrides():
    a = SyntheticProducts({"num_families": 2, "seed": 4}, groups_per_family=2)
    assert a.spec == SyntheticProductsSpec(num_families=2, groups_per_family=2, seed=4)
    b = SyntheticProducts(a.spec, seed=5)
    assert b.spec.seed == 5 and b.spec.num_families == 2


def test_bad_index_raises(products):
    with pytest.raises(IndexError):
        products.render([len(products)])
    with pytest.raises(IndexError):
        products.render([-1])


# --- determinism -------------------------------------------------------------------------


def test_same_spec_same_bytes(products, images):
    again = SyntheticProducts(dataclasses.replace(SPEC))
    assert torch.equal(again.render(range(len(again))), images)
    assert again.titles == products.titles and again.posting_ids == products.posting_ids


def test_render_independent_of_batch_order_and_threads(products, images):
    g = torch.Generator().manual_seed(0)
    subset = torch.randperm(len(products), generator=g)[:23]
    assert torch.equal(products.render(subset), images[subset])
    assert torch.equal(products.render(subset[:1]), images[subset[:1]])
    batches = [b for b, _, _ in products.iter_batches(7)]
    assert torch.equal(torch.cat(batches), images)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(products.render(subset.flip(0)), images[subset.flip(0)])
    finally:
        torch.set_num_threads(threads)


def test_different_seeds_differ(images):
    other = SyntheticProducts(dataclasses.replace(SPEC, seed=SPEC.seed + 1))
    n = min(len(other), len(images))
    assert not torch.equal(other.render(range(n)), images[:n])


def test_iter_batches_covers_everything(products):
    seen, labels = [], []
    for imgs, lab, idx in products.iter_batches(10, progress=False):
        assert len(imgs) == len(lab) == len(idx) <= 10
        seen.append(idx)
        labels.append(lab)
    assert torch.equal(torch.cat(seen), torch.arange(len(products)))
    assert torch.equal(torch.cat(labels), products.labels)


# --- the signal --------------------------------------------------------------------------


def _colour_hist(images: torch.Tensor, bins: int = 4) -> torch.Tensor:
    q = (images.long() * bins // 256).flatten(2)  # [N,3,HW]
    code = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    hist = torch.stack([torch.bincount(c, minlength=bins**3) for c in code]).float()
    return hist / hist.sum(1, keepdim=True)


def test_instances_vary_yet_groups_cluster(products, images):
    labels, families = products.labels, products.families
    flat = images.flatten(1)
    for g in range(products.num_classes):  # no two listings of a group are the same photo
        members = flat[labels == g]
        assert torch.cdist(members.float(), members.float()).triu(1).gt(0).sum() == (
            len(members) * (len(members) - 1) // 2
        )
    # Same group closer than different families, on average, in colour histograms of the
    # centre, where the product mostly is (the rest is clutter).
    s = images.shape[-1]
    hist = _colour_hist(images[..., s // 4 : 3 * s // 4, s // 4 : 3 * s // 4])
    d = torch.cdist(hist, hist, p=1)
    same = (labels[:, None] == labels[None]) & ~torch.eye(len(labels), dtype=torch.bool)
    other_family = families[:, None] != families[None]
    assert d[same].mean() < 0.9 * d[other_family].mean()


def test_siblings_share_title_words_and_differ_in_one_detail(products):
    for _, family in itertools.groupby(products.recipes, key=lambda r: r.family):
        family = list(family)
        assert len({r.detail for r in family}) == len(family)  # the detail tells siblings apart
        stems = {r.title.replace(r.detail, "") for r in family}
        assert len(stems) == 1, stems  # and nothing else in the clean title does
    assert len({r.brand for r in products.recipes}) < products.num_families  # brands span lines
    names, labels = products.titles, products.labels.tolist()
    assert len(names) == len(products) and all(t and "\n" not in t for t in names)
    for g in range(products.num_classes):  # sellers word one product differently
        own = [names[i] for i in range(len(names)) if labels[i] == g]
        assert len(set(own)) == len(own), own
    assert len(set(products.posting_ids)) == len(products)


def test_listings_leave_the_detail_out_at_the_stated_rate():
    """A listing without its detail reads as any sibling's would (bar a motif the photo
    shows): its title cannot tell the group. The draws are the same up to the detail, so a
    listing left it out exactly when its title equals the one drawn with omit_detail=1."""
    products = SyntheticProducts(num_families=20, groups_per_family=4, max_instances=6, seed=1)
    labels, recipes, seed = products.labels.tolist(), products.recipes, products.spec.seed
    never = titles.listing_titles(recipes, labels, seed, omit_detail=1.0)
    always = titles.listing_titles(recipes, labels, seed, omit_detail=0.0)
    left_out = np.array([a == b for a, b in zip(products.titles, never, strict=True)])
    n, p = len(left_out), titles.OMIT_DETAIL
    assert abs(left_out.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert not any(a == b for a, b in zip(always, never, strict=True))
    for i, g in enumerate(labels):
        if "motif" in never[i].lower():
            continue
        for sib in recipes:
            if sib.family == recipes[g].family:
                assert titles._listing_title(sib, seed, i, 1.0) == never[i]
    with pytest.raises(ValueError, match="omit_detail"):
        titles.listing_titles(recipes, labels, seed, omit_detail=1.5)


def test_titles_alone_do_not_solve_the_set():
    """One group per family, as in a test fold where siblings rarely meet: a title must tell
    families apart, and its words are shared across them (a brand's lines, nouns, colours,
    dropped words). Title-only F1 (TF-IDF, best threshold) closes less than half the gap
    between matching only itself and perfect; raw colour histograms know the family, so
    titles and pixels summed beat either alone."""
    products = SyntheticProducts(
        num_families=30, groups_per_family=1, max_instances=6, image_size=32, seed=0
    )
    labels = products.labels.numpy()
    sizes = np.bincount(labels)[labels]
    only_itself = np.mean(2 / (1 + sizes))  # F1 of each posting matched to itself alone
    s = 32 // 4
    image = _colour_hist(products.render(range(len(products)))[..., s : 3 * s, s : 3 * s])
    image = torch.nn.functional.normalize(image.sqrt(), dim=1).numpy()
    text = TitleTfidf().fit(products.titles).transform(products.titles)
    titled = has_title(products.titles)
    grid = np.linspace(0, 1, 101)
    _, sims, idx = image_neighbours(image, 51)
    image_f1 = threshold_sweep(sims, idx, labels, grid).best_f1
    combo = TextCombination("sum", 0.5)
    metrics, _ = text_matching(image, sims, idx, text, titled, labels, combo, grid, 51)
    assert metrics["f1_text"] < (1 + only_itself) / 2, (only_itself, metrics)
    assert metrics["f1_text"] < metrics["f1"] and image_f1 < metrics["f1"], (image_f1, metrics)


def test_phash(images):
    hashes = image_phash(images)
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes)
    assert image_phash(images[3:4].clone()) == [hashes[3]]
    assert image_phash(torch.full((1, 3, 48, 48), 7, dtype=torch.uint8)) == ["0" * 16]
    half = torch.zeros(1, 3, 50, 50, dtype=torch.uint8)
    half[..., :25, :] = 255  # top half bright: the top 4 rows of cells are set
    assert image_phash(half) == ["ffffffff00000000"]


# --- writers -----------------------------------------------------------------------------


def test_write_csv_round_trip(tiny, tmp_path):
    out = tmp_path / "shop"
    path = write_image_folder_csv(tiny, out, progress=False)
    assert path == out / "postings.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop"]  # no temp dir left
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["posting_id", "image", "label_group", "image_phash", "title"]
        rows = list(reader)
    assert len(rows) == len(tiny)
    assert [r["title"] for r in rows] == tiny.titles
    images = tiny.render(range(len(tiny)))
    back = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(out / "images" / r["image"]))).permute(2, 0, 1)
            for r in rows
        ]
    )
    assert torch.equal(back, images)
    assert [r["image_phash"] for r in rows] == image_phash(back)
    assert all(r["image"] == f"{r['posting_id']}.png" for r in rows)
    # label_group: one id per group, distinct across groups
    pairs = {(int(r["label_group"]), int(lab)) for r, lab in zip(rows, tiny.labels, strict=True)}
    assert len(pairs) == tiny.num_classes == len({lg for lg, _ in pairs})

    # Idempotent: a complete copy with the same spec is not rewritten.
    mtime = path.stat().st_mtime_ns
    assert write_image_folder_csv(tiny, out, progress=False) == path
    assert path.stat().st_mtime_ns == mtime


def test_write_csv_jpeg(tiny, tmp_path):
    path = write_image_folder_csv(tiny, tmp_path / "jpg", image_format="jpg", progress=False)
    files = sorted((tmp_path / "jpg" / "images").iterdir())
    assert len(files) == len(tiny) and all(f.suffix == ".jpg" for f in files)
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (64, 64)
    with pytest.raises(ValueError):
        write_image_folder_csv(tiny, tmp_path / "x", image_format="gif", progress=False)
    assert path.exists()


def test_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(writers, "_save_batch", broken)
    with pytest.raises(OSError, match="disk full"):
        write_image_folder_csv(tiny, tmp_path / "shop", progress=False)
    assert calls and list(tmp_path.iterdir()) == []


def test_existing_other_data_needs_overwrite(tiny, tmp_path):
    out = tmp_path / "shop"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError):
        write_image_folder_csv(tiny, out, progress=False)
    write_image_folder_csv(tiny, out, progress=False, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "postings.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop"]


def test_class_folders(tiny, tmp_path):
    from torchvision.datasets import ImageFolder

    out = write_class_folders(tiny, tmp_path / "folders", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folders"]
    ds = ImageFolder(str(out))
    assert len(ds.classes) == tiny.num_classes
    assert ds.targets == tiny.labels.tolist()  # sorted folder names == label ids
    image = torch.from_numpy(np.array(ds[3][0])).permute(2, 0, 1)
    assert torch.equal(image, tiny.render([3])[0])
    assert write_class_folders(tiny, out, progress=False) == out  # idempotent
