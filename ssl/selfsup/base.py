"""What every self-supervised method here shares (in the spirit of solo-learn's
`BaseMomentumMethod`): a method builds its networks and turns a list of views into a loss;
the base does the rest.

- multi-view batches, and where the augmentation runs (`augment_in`);
- AdamW with two parameter groups, no weight decay on norms and biases;
- lr (linear scaling rule, warm-up + cosine) and weight decay set every step;
- an optional EMA teacher, its momentum on a cosine schedule per step;
- per-parameter gradient clipping;
- the logging gate: schedule values only on the steps the loggers write.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from shared.data.augment import EvalTransform
from shared.modules.base import EmbeddingModule
from shared.schedules import at, cosine_schedule

# Where the view augmentation runs: in the train loader (its workers augment whole batches
# in parallel), on the device in `training_step`, or auto: loader on the CPU, device on
# accelerators (uint8 crosses the bus, the GPU augments).
AUGMENT_IN = ("auto", "loader", "device")
# Hyper-parameters every method saves and the base reads; with a teacher also these two.
SHARED_HPARAMS = ("base_lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end")
TEACHER_HPARAMS = ("momentum_teacher", "momentum_teacher_end")


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


def freeze_(module: nn.Module) -> nn.Module:
    """A teacher's parameters: updated by the EMA only, never by the optimiser."""
    for p in module.parameters():
        p.requires_grad = False
    return module


class SSLMethod(EmbeddingModule):
    """A self-supervised method: subclasses implement `student_modules`, `views_loss` and
    `embed`, and may add `teacher_modules` (an EMA teacher) and `method_schedules`.

    The subclass calls `self.save_hyperparameters()`; the base reads `SHARED_HPARAMS`,
    `clip_grad` (0: no clipping) and, with a teacher, `TEACHER_HPARAMS` from them.
    Training batches hold either uint8 `images` (augmented here by `augment`) or ready
    `views` (augmented by the data module's loader, see `augment_in`).
    """

    lr_key = "base_lr"  # optimiser lr = base_lr x global batch / 256 (Goyal et al. 2017)

    def __init__(self, augment, eval_size: int | None, augment_in: str) -> None:
        super().__init__()
        if augment_in not in AUGMENT_IN:
            raise ValueError(f"module.augment_in must be one of {AUGMENT_IN}, got {augment_in!r}")
        self.augment = augment  # uint8 batch -> list of views, the first `n_global` full size
        self.eval_transform = EvalTransform(eval_size)  # what `embed` sees
        self._schedules: dict | None = None
        self._param_lists: dict | None = None

    @classmethod
    def lr_override(cls, lr: float, global_batch: int) -> dict:
        """base_lr = optimiser lr x 256 / global batch."""
        value = lr * 256.0 / global_batch
        return {"key": f"module.{cls.lr_key}", "value": value, "global_batch": global_batch}

    # ---- what a method provides -----------------------------------------------------------
    def student_modules(self) -> list[nn.Module]:
        """The modules the optimiser trains, in a fixed order."""
        raise NotImplementedError

    def teacher_modules(self) -> list[nn.Module]:
        """EMA copies of the first student modules, in the same order; none by default."""
        return []

    def views_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The loss of one batch of views, and extra values to log on the logged steps."""
        raise NotImplementedError

    def method_schedules(self, total_steps: int, epochs: int) -> dict[str, np.ndarray]:
        """Schedules of the method's own (e.g. DINO's teacher temperature)."""
        return {}

    # ---- where the augmentation runs ------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        needed = SHARED_HPARAMS + ("clip_grad", "augment_in")
        needed += TEACHER_HPARAMS if self.teacher_modules() else ()
        if missing := [k for k in needed if k not in self.hparams]:
            raise TypeError(f"{type(self).__name__} must save the hyper-parameters {missing}")
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
            hook(self.augment if mode == "loader" else None)

    def teardown(self, stage: str) -> None:
        if stage == "fit":  # hand the loader back its plain uint8 batches
            hook = getattr(self.trainer.datamodule, "set_train_batch_transform", None)
            if hook is not None:
                hook(None)

    # ---- the step -------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        if "views" in batch:
            views = batch["views"]
        else:  # `sizes`: whole images at their own aspect, padded into one batch (shards)
            views = self.augment(batch["images"], sizes=batch.get("sizes"))
        n = views[0].shape[0]
        loss, extra = self.views_loss(views)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"{type(self).__name__} loss is {loss.item()} at step {self.global_step}"
            )
        # Every self.log costs Lightning bookkeeping, so only what is shown or written: the
        # progress-bar loss when there is a bar, the schedules on the steps loggers write.
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=n)
        if self.trainer.progress_bar_callback is not None:
            self.log("loss", loss, prog_bar=True, logger=False, batch_size=n)
        if self.loggers_write_this_step():
            step = self.global_step
            logs = {f"train/{k}": at(self._schedules[k], step) for k in ("lr", "wd", "momentum")
                    if k in self._schedules}  # fmt: skip
            self.log_dict({**logs, **extra}, on_step=True, on_epoch=False, batch_size=n)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        step = self.global_step
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = at(self._schedules["lr"], step)
            if group["apply_wd"]:
                group["weight_decay"] = at(self._schedules["wd"], step)

    def on_before_optimizer_step(self, optimizer):
        # Runs after AMP unscaling: clip each parameter's gradient norm on its own (official
        # DINO clips per parameter, not one global norm).
        if self.hparams.clip_grad:
            clip_grad_per_parameter_(self._train_params()["student"], self.hparams.clip_grad)

    def optimizer_step(self, *args, **kwargs):
        # The teacher follows each optimiser step at once, inside the training step: a
        # checkpoint saved at the step's end (a preemption, every_n_train_steps) holds it, and
        # accumulated micro-batches do not move it again.
        super().optimizer_step(*args, **kwargs)
        params = self._train_params()
        if params["teacher"]:  # Lightning counts the step (global_step) after this hook
            m = at(self._schedules["momentum"], self.global_step)
            ema_update_(params["teacher"], params["student"][: len(params["teacher"])], m)

    def on_train_start(self) -> None:
        self._param_lists = None  # rebuilt at the first step, with the module in place

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.student_modules() for p in m.parameters()]

    def _train_params(self) -> dict:
        """Student and teacher parameter lists for the per-step clip and EMA, walked once per
        fit rather than every step (a timm backbone has hundreds of submodules)."""
        if self._param_lists is None:
            student = self.student_parameters()
            teacher = [p for m in self.teacher_modules() for p in m.parameters()]
            pairs = zip(teacher, student)
            if len(teacher) > len(student) or any(t.shape != s.shape for t, s in pairs):
                raise ValueError(
                    f"{type(self).__name__}.teacher_modules() must mirror the first "
                    "student_modules() parameter for parameter"
                )
            self._param_lists = {"student": student, "teacher": teacher}
        return self._param_lists

    # ---- optimiser and schedules ----------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for module in self.student_modules():
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
        lr = hp.base_lr * batch / 256.0  # linear scaling rule (Goyal et al. 2017)
        self._schedules = {
            "lr": cosine_schedule(lr, hp.min_lr, total, hp.warmup_epochs * per_epoch),
            "wd": cosine_schedule(hp.weight_decay, hp.weight_decay_end, total),
            **self.method_schedules(total, epochs),
        }
        if self.teacher_modules():
            m0, m1 = hp.momentum_teacher, hp.momentum_teacher_end
            self._schedules["momentum"] = cosine_schedule(m0, m1, total)
