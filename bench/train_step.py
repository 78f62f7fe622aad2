"""Benchmark: one DINO training step through our LightningModule against a plain PyTorch loop.

Both train the same `DINOModule` (the `ssl` config's module and backbone, composed with
Hydra as `python ssl/run.py` would) from the same initial weights, on the same pre-made
multi-crop batch (2 global + n local views made once by the module's `MultiCrop`; no data
loading in either), with the same AdamW, schedules and seed.

  ours   `DINOModule` driven by a real `lightning.Trainer` (no logger, no checkpointing,
         no progress bar, no validation, `limit_train_batches=steps`) over a data module
         whose train "loader" yields the one batch `steps` times: the module's own
         training_step (with its self.log calls: train/loss every step; the schedule values
         only on steps a logger writes, so none here), lr / wd schedule hook,
         per-parameter clipping and last-layer freeze in `on_before_optimizer_step`, EMA in
         `on_train_batch_end`, centre update inside the loss.
  plain  the same in a hand-written loop over the same nn.Modules (copies): set lr / wd,
         forward per resolution, `DINOLoss` (centre update), finite check, zero_grad,
         backward, per-parameter clip, drop last-layer grads, AdamW step, EMA. It calls the
         module's own clip and EMA functions, so the two differ only in the orchestration.

Both are timed the same way: a clock at the start of every step (a callback's
on_train_batch_start in ours, the top of the loop in plain), so a step is everything from
one step's start to the next one's (forward, backward, optimiser, EMA, schedules, hooks,
logging, fetching the batch); the first `--warmup` steps of each run are dropped. With
`--device cuda` the clock synchronises the GPU first. Repetitions are interleaved (ours,
plain, ours, plain, ...), each from fresh copies of the initial module.

The benchmark checks itself: after the first repetition both have trained `steps` steps
from the same state, so their student and teacher weights, buffers and DINO centre must
agree; the largest absolute difference is printed (`max |dw|`) and the script fails if it
exceeds `--tolerance`.

Read the table as: `ms/step` best and median over all timed steps of all repetitions;
`overhead` = ours / plain - 1 (best and median, and the median difference in ms). `fit s`
is one whole fit / loop call (set-up included) for scale. A CPU step of the default model
takes seconds, so Lightning's few milliseconds vanish in it; a tiny model (last command)
shows the per-step cost that matters for fast GPU steps.

    python bench/train_step.py                            # ResNet-18, 64/32x4, batch 16
    python bench/train_step.py --backbone vit_tiny --steps 8 --reps 3
    python bench/train_step.py --global-size 224 --local-size 96 --n-local 8 --batch-size 16
    python bench/train_step.py --device cuda --precision bf16-mixed --batch-size 64
    python bench/train_step.py --steps 22 --warmup 2 --batch-size 8 --global-size 32 \
        --local-size 16 --n-local 2 --override backbone.name=test_resnet module.out_dim=256 \
        module.hidden_dim=128 --out bench/results/train_step_toy.json

Prints a table and writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import math
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from _report import write_results
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from tqdm.auto import tqdm

import shared.config  # noqa: F401  (registers the config resolvers)
from selfsup.base import clip_grad_per_parameter_, ema_update_
from selfsup.dino import DINOModule
from shared.instantiate import instantiate
from shared.schedules import cosine_schedule, warmup_then_constant

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "train_step.json"
SEED = 0


# ---- the model and the batch --------------------------------------------------------------
def build_module(overrides: list[str]) -> tuple[DINOModule, int]:
    """The `ssl` config's DINOModule (and data batch size) with Hydra `overrides`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="ssl", overrides=overrides)
    GlobalHydra.instance().clear()
    module_cfg = OmegaConf.create(OmegaConf.to_container(cfg.module, resolve=True))
    torch.manual_seed(SEED)
    return instantiate(module_cfg, "module"), int(cfg.data.batch_size)


