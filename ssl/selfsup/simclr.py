"""SimCLR: contrastive learning of visual representations (Chen et al., ICML 2020).

Two augmented views of each image, a backbone and an MLP projector, and the NT-Xent loss:
each view must pick the other view of its image out of the batch. Views, optimiser,
schedules and clipping are `selfsup.base.SSLMethod`'s; AdamW there, where the paper uses
LARS for its 4096-image batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.base import SSLMethod
from shared.data.augment import MultiCrop
from shared.models.backbone import TimmBackbone


def nt_xent_loss(z: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, eq. 1) over `z` = [view 1 of B images; view 2 of them].

    For each of the 2B rows: cross-entropy of picking its positive (the other view of its
    image) among the other 2B - 1 rows, on cosine similarity / temperature; averaged over
    all 2B rows. Negatives are this batch's (on this rank).
    """
    z = F.normalize(z.float(), dim=-1)
    n = z.shape[0]
    if n % 2:
        raise ValueError(f"nt_xent_loss needs two views of each image, got {n} rows")
    self_pair = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_pair, float("-inf"))
    positive = torch.arange(n, device=z.device).roll(n // 2)  # row i <-> row i +- B
    return F.cross_entropy(logits, positive)


def simclr_views(
    size: int = 64,
    scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.0),
    jitter_p: float = 0.8,
    grayscale_p: float = 0.0,
    blur_p: float = 0.5,
    subpixel_boxes: bool = True,
) -> MultiCrop:
    """SimCLR's two views (Chen et al. 2020, appendix A) as a `MultiCrop` without local
    views or solarisation. Products are told apart by colour too: no hue jitter and no
    grayscale by default (the paper: jitter (0.8, 0.8, 0.8, 0.2), grayscale 0.2)."""
    return MultiCrop(
        global_size=size,
        n_local=0,
        global_scale=scale,
        flip_p=flip_p,
        jitter=jitter,
        jitter_p=jitter_p,
        grayscale_p=grayscale_p,
        blur_p=(blur_p, blur_p, blur_p),
        solarize_p=0.0,
        subpixel_boxes=subpixel_boxes,
    )


class SimCLRModule(SSLMethod):
    """Backbone + projector (Linear-BN-ReLU-Linear); `embed()` is the backbone."""

    resume_sensitive = frozenset({"backbone", "proj_hidden_dim", "proj_output_dim"})
    embed_backbone = "backbone"

    def __init__(
        self,
        backbone: dict,
        proj_hidden_dim: int = 512,
        proj_output_dim: int = 128,
        temperature: float = 0.2,
        base_lr: float = 4e-3,
        min_lr: float = 1e-6,
        warmup_epochs: int = 2,
        weight_decay: float = 1e-4,
        weight_decay_end: float = 1e-4,
        clip_grad: float = 0.0,
        views: dict | None = None,
        eval_size: int | None = None,
        augment_in: str = "auto",
    ) -> None:
        super().__init__(simclr_views(**(views or {})), eval_size, augment_in)
        self.save_hyperparameters()
        self.backbone = TimmBackbone(**backbone)
        dim = self.backbone.num_features
        self.projector = nn.Sequential(
            nn.Linear(dim, proj_hidden_dim),
            nn.BatchNorm1d(proj_hidden_dim),
            nn.ReLU(),
            nn.Linear(proj_hidden_dim, proj_output_dim),
        )

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(self.eval_transform(images)).float(), dim=-1)

    def student_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector]

    def views_loss(self, views):
        z = self.projector(self.backbone(torch.cat(views)))  # one pass: BN sees both views
        return nt_xent_loss(z, self.hparams.temperature), {}
