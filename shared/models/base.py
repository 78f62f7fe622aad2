"""What the metric-learning module needs from an embedding net, so it never names one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class EmbeddingNet(nn.Module):
    """An image -> embedding [B, embedding_dim] net with a `backbone` (a `TimmBackbone`).

    `from_config` builds it from the `module.model` and `module.backbone` groups' plain values;
    `forward_with_aux` adds the logits of an auxiliary classifier where the net has one.
    """

    embedding_dim: int
    backbone: nn.Module

    @classmethod
    def from_config(
        cls, model: Mapping[str, Any], backbone: Mapping[str, Any], num_classes: int | None
    ) -> EmbeddingNet:
        """`model`: the net's own arguments (`type` removed); `backbone`: the backbone group."""
        raise NotImplementedError(f"{cls.__name__} must define from_config")

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding, auxiliary logits [B, num_classes]); None: no auxiliary classifier."""
        return self(x), None
