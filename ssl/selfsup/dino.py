"""DINO: self-distillation with no labels (Caron et al., ICCV 2021).

Follows the paper's recipe (Caron et al. 2021, section 3 and appendix): projection
head with a weight-normalised last layer, centred and sharpened teacher, teacher-temperature
warm-up, cosine EMA momentum per step, cosine weight decay, lr warm-up + cosine, last layer
frozen in the first epoch, per-parameter gradient clipping, multi-crop with one backbone
pass per resolution, drop path on the student only.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shared.data.augment import EvalTransform, MultiCrop
from shared.models.backbone import TimmBackbone
from shared.modules.base import EmbeddingModule
from shared.schedules import at, cosine_schedule, warmup_then_constant


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


@torch.no_grad()
def clip_grad_per_parameter_(params, max_norm: float) -> None:
    """Scale each gradient to norm <= max_norm on its own (official DINO `clip_gradients`).

    Same values as a loop of `grad.mul_(min(max_norm / (norm + 1e-6), 1))`, in a few fused
    calls instead of several small ops per parameter.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norms = torch.stack(torch._foreach_norm(grads))
        scale = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, list(scale.unbind()))


@torch.no_grad()
def ema_update_(teacher, student, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, over matching parameter lists."""
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1 - momentum)


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


# Where the multi-crop augmentation runs: in the train loader (its workers augment whole
# batches in parallel), on the device in `training_step`, or auto: loader on the CPU, device
# on accelerators (uint8 crosses the bus, the GPU augments).
AUGMENT_IN = ("auto", "loader", "device")


class DINOModule(EmbeddingModule):
    """Student and EMA teacher (backbone + DINOHead); `embed()` is the teacher backbone.

    Training batches hold either uint8 `images` (augmented here) or ready `views` (augmented
    by the data module's loader, see `augment_in`).
    """

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
        super().__init__()
        if augment_in not in AUGMENT_IN:
            raise ValueError(f"module.augment_in must be one of {AUGMENT_IN}, got {augment_in!r}")
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
        for p in (*self.teacher_backbone.parameters(), *self.teacher_head.parameters()):
            p.requires_grad = False
        self.criterion = DINOLoss(out_dim, center_momentum)
        self.multicrop = MultiCrop(**(multicrop or {}))
        self.eval_transform = EvalTransform(eval_size)
        self._schedules: dict | None = None
        self._param_lists: dict | None = None

    # ---- evaluation interface -------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised teacher-backbone features of un-augmented uint8 images."""
        return F.normalize(self.teacher_backbone(self.eval_transform(images)).float(), dim=-1)

    # ---- training -------------------------------------------------------------------------
    def forward_views(self, views: list[torch.Tensor]):
        """One backbone pass per resolution; the heads run on the concatenation."""
        n_global = self.multicrop.n_global
        globals_ = torch.cat(views[:n_global])
        student_feats = [self.student_backbone(globals_)]
        if len(views) > n_global:
            student_feats.append(self.student_backbone(torch.cat(views[n_global:])))
        student = self.student_head(torch.cat(student_feats))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(globals_))
        return student, teacher

    def setup(self, stage: str) -> None:
        if stage == "fit":
            dm = self.trainer.datamodule
            hook = getattr(dm, "set_train_batch_transform", None)
            mode = self.hparams.augment_in
            if mode == "auto":
                on_cpu = self.trainer.strategy.root_device.type == "cpu"
                mode = "loader" if on_cpu and hook is not None else "device"
            if mode == "loader" and hook is None:
                raise ValueError(
                    "module.augment_in=loader needs a data module with set_train_batch_transform"
                    f" (StoreDataModule), got {type(dm).__name__}"
                )
            if hook is not None:
                hook(self.multicrop if mode == "loader" else None)

    def teardown(self, stage: str) -> None:
        if stage == "fit":  # hand the loader back its plain uint8 batches
            hook = getattr(self.trainer.datamodule, "set_train_batch_transform", None)
            if hook is not None:
                hook(None)

    def training_step(self, batch, batch_idx):
        views = batch["views"] if "views" in batch else self.multicrop(batch["images"])
        n = views[0].shape[0]
        student, teacher = self.forward_views(views)
        temp = at(self._schedules["teacher_temp"], self.current_epoch)
        loss = self.criterion(student, teacher, len(views), self.hparams.student_temp, temp)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"DINO loss is {loss.item()} at step {self.global_step}")
        step = self.global_step
        # Every self.log costs Lightning bookkeeping, so only what is shown or written: the
        # progress-bar loss when there is a bar, the schedules on the steps loggers write.
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=n)
        if self.trainer.progress_bar_callback is not None:
            self.log("loss", loss, prog_bar=True, logger=False, batch_size=n)
        if self.loggers_write_this_step():
            self.log_dict(
                {
                    "train/lr": at(self._schedules["lr"], step),
                    "train/wd": at(self._schedules["wd"], step),
                    "train/momentum": at(self._schedules["momentum"], step),
                    "train/teacher_temp": temp,
                },
                on_step=True,
                on_epoch=False,
                batch_size=n,
            )
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        step = self.global_step
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = at(self._schedules["lr"], step)
            if group["apply_wd"]:
                group["weight_decay"] = at(self._schedules["wd"], step)

    def on_before_optimizer_step(self, optimizer):
        # Runs after AMP unscaling: clip each parameter's gradient norm on its own (official
        # DINO clips per parameter, not one global norm), then drop the last layer's grads
        # during the first epoch(s), which stabilises early training.
        if self.hparams.clip_grad:
            clip_grad_per_parameter_(self._train_params()["student"], self.hparams.clip_grad)
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for p in self.student_head.last_layer.parameters():
                p.grad = None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        m = at(self._schedules["momentum"], self.global_step - 1)
        params = self._train_params()
        ema_update_(params["teacher"], params["student"], m)

    def on_train_start(self) -> None:
        self._param_lists = None  # rebuilt at the first step, with the module in place

    def _train_params(self) -> dict:
        """Student and teacher parameter lists for the per-step clip and EMA, walked once per
        fit rather than every step (a timm backbone has hundreds of submodules)."""
        if self._param_lists is None:
            self._param_lists = {
                "student": self.student_parameters(),
                "teacher": [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()],
            }
        return self._param_lists

    def student_parameters(self):
        return [*self.student_backbone.parameters(), *self.student_head.parameters()]

    def configure_optimizers(self):
        decay, no_decay = [], []
        for module in (self.student_backbone, self.student_head):
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        self._build_schedules()
        return torch.optim.AdamW(
            [
                {"params": decay, "apply_wd": True},
                {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
            ],
            lr=at(self._schedules["lr"], 0),
            weight_decay=self.hparams.weight_decay,
        )

    def _build_schedules(self) -> None:
        hp = self.hparams
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)
        epochs = max(1, trainer.max_epochs or 1)
        per_epoch = max(1, total // epochs)
        batch = trainer.datamodule.batch_size * trainer.world_size
        batch *= trainer.accumulate_grad_batches
        lr = hp.base_lr * batch / 256.0  # linear scaling rule (Goyal et al. 2017), as DINO
        self._schedules = {
            "lr": cosine_schedule(lr, hp.min_lr, total, hp.warmup_epochs * per_epoch),
            "wd": cosine_schedule(hp.weight_decay, hp.weight_decay_end, total),
            "momentum": cosine_schedule(hp.momentum_teacher, hp.momentum_teacher_end, total),
            "teacher_temp": warmup_then_constant(
                hp.warmup_teacher_temp, hp.teacher_temp, hp.warmup_teacher_temp_epochs, epochs
            ),
        }
