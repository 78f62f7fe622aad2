"""Combination of Multiple Global Descriptors (CGD, Jun et al. 2019, arXiv:1903.10663).

Several global descriptors (SPoC, MAC, GeM) pooled from one feature map, each projected by a
bias-free FC to embedding_dim / n and L2-normalised, concatenated and L2-normalised again. An
auxiliary classifier on the first descriptor (BN -> FC, temperature 0.5, label smoothing 0.1)
is trained beside a batch-hard triplet ranking loss (margin 0.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.backbone import TimmBackbone
from shared.models.base import EmbeddingNet
from shared.models.poolers import build_pooler


class CGDNet(EmbeddingNet):
    """Backbone feature map -> n global descriptors -> one unit-norm embedding [B, D].

    `backbone` is a built `TimmBackbone` or a timm name (built with `backbone_kwargs`). The
    feature map is the model's last one: `forward_features` of a `features_only=False`
    backbone (for EfficientNets this includes the final 1x1 conv), or the last map of a
    `features_only=True` one. The paper's ResNet-50 also drops the stage-4 down-sampling;
    that is not done here.

    `gem_trainable=False` by default: the paper and its official code fix GeM's p at 3.
    """

    def __init__(
        self,
        backbone: TimmBackbone | str = "resnet50",
        descriptors: str = "SMG",
        embedding_dim: int = 1536,
        num_classes: int | None = None,
        aux_temperature: float = 0.5,
        gem_p: float = 3.0,
        gem_trainable: bool = False,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = TimmBackbone(backbone, **dict(backbone_kwargs or {}))
        elif backbone_kwargs:
            raise ValueError("backbone_kwargs is only used when backbone is a timm name")
        descriptors = str(descriptors).upper()
        n = len(descriptors)
        if n == 0:
            raise ValueError("CGD needs at least one descriptor, e.g. descriptors='SMG'")
        if embedding_dim % n:
            raise ValueError(
                f"embedding_dim={embedding_dim} must be divisible by the {n} descriptors "
                f"{descriptors!r} (each gets embedding_dim // {n})"
            )
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (or None), got {num_classes}")
        if aux_temperature <= 0:
            raise ValueError(f"aux_temperature must be > 0, got {aux_temperature}")

        self.backbone = backbone
        self.descriptors = descriptors
        self.embedding_dim = int(embedding_dim)
        self.num_classes = num_classes
        self.aux_temperature = float(aux_temperature)
        channels = (
            backbone.feature_channels[-1] if backbone.features_only else backbone.num_features
        )
        self.feature_dim = int(channels)

        self.poolers = nn.ModuleList(
            build_pooler(letter, gem_p=gem_p, gem_trainable=gem_trainable) for letter in descriptors
        )
        self.projections = nn.ModuleList(
            nn.Linear(channels, embedding_dim // n, bias=False) for _ in descriptors
        )
        if num_classes is not None:
            self.aux_head = nn.Sequential(
                nn.BatchNorm1d(channels), nn.Linear(channels, num_classes)
            )
        else:
            self.aux_head = None

    @classmethod
    def from_config(cls, model, backbone, num_classes):
        # the module applies init_from_run; name and the feature layout are CGD's own
        skip = ("name", "features_only", "out_indices", "init_from_run")
        bb = {k: v for k, v in backbone.items() if k not in skip}
        return cls(backbone["name"], num_classes=num_classes, backbone_kwargs=bb, **model)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map [B, C, H, W]."""
        if self.backbone.features_only:
            fmap = self.backbone(x)[-1]
        else:
            fmap = self.backbone.model.forward_features(x)
        if fmap.dim() != 4:
            raise ValueError(
                f"CGD needs a convolutional feature map [B, C, H, W]; backbone "
                f"{self.backbone.name!r} gave shape {tuple(fmap.shape)}"
            )
        return fmap

    def _descriptors(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        fmap = self.feature_map(x)
        pooled = [pool(fmap) for pool in self.poolers]
        blocks = [F.normalize(fc(p), dim=1) for fc, p in zip(self.projections, pooled, strict=True)]
        return blocks, pooled[0]

    def forward_descriptors(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each descriptor's unit-norm block [B, embedding_dim // n], in `descriptors` order."""
        return self._descriptors(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks, _ = self._descriptors(x)
        return F.normalize(torch.cat(blocks, dim=1), dim=1)

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding [B, D], auxiliary logits / temperature [B, num_classes]); the logits
        are None when the net was built without num_classes (no auxiliary classifier)."""
        if self.aux_head is None:
            return self(x), None
        blocks, first = self._descriptors(x)
        embedding = F.normalize(torch.cat(blocks, dim=1), dim=1)
        return embedding, self.aux_head(first) / self.aux_temperature


def batch_hard_triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.1,
    distance: str = "euclidean",
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017): mean of relu(d(a, p+) - d(a, n-) + margin).

    For each anchor, p+ is its farthest same-label sample and n- its nearest other-label one.
    `distance="euclidean"` (default, as in the CGD code; on unit vectors sqrt(2 - 2 cos)) or
    `"cosine"` (1 - cos of the normalised vectors). Anchors without a positive or without a
    negative in the batch are skipped; with no valid anchor the loss is 0 (still in the graph).
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"embeddings must be [B, D] and labels [B], got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if distance == "euclidean":
        sq = embeddings.pow(2).sum(dim=1)
        d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * embeddings @ embeddings.t()
        # clamp before sqrt: zero distances (the diagonal) would otherwise give NaN gradients
        dist = d2.clamp(min=1e-12).sqrt()
    elif distance == "cosine":
        unit = F.normalize(embeddings, dim=1)
        dist = 1.0 - unit @ unit.t()
    else:
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")

    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    negative = ~same
    neg_inf = torch.finfo(dist.dtype).min
    hardest_pos = dist.masked_fill(~positive, neg_inf).amax(dim=1)
    hardest_neg = dist.masked_fill(~negative, -neg_inf).amin(dim=1)
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not valid.any():
        return embeddings.sum() * 0.0
    losses = F.relu(hardest_pos - hardest_neg + margin)
    return losses[valid].mean()


def cgd_aux_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Cross-entropy with label smoothing on the (already temperature-scaled) auxiliary logits."""
    return F.cross_entropy(logits, labels.long(), label_smoothing=label_smoothing)
