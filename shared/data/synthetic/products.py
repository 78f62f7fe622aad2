"""The synthetic products set: labels, families and postings up front, images on demand."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from functools import cached_property

import numpy as np
import torch
from tqdm.auto import tqdm

from shared.data.synthetic.recipes import GroupRecipe, SyntheticProductsSpec, make_recipes, uniforms
from shared.data.synthetic.render import Renderer
from shared.data.synthetic.titles import listing_titles, posting_ids


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
        self.recipes: tuple[GroupRecipe, ...] = tuple(make_recipes(spec))
        g = len(self.recipes)
        u = uniforms(spec.seed, 2, np.arange(g), 1)[:, 0]
        span = spec.max_instances - spec.min_instances + 1
        # u**2 skews sizes towards the minimum: most listings have few duplicates.
        sizes = spec.min_instances + np.minimum(np.floor(span * u * u), span - 1)
        self.group_sizes = torch.as_tensor(sizes, dtype=torch.int64)
        self.labels = torch.repeat_interleave(torch.arange(g), self.group_sizes)
        fam = torch.tensor([r.family for r in self.recipes], dtype=torch.int64)
        self.families = fam[self.labels]
        self.label_groups = torch.tensor([r.label_group for r in self.recipes])[self.labels]
        self._renderer = Renderer(spec, self.recipes)

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
        return listing_titles(self.recipes, self.labels.tolist(), self.spec.seed)

    @cached_property
    def posting_ids(self) -> list[str]:
        """Shopee-like ids, unique within the set."""
        return posting_ids(self.spec.seed, len(self))

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
        return self._renderer.render(idx, self.labels[idx])

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
