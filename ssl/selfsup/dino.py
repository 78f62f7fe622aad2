"""DINO: self-distillation with no labels (Caron et al., ICCV 2021).

Follows the paper's recipe (Caron et al. 2021, section 3 and appendix): projection
head with a weight-normalised last layer, centred and sharpened teacher, teacher-temperature
warm-up, cosine EMA momentum per step, cosine weight decay, lr warm-up + cosine, last layer
frozen in the first epoch, per-parameter gradient clipping, multi-crop with one backbone
pass per resolution, drop path on the student only. The parts every method shares (views,
optimiser, lr / wd / momentum schedules, EMA, clipping) are `selfsup.base.SSLMethod`'s.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup.base import SSLMethod, freeze_
from shared.data.augment import MultiCrop
from shared.models.backbone import TimmBackbone
from shared.schedules import at, warmup_then_constant


class DINOHead(nn.Module):
    """MLP (GELU) -> L2-normalised bottleneck -> weight-normalised linear to `out_dim`."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers += ([nn.BatchNorm1d(b)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0  # the norm, one per output
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    n_views: int,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """Cross-entropy between centred, sharpened teacher and student, over cross-view pairs.

    `student_logits` [n_views*B, K] (the 2 global views first), `teacher_logits` [2*B, K].
    Pairs where teacher and student see the same view are skipped; the rest are averaged.
    """
    n_teacher = 2
    b = teacher_logits.shape[0] // n_teacher
    q = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1).detach()
    q = q.view(n_teacher, b, -1)
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1).view(n_views, b, -1)
    # cross[t, v] = mean over the batch of -sum_k q[t] log p[v]
    cross = -torch.einsum("tbk,vbk->tv", q, log_p) / b
    keep = torch.ones_like(cross, dtype=torch.bool)
    keep[torch.arange(n_teacher), torch.arange(n_teacher)] = False
    return cross[keep].mean()


class DINOLoss(nn.Module):
    """`dino_loss` plus the teacher centre (a buffer, EMA of the global batch mean)."""

    def __init__(self, out_dim: int, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_logits, teacher_logits, n_views, student_temp, teacher_temp):
        loss = dino_loss(
            student_logits, teacher_logits, self.center, n_views, student_temp, teacher_temp
        )
        self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Centre <- m * centre + (1 - m) * mean of teacher logits over ALL ranks' batches."""
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_logits.shape[0]), device=batch_sum.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        m = self.center_momentum
        self.center.mul_(m).add_(batch_sum / count, alpha=1 - m)


class DINOModule(SSLMethod):
    """Student and EMA teacher (backbone + DINOHead); `embed()` is the teacher backbone.

    What is DINO's own: the heads, the loss with its centre, the teacher temperature
    schedule, the frozen last layer in the first epoch(s), drop path on the student only;
    views, optimiser, lr / wd / momentum schedules, EMA and clipping are `SSLMethod`'s.
    """

    resume_sensitive = frozenset(
        {"backbone", "out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "use_bn_in_head"}
    )
    embed_backbone = "teacher_backbone"  # the network DINO evaluates and hands on

    def __init__(
        self,
        backbone: dict,
        out_dim: int = 2048,
        hidden_dim: int = 512,
        bottleneck_dim: int = 64,
        head_layers: int = 3,
        use_bn_in_head: bool = True,
        norm_last_layer: bool = False,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        center_momentum: float = 0.9,
        momentum_teacher: float = 0.99,
        momentum_teacher_end: float = 1.0,
        base_lr: float = 4e-3,
        min_lr: float = 1e-6,
        warmup_epochs: int = 2,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        clip_grad: float = 3.0,
        freeze_last_layer_epochs: int = 1,
        student_drop_path: float = 0.1,
        multicrop: dict | None = None,
        eval_size: int | None = None,
        augment_in: str = "auto",
    ) -> None:
        super().__init__(MultiCrop(**(multicrop or {})), eval_size, augment_in)
        self.save_hyperparameters()
        backbone = dict(backbone)
        backbone.pop("drop_path_rate", None)
        self.student_backbone = TimmBackbone(**backbone, drop_path_rate=student_drop_path)
        self.teacher_backbone = TimmBackbone(**{**backbone, "pretrained_path": None})
        dim = self.student_backbone.num_features
        head = dict(
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            n_layers=head_layers,
            use_bn=use_bn_in_head,
        )
        self.student_head = DINOHead(dim, out_dim, norm_last_layer=norm_last_layer, **head)
        # The teacher starts as an exact copy of the student: a copy, never a shared reference.
        self.teacher_backbone.load_state_dict(self.student_backbone.state_dict())
        self.teacher_head = copy.deepcopy(self.student_head)
        for teacher in self.teacher_modules():
            freeze_(teacher)
        self.criterion = DINOLoss(out_dim, center_momentum)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised teacher-backbone features of un-augmented uint8 images."""
        return F.normalize(self.teacher_backbone(self.eval_transform(images)).float(), dim=-1)

    def student_modules(self) -> list[nn.Module]:
        return [self.student_backbone, self.student_head]

    def teacher_modules(self) -> list[nn.Module]:
        return [self.teacher_backbone, self.teacher_head]

    def forward_views(self, views: list[torch.Tensor]):
        """One backbone pass per resolution; the heads run on the concatenation."""
        n_global = self.augment.n_global
        globals_ = torch.cat(views[:n_global])
        student_feats = [self.student_backbone(globals_)]
        if len(views) > n_global:
            student_feats.append(self.student_backbone(torch.cat(views[n_global:])))
        student = self.student_head(torch.cat(student_feats))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(globals_))
        return student, teacher

    def views_loss(self, views):
        student, teacher = self.forward_views(views)
        temp = at(self._schedules["teacher_temp"], self.current_epoch)
        loss = self.criterion(student, teacher, len(views), self.hparams.student_temp, temp)
        return loss, {"train/teacher_temp": temp}

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)  # the clip
        # No last-layer update in the first epoch(s): it stabilises early training.
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for p in self.student_head.last_layer.parameters():
                p.grad = None

    def method_schedules(self, total_steps: int, epochs: int) -> dict:
        hp = self.hparams
        temp = warmup_then_constant(
            hp.warmup_teacher_temp, hp.teacher_temp, hp.warmup_teacher_temp_epochs, epochs
        )
        return {"teacher_temp": temp}
