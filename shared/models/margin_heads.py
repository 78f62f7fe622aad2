"""Additive angular margin (ArcFace) head, with sub-centres, dynamic margins and margin warm-up.

ArcFace: Deng et al. 2019 (s = 64, m = 0.5 in the paper). Sub-centre ArcFace: Deng et al. 2020
(k = 3). Dynamic margins: Google Landmark Recognition 2020 3rd place and 2021 1st place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# sqrt(1 - cos^2) is clamped at this value: its derivative -cos / sqrt(1 - cos^2) is infinite at
# |cos| = 1 (an embedding equal to its class weight), which would give NaN gradients.
_SINE_SQ_EPS = 1e-12


def arcface_logits(
    cosine: torch.Tensor,
    labels: torch.Tensor,
    margin: float | torch.Tensor,
    scale: float,
    easy_margin: bool = False,
) -> torch.Tensor:
    """Scaled ArcFace logits: s * cos(theta_y + m) for the target class, s * cos(theta_j) else.

    `cosine` [B, C]; `labels` [B]; `margin` in radians, a float or a per-sample tensor [B]
    (dynamic margins). Past the boundary theta_y + m > pi, cos(theta_y + m) would rise again,
    so cos(theta_y) - m * sin(m) is used instead (the `th` / `mm` terms of the reference
    implementation); with `easy_margin` the margin is applied only where cos(theta_y) > 0.
    """
    if cosine.dim() != 2 or labels.shape != cosine.shape[:1]:
        raise ValueError(
            f"cosine must be [B, C] and labels [B], got {tuple(cosine.shape)} and "
            f"{tuple(labels.shape)}"
        )
    target = cosine.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    m = torch.as_tensor(margin, dtype=cosine.dtype, device=cosine.device)
    if m.dim() > 0 and m.shape != target.shape:
        raise ValueError(f"margin must be a scalar or [B], got shape {tuple(m.shape)}")
    sine = (1.0 - target * target).clamp(min=_SINE_SQ_EPS).sqrt()
    phi = target * torch.cos(m) - sine * torch.sin(m)  # cos(theta + m)
    if easy_margin:
        phi = torch.where(target > 0, phi, target)
    else:
        th = torch.cos(math.pi - m)  # theta + m > pi  <=>  cos(theta) < cos(pi - m)
        mm = torch.sin(m) * m
        phi = torch.where(target > th, phi, target - mm)
    logits = cosine.scatter(1, labels.long().unsqueeze(1), phi.unsqueeze(1))
    return logits * scale


def dynamic_margins(
    class_counts: Sequence[int] | torch.Tensor,
    low: float = 0.05,
    high: float = 0.5,
    power: float = -0.25,
) -> torch.Tensor:
    """Per-class margins m_c = (high - low) * minmax(n_c^power) + low: rare classes get larger.

    GLR 2020 3rd place / 2021 1st place use n^-1/4 and [0.05, 0.5]. If every class has the
    same count the min-max scaling is undefined; every class then gets `high`.
    """
    if not isinstance(class_counts, torch.Tensor):
        class_counts = [int(n) for n in class_counts]  # also accepts an OmegaConf ListConfig
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError("class_counts must be a non-empty 1-D list of per-class counts")
    if (counts < 1).any():
        raise ValueError("every class count must be >= 1 (n^power is undefined at 0)")
    if not low <= high:
        raise ValueError(f"dynamic margins need low <= high, got low={low}, high={high}")
    x = counts.pow(power)
    spread = x.max() - x.min()
    if spread == 0:
        return torch.full_like(x, high, dtype=torch.float32)
    return ((high - low) * (x - x.min()) / spread + low).float()


class ArcFaceHead(nn.Module):
    """ArcFace classifier over L2-normalised embeddings and class weights; returns (loss, logits).

    `weight` is [num_classes * subcenters, embedding_size] in nn.Linear layout, class-major:
    row c * subcenters + j is sub-centre j of class c, so class cosines are
    `cos.view(B, num_classes, subcenters).amax(2)` (the layout of pytorch-metric-learning's
    SubCenterArcFaceLoss, whose W is this weight transposed).

    `class_counts` switches on dynamic margins in [dynamic_margin_low, margin]. With
    `margin_warmup_steps` > 0 the margin ramps linearly from 0; the training loop calls
    `set_step(global_step)` (the step is a buffer, so it is saved and restored with the head).

    `init_std`: class weights start N(0, init_std^2) instead of nn.Linear's uniform range.
    Only the directions enter the cosines, so the scale sets how far an optimiser step turns a
    class centre: Adam's steps have a fixed size, and large rows (pytorch-metric-learning
    starts at N(0, 1), rows of norm ~sqrt(D)) turn slowly, small ones fast.

    Always computed in (at least) fp32 with autocast off: fp16 class weights and cosines give
    NaNs and worse results under AMP.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 30.0,
        margin: float = 0.5,
        easy_margin: bool = False,
        subcenters: int = 1,
        class_counts: Sequence[int] | None = None,
        margin_warmup_steps: int = 0,
        label_smoothing: float = 0.0,
        dynamic_margin_low: float = 0.05,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ArcFaceHead needs num_classes >= 2, got {num_classes}")
        if subcenters < 1:
            raise ValueError(f"ArcFaceHead needs subcenters >= 1, got {subcenters}")
        if embedding_size < 1:
            raise ValueError(f"ArcFaceHead needs embedding_size >= 1, got {embedding_size}")
        if scale <= 0:
            raise ValueError(f"ArcFaceHead needs scale > 0, got {scale}")
        if margin_warmup_steps < 0:
            raise ValueError(f"margin_warmup_steps must be >= 0, got {margin_warmup_steps}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.subcenters = int(subcenters)
        self.scale = float(scale)
        self.margin = float(margin)
        self.easy_margin = bool(easy_margin)
        self.margin_warmup_steps = int(margin_warmup_steps)
        self.label_smoothing = float(label_smoothing)

        self.weight = nn.Parameter(torch.empty(self.num_classes * self.subcenters, embedding_size))
        if init_std is None:
            bound = 1.0 / math.sqrt(embedding_size)  # nn.Linear's default range
            nn.init.uniform_(self.weight, -bound, bound)
        elif init_std > 0:
            nn.init.normal_(self.weight, 0.0, init_std)
        else:
            raise ValueError(f"ArcFaceHead needs init_std > 0 or null, got {init_std}")

        if class_counts is not None:
            if len(class_counts) != self.num_classes:
                raise ValueError(
                    f"class_counts has {len(class_counts)} entries, num_classes={num_classes}"
                )
            margins = dynamic_margins(class_counts, low=dynamic_margin_low, high=self.margin)
            self.register_buffer("class_margins", margins)
        else:
            self.register_buffer("class_margins", None)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def set_step(self, step: int) -> None:
        """Tell the head the optimiser step, for the margin warm-up."""
        self.step.fill_(int(step))

    def margin_factor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """min(1, step / margin_warmup_steps); 1 without warm-up."""
        if self.margin_warmup_steps == 0:
            return torch.ones((), dtype=dtype, device=self.step.device)
        return (self.step.to(dtype) / self.margin_warmup_steps).clamp(max=1.0)

    def sample_margins(
        self, labels: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The effective margin of each sample [B], warm-up included."""
        if self.class_margins is not None:
            base = self.class_margins[labels.long()].to(dtype)
        else:
            base = torch.full(labels.shape, self.margin, dtype=dtype, device=labels.device)
        return base * self.margin_factor(dtype).to(base.device)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine to each class [B, num_classes] (max over its sub-centres), in >= fp32."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be [B, {self.embedding_size}], got {tuple(embeddings.shape)}"
            )
        dtype = torch.promote_types(
            torch.promote_types(embeddings.dtype, self.weight.dtype), torch.float32
        )
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = F.normalize(embeddings.to(dtype), dim=1)
            weight = F.normalize(self.weight.to(dtype), dim=1)
            cos = F.linear(emb, weight)
            if self.subcenters > 1:
                cos = cos.view(-1, self.num_classes, self.subcenters).amax(dim=2)
        return cos

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over margin logits, and those logits [B, num_classes] (fp32)."""
        self._check_labels(labels, embeddings)
        cos = self.cosine(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            margins = self.sample_margins(labels, dtype=cos.dtype)
            logits = arcface_logits(cos, labels, margins, self.scale, self.easy_margin)
            loss = F.cross_entropy(logits, labels.long(), label_smoothing=self.label_smoothing)
        return loss, logits

    def _check_labels(self, labels: torch.Tensor, embeddings: torch.Tensor) -> None:
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must be [B] with B = {embeddings.shape[0]}, got {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
        if labels.numel() == 0:
            return
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"labels must lie in [0, {self.num_classes - 1}] (num_classes={self.num_classes}),"
                f" got min {low}, max {high}"
            )

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"subcenters={self.subcenters}, scale={self.scale}, margin={self.margin}, "
            f"dynamic={self.class_margins is not None}, easy_margin={self.easy_margin}, "
            f"margin_warmup_steps={self.margin_warmup_steps}"
        )
