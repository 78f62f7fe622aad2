"""Benchmark: kNN top-1 of our DINO against lightly's DINO at the same budget, several seeds.

  ours     `python ssl/run.py` exactly as users get it (conf/ssl.yaml: DINO on ResNet-18, the
           synthetic products at 64 px, batch 64, 16 epochs), composed with Hydra's compose API
           and run by `shared.train.run`; only the seed, epochs, logger (none) and output folder
           are overridden.
  lightly  a plain training loop around lightly's DINO parts: `DINOProjectionHead`, `DINOLoss`,
           `DINOTransform` (per-image PIL views), `update_momentum` / `deactivate_requires_grad`
           (lightly.models.utils) and `cosine_schedule` (lightly.utils.scheduler) for the
           teacher momentum.

What is held equal (the point is the method implementations at one budget):
  - backbone: the repo's `TimmBackbone` ResNet-18 built as `DINOModule` builds it (student with
    drop path 0.1, teacher without, teacher = copy of the student), starting from the very
    weights ours started from (recorded before ours' first step; `init_identical_by_seed` says
    whether seeding alone already reproduced them);
  - data: the same store and train split, and the SAME batches in the same order (ours' batch
    rows are recorded and replayed); every optimiser step sees the same images on both sides;
  - head / loss hyper-parameters, read from conf/module/dino.yaml and passed to lightly's
    classes (today: out_dim 2048, hidden 512, bottleneck 64, BN in the head, norm_last_layer
    false, last layer frozen for 1 epoch, student temperature 0.1, teacher temperature 0.04
    (warm-up 0.04 -> 0.04), centre momentum 0.9, teacher momentum 0.99 -> 1 per step with
    lightly's `cosine_schedule`);
  - what lightly leaves to the user, set as ours: AdamW, lr 4e-3 x 64 / 256 with 2 warm-up
    epochs then cosine to 1e-6 per step, weight decay cosine 0.04 -> 0.4 (none on biases and
    1-D parameters), per-parameter gradient clipping at 3.0, one backbone pass per crop
    resolution, all networks in train mode while training (BatchNorm statistics);
  - augmentation values, passed to `DINOTransform`: crops 2 x 64 px (scale 0.4-1) + 4 x 32 px
    (0.05-0.4), flip 0.5, colour jitter (0.4, 0.4, 0.2, 0) with p 0.8, no grayscale, blur
    p 1.0 / 0.1 / 0.5, solarize 0.2 on global view 2.
  - evaluation: the pipeline's own `KNNCallback` (conf/callbacks/knn.yaml: k = 10/20/100/200,
    T = 0.07) on the same bank (train split, un-augmented) and queries (val split), teacher
    backbone features, after the same epochs as ours (init, then every 4 epochs).

Where lightly's API cannot take ours' values, or differs by design:
  - `DINOProjectionHead` is always 3 layers and its BN layers' Linear has no bias;
  - the lightly loop updates the teacher at the start of each step (its examples' order),
    ours after each optimiser step;
  - `DINOTransform` has one blur sigma range for every view and does not pass `cj_strength` to
    the second global view (it keeps 0.5 there). We use `cj_strength` 0.5 with the factors
    doubled, so all views jitter alike, and replace its local views by `DINOViewTransform`s
    whose sigma range is scaled by 32 / 224 (globals by 64 / 224): ours scales the official
    radius U(0.1, 2) by crop size / 224 per view;
  - PIL bicubic crops of whole-pixel boxes (lightly) vs continuous boxes resampled by
    roi_align (ours, `module.multicrop.subpixel_boxes`); torchvision's
    ColorJitter applies its four factors in a random order, ours in a fixed one.
  - the teacher head starts as a copy of the student head, as in the official code and ours
    (lightly's examples build a second, independently initialised head).

Reported: kNN top-1 at k = 10/20/100/200 of the final weights (no selection), mean ± std over
seeds; the untrained backbone (identical for both, checked); in the JSON also the best
evaluation (what ours' ModelCheckpoint keeps and tests), every evaluation, ours' test figures,
the per-seed paired difference ours - lightly and the identity checks.

    python bench/quality_dino.py                      # 3 seeds x 16 epochs (see below)
    python bench/quality_dino.py --seeds 0 --epochs 16
    python bench/quality_dino.py --quick              # 1 seed, 1 epoch, small data: a smoke run

Writes bench/results/quality_dino.json and quality_dino.png. `--threads` sets torch's intra-op
threads (default: OMP_NUM_THREADS, else 1); on a quiet 2-core machine use `--threads 2`.
Time per seed, 1 thread on a busy 2-core machine: ours 13 min + lightly 10 min (lightly's
per-image PIL views are cheap at 64/32 px); so the default 3 seeds take about 70 min there.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import lightly
import lightning as L
import torch
import torch.nn.functional as F
from _quality import (
    base_parser,
    compose,
    digest,
    embed_loader,
    eval_every,
    evaluate_with,
    paired_records,
    peer_record,
    report,
    run_ours,
    run_overrides,
    run_seeds,
    states_equal,
)
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.dino_transform import DINOTransform, DINOViewTransform
from lightly.utils.scheduler import cosine_schedule as lightly_cosine
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from shared.data.augment import EvalTransform
from shared.instantiate import instantiate
from shared.models.backbone import TimmBackbone
from shared.schedules import cosine_schedule

KS = (10, 20, 100, 200)
KEYS = [f"knn_top1@{k}" for k in KS]
QUICK = {"seeds": [0], "epochs": 1, "families": 8}


# ---- lightly's side -----------------------------------------------------------------------
def lightly_transform(mc) -> DINOTransform:
    """`DINOTransform` set to ours' multi-crop values (see the module docstring)."""

    def sigmas(size: int) -> tuple[float, float]:
        return (0.1 * size / 224, 2.0 * size / 224)

    bright, contrast, sat, hue = mc["jitter"]
    # DINOTransform drops cj_strength for global view 2 (keeps 0.5): use 0.5 everywhere.
    jitter = dict(
        cj_strength=0.5,
        cj_bright=2 * bright,
        cj_contrast=2 * contrast,
        cj_sat=2 * sat,
        cj_hue=2 * hue,
    )
    common = dict(
        hf_prob=mc["flip_p"], cj_prob=mc["jitter_p"], random_gray_scale=mc["grayscale_p"], **jitter
    )
    transform = DINOTransform(
        global_crop_size=mc["global_size"],
        global_crop_scale=tuple(mc["global_scale"]),
        local_crop_size=mc["local_size"],
        local_crop_scale=tuple(mc["local_scale"]),
        n_local_views=mc["n_local"],
        gaussian_blur=tuple(mc["blur_p"]),
        sigmas=sigmas(mc["global_size"]),
        solarization_prob=mc["solarize_p"],
        **common,
    )
    local = DINOViewTransform(
        crop_size=mc["local_size"],
        crop_scale=tuple(mc["local_scale"]),
        gaussian_blur=mc["blur_p"][2],
        sigmas=sigmas(mc["local_size"]),
        solarization_prob=0.0,
        **common,
    )
    transform.transforms = list(transform.transforms[:2]) + [local] * mc["n_local"]
    return transform