def make_batch(module: DINOModule, batch_size: int, image_size: int, device) -> dict:
    """One multi-crop batch made by the module's own `augment` (MultiCrop) of random images."""
    g = torch.Generator().manual_seed(SEED)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=g)
    views = module.augment(images.to(torch.uint8), generator=g)
    return {"views": [v.to(device) for v in views], "labels": torch.zeros(batch_size).long()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- ours: the LightningModule on a real Trainer ------------------------------------------
class Repeat:
    """Yields one batch `n` times: a sized iterable, no DataLoader, sampler or RNG draw (a
    list would be read by Lightning as a list of loaders)."""

    def __init__(self, batch, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return itertools.repeat(self.batch, self.n)

    def __len__(self) -> int:
        return self.n


class FixedBatchData(L.LightningDataModule):
    """The same pre-made batch `steps` times."""

    def __init__(self, batch: dict, steps: int, batch_size: int) -> None:
        super().__init__()
        self.batch, self.steps, self.batch_size = batch, steps, batch_size

    def train_dataloader(self):
        return Repeat(self.batch, self.steps)


class StepClock(L.Callback):
    """Seeds the RNG when training starts (drop path draws alike in both) and notes the time
    at every step start (callbacks' on_train_batch_start runs before the module's)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.starts = device, []

    def on_train_start(self, trainer, pl_module) -> None:
        torch.manual_seed(SEED)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())


def lightning_fit(module, batch, steps, batch_size, device, precision="32-true"):
    """Train `module` in place for `steps` steps; (per-step seconds, fit wall seconds)."""
    clock = StepClock(device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=FixedBatchData(batch, steps, batch_size))
    wall = time.perf_counter() - t0
    return [b - a for a, b in zip(clock.starts[:-1], clock.starts[1:])], wall


# ---- plain: the same step written out -----------------------------------------------------
def plain_fit(m: DINOModule, batch, steps, batch_size, device, precision="32-true"):
    """What `lightning_fit` does, as a plain loop over `m`'s modules; same return value."""
    t0 = time.perf_counter()
    hp = m.hparams
    m.to(device).train()
    lr = cosine_schedule(hp.base_lr * batch_size / 256, hp.min_lr, steps, hp.warmup_epochs * steps)
    wd = cosine_schedule(hp.weight_decay, hp.weight_decay_end, steps)
    momentum = cosine_schedule(hp.momentum_teacher, hp.momentum_teacher_end, steps)
    temp = float(
        warmup_then_constant(
            hp.warmup_teacher_temp, hp.teacher_temp, hp.warmup_teacher_temp_epochs, 1
        )[0]
    )
    student = [*m.student_backbone.parameters(), *m.student_head.parameters()]
    teacher = [*m.teacher_backbone.parameters(), *m.teacher_head.parameters()]
    decay, no_decay = [], []
    for module in (m.student_backbone, m.student_head):
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(lr[0]),
        weight_decay=hp.weight_decay,
    )
    last_layer = list(m.student_head.last_layer.parameters())
    freeze_last = hp.freeze_last_layer_epochs > 0  # every step here is in epoch 0
    views = batch["views"]
    amp = precision == "bf16-mixed"
    torch.manual_seed(SEED)
    starts = []
    for step in range(steps):
        sync(device)
        starts.append(time.perf_counter())
        for group in opt.param_groups:
            group["lr"] = float(lr[step])
        opt.param_groups[0]["weight_decay"] = float(wd[step])
        # cache_enabled=False as Lightning's: with the cache, the two student passes share
        # one bf16 copy of each weight and their gradients add up in bf16.
        with torch.autocast(device.type, torch.bfloat16, enabled=amp, cache_enabled=False):
            s_out, t_out = m.forward_views(views)  # the model's forward: a plain method
            loss = m.criterion(s_out, t_out, len(views), hp.student_temp, temp)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"DINO loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hp.clip_grad:
            clip_grad_per_parameter_(student, hp.clip_grad)
        if freeze_last:
            for p in last_layer:
                p.grad = None
        opt.step()
        ema_update_(teacher, student, float(momentum[step]))
    sync(device)
    wall = time.perf_counter() - t0
    return [b - a for a, b in zip(starts[:-1], starts[1:])], wall


# ---- checks and report --------------------------------------------------------------------
def max_weight_diff(a: DINOModule, b: DINOModule) -> dict:
    """Largest |a - b| over the student, the teacher (parameters and buffers) and the centre."""
    out = {}
    for part in ("student_backbone", "student_head", "teacher_backbone", "teacher_head"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        out[part] = max(
            (sa[k].double() - sb[k].double()).abs().max().item()
            for k in sa
            if sa[k].is_floating_point()
        )
    out["center"] = (a.criterion.center - b.criterion.center).abs().max().item()
    return out


def summarise(times: list[float]) -> dict:
    return {
        "steps_timed": len(times),
        "best_ms": round(min(times) * 1e3, 2),
        "median_ms": round(statistics.median(times) * 1e3, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18", help="a conf/backbone option")
    ap.add_argument("--global-size", type=int, default=64, help="module.multicrop.global_size")
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument("--n-local", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=None, help="source images (default global)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="steps per run (fit or loop)")
    ap.add_argument("--warmup", type=int, default=1, help="first step intervals not timed")
    ap.add_argument("--reps", type=int, default=3, help="interleaved runs of each")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda if available)")
    ap.add_argument(
        "--precision",
        default="32-true",
        choices=["32-true", "bf16-mixed"],
        help="bf16-mixed: autocast around forward and loss in both (no grad scaler needed)",
    )
    ap.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max |dw| allowed (default 1e-6 on the CPU, where both give identical weights; "
        "1e-3 on CUDA, whose kernels need not be deterministic)",
    )
    ap.add_argument(
        "--override", nargs="*", default=[], help="extra Hydra overrides, e.g. module.out_dim=65536"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # tips and notices
    warnings.filterwarnings("ignore", module="lightning")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.tolerance is None:
        args.tolerance = 1e-3 if device.type == "cuda" else 1e-6
    torch.set_num_threads(args.threads)
    overrides = [
        f"backbone={args.backbone}",
        f"module.multicrop.global_size={args.global_size}",
        f"module.multicrop.local_size={args.local_size}",
        f"module.multicrop.n_local={args.n_local}",
        *args.override,
    ]
    if args.steps - 1 <= args.warmup:
        ap.error("--steps must exceed --warmup + 1")

    t_start = time.perf_counter()
    initial, _ = build_module(overrides)
    batch = make_batch(initial, args.batch_size, args.image_size or args.global_size, device)
    n_params = sum(p.numel() for p in initial.student_parameters())
    print(
        f"DINO {args.backbone}, {n_params / 1e6:.1f}M student parameters, "
        f"{len(batch['views'])} views {[tuple(v.shape[-2:]) for v in batch['views'][1:3]]}, "
        f"batch {args.batch_size}, {args.steps} steps x {args.reps} reps, {device}, "
        f"{args.threads} thread(s), {args.precision}"
    )
    times = {"ours": [], "plain": []}
    walls = {"ours": [], "plain": []}
    diff = None
    bar = tqdm(total=2 * args.reps, unit="run")
    for rep in range(args.reps):
        ours, plain = copy.deepcopy(initial), copy.deepcopy(initial)
        for name, fit, m in (("ours", lightning_fit, ours), ("plain", plain_fit, plain)):
            dts, wall = fit(m, batch, args.steps, args.batch_size, device, args.precision)
            times[name] += dts[args.warmup :]
            walls[name].append(wall)
            bar.set_postfix_str(f"{name} {statistics.median(dts) * 1e3:.0f} ms/step")
            bar.update()
        if rep == 0:
            diff = max_weight_diff(ours, plain)
        del ours, plain
    bar.close()
    worst = max(diff.values())
    rows = {name: {**summarise(ts), "fit_s_best": round(min(walls[name]), 2)}
            for name, ts in times.items()}  # fmt: skip
    overhead = {
        "best": round(rows["ours"]["best_ms"] / rows["plain"]["best_ms"] - 1, 4),
        "median": round(rows["ours"]["median_ms"] / rows["plain"]["median_ms"] - 1, 4),
        "median_ms": round(rows["ours"]["median_ms"] - rows["plain"]["median_ms"], 2),
    }
    print(f"\n{'':>6} {'ms/step best':>12} {'ms/step med':>11} {'fit s':>6} {'steps':>5}")
    for name, r in rows.items():
        print(
            f"{name:>6} {r['best_ms']:>12.1f} {r['median_ms']:>11.1f} {r['fit_s_best']:>6.1f} "
            f"{r['steps_timed']:>5}"
        )
    print(
        f"overhead ours/plain - 1: best {100 * overhead['best']:+.1f}%, "
        f"median {100 * overhead['median']:+.1f}% ({overhead['median_ms']:+.1f} ms a step)"
    )
    print(f"max |dw| after {args.steps} steps, ours vs plain: {worst:.2e} " + str(diff))
    elapsed = time.perf_counter() - t_start
    print(f"total {elapsed:.0f} s")
    args.device = str(device)
    write_results(
        args,
        elapsed,
        {"rows": rows, "overhead": overhead, "max_abs_weight_diff": diff},
        lightning=L.__version__,
    )
    if worst > args.tolerance:
        raise SystemExit(f"ours and plain disagree: max |dw| {worst:.2e} > {args.tolerance}")


if __name__ == "__main__":
    main()