class StoreViews(Dataset):
    """Store rows as PIL images through a per-image transform: (views, uint8 image, row)."""

    def __init__(self, store, transform) -> None:
        self.store, self.transform = store, transform

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, row: int):
        image = self.store.images[row]
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        return self.transform(pil), image, row


def clip_per_parameter(params, clip: float) -> None:
    """Official DINO's clipping: each parameter's gradient norm capped at `clip` on its own."""
    for p in params:
        if p.grad is not None:
            p.grad.mul_((clip / (p.grad.norm() + 1e-6)).clamp(max=1.0))


def lightly_parts(cfg, total: int, epochs: int, init_state=None) -> SimpleNamespace:
    """lightly's DINO around ours' backbone: networks, loss, optimiser and schedules.

    The backbone is built as `DINOModule` builds it (student with drop path, teacher without,
    then a copy), starting from `init_state` when given; lr / weight decay run over `total`
    steps in `epochs` epochs, as ours' do.
    """
    hp = OmegaConf.to_container(cfg.module, resolve=True)
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone.pop("drop_path_rate", None)
    student_bb = TimmBackbone(**backbone, drop_path_rate=hp["student_drop_path"])
    teacher_bb = TimmBackbone(**{**backbone, "pretrained_path": None})
    init_by_seed = init_state is not None and states_equal(student_bb.state_dict(), init_state)
    if init_state is not None:
        student_bb.load_state_dict(init_state)
    teacher_bb.load_state_dict(student_bb.state_dict())
    head_kw = dict(
        input_dim=student_bb.num_features,
        hidden_dim=hp["hidden_dim"],
        bottleneck_dim=hp["bottleneck_dim"],
        output_dim=hp["out_dim"],
        batch_norm=hp["use_bn_in_head"],
        norm_last_layer=hp["norm_last_layer"],
    )
    student_head = DINOProjectionHead(**head_kw, freeze_last_layer=hp["freeze_last_layer_epochs"])
    teacher_head = DINOProjectionHead(**head_kw)
    teacher_head.load_state_dict(student_head.state_dict())
    deactivate_requires_grad(teacher_bb)
    deactivate_requires_grad(teacher_head)
    criterion = DINOLoss(
        output_dim=hp["out_dim"],
        warmup_teacher_temp=hp["warmup_teacher_temp"],
        teacher_temp=hp["teacher_temp"],
        warmup_teacher_temp_epochs=hp["warmup_teacher_temp_epochs"],
        student_temp=hp["student_temp"],
        center_momentum=hp["center_momentum"],
    )

    # The optimiser and schedules lightly leaves to the user: ours' (DINOModule).
    decay, no_decay = [], []
    for module in (student_bb, student_head):
        for name, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    peak = hp["base_lr"] * cfg.data.batch_size / 256.0
    lr = cosine_schedule(peak, hp["min_lr"], total, hp["warmup_epochs"] * (total // epochs))
    wd = cosine_schedule(hp["weight_decay"], hp["weight_decay_end"], total)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "apply_wd": True},
            {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
        ],
        lr=float(lr[0]),
        weight_decay=hp["weight_decay"],
    )
    return SimpleNamespace(
        hp=hp, total=total, student_bb=student_bb, teacher_bb=teacher_bb,
        student_head=student_head, teacher_head=teacher_head, criterion=criterion, opt=opt,
        lr=lr, wd=wd, init_by_seed=init_by_seed,
        student_params=[*student_bb.parameters(), *student_head.parameters()],
    )  # fmt: skip


def lightly_train_mode(parts) -> None:
    """All four networks in train mode (BatchNorm statistics), as at each epoch's start."""
    for m in (parts.student_bb, parts.student_head, parts.teacher_bb, parts.teacher_head):
        m.train()


def lightly_step(parts, views, step: int, epoch: int) -> float:
    """One training step of lightly's DINO (its examples' order: teacher update first)."""
    hp, opt = parts.hp, parts.opt
    for group in opt.param_groups:
        group["lr"] = float(parts.lr[step])
        if group["apply_wd"]:
            group["weight_decay"] = float(parts.wd[step])
    m = lightly_cosine(step, parts.total, hp["momentum_teacher"], hp["momentum_teacher_end"])
    update_momentum(parts.student_bb, parts.teacher_bb, m)
    update_momentum(parts.student_head, parts.teacher_head, m)
    n_views = len(views)
    globals_, locals_ = torch.cat(views[:2]), torch.cat(views[2:])
    feats = [parts.student_bb(globals_)] + ([parts.student_bb(locals_)] if n_views > 2 else [])
    student = parts.student_head(torch.cat(feats)).chunk(n_views)
    with torch.no_grad():
        teacher = parts.teacher_head(parts.teacher_bb(globals_)).chunk(2)
    loss = parts.criterion(list(teacher), list(student), epoch=epoch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if hp["clip_grad"]:
        clip_per_parameter(parts.student_params, hp["clip_grad"])
    parts.student_head.cancel_last_layer_gradients(current_epoch=epoch)
    opt.step()
    return loss.item()


def run_lightly(cfg, probe) -> dict:
    """lightly's DINO on ours' backbone, starting weights and batches; evaluated like ours."""
    L.seed_everything(cfg.seed, workers=True)
    t0 = time.perf_counter()
    epochs = len(probe.batches)
    total = sum(len(b) for b in probe.batches)
    parts = lightly_parts(cfg, total, epochs, probe.init_state)
    hp, teacher_bb = parts.hp, parts.teacher_bb

    dm = instantiate(cfg.data, "data")
    dm.setup()
    dataset = StoreViews(dm.store, lightly_transform(hp["multicrop"]))

    eval_transform = EvalTransform(hp.get("eval_size"))
    knn = instantiate(cfg.callbacks.knn, "callbacks.knn", history_dir=None)

    def evaluate(epoch: int) -> dict:
        teacher_bb.eval()

        def embed(images):
            return F.normalize(teacher_bb(eval_transform(images)).float(), dim=-1)

        data = {
            "bank": embed_loader(embed, dm.bank_dataloader()),
            "query": embed_loader(embed, dm.query_dataloader()),
        }
        return {"epoch": epoch, **evaluate_with(knn, data)}

    eval_epochs = {h["epoch"] for h in probe.history if h["epoch"] > 0}
    history = [evaluate(0)]
    first_digest, step, losses = None, 0, []
    bar = tqdm(total=total, desc="lightly", unit="step", leave=False)
    for epoch in range(epochs):
        lightly_train_mode(parts)
        loader = DataLoader(dataset, batch_sampler=probe.batches[epoch], num_workers=0)
        for views, images, _rows in loader:
            if first_digest is None:
                first_digest = digest(images)
            losses.append(lightly_step(parts, views, step, epoch))
            step += 1
            bar.update()
        if epoch + 1 in eval_epochs:
            history.append(evaluate(epoch + 1))
    bar.close()
    return peer_record(history, t0, losses, first_digest, parts.init_by_seed, dm)


# ---- one seed: both methods ---------------------------------------------------------------
def run_seed(seed: int, args, tmp: Path) -> tuple[dict, dict, dict]:
    overrides = run_overrides(seed, args.epochs, eval_every(4, args.epochs))
    if args.families:
        overrides.append(f"data.source.num_families={args.families}")
    cfg = compose("ssl", overrides, tmp / f"ours-{seed}", args.root)
    probe, ours_s = run_ours(cfg)
    return paired_records(seed, cfg, probe, ours_s, run_lightly(cfg, probe), KEYS, "knn_top1@20")


def main() -> None:
    ap = base_parser(
        __doc__, "quality_dino.json", "data dir (stores are built once, reused by key)"
    )
    ap.add_argument(
        "--families",
        type=int,
        default=None,
        help="synthetic families (conf: 24); fewer = a faster, noisier run",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, 1 epoch, 8 families (under 2 minutes)",
    )
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.families = QUICK["seeds"], QUICK["epochs"], QUICK["families"]
    results, elapsed = run_seeds(args, run_seed, "lightly", "knn_top1@20")
    table = {
        "keys": KEYS,
        "labels": [f"k={k}" for k in KS],
        "scale": 100,
        "digits": 1,
        "chart": KEYS,
        "title": "DINO kNN top-1",
        "unit": " (%)",
        "ylabel": "kNN top-1",
    }
    report(
        args,
        elapsed,
        "dino",
        "lightly",
        results,
        table,
        lightly=lightly.__version__,
    )


if __name__ == "__main__":
    main()
