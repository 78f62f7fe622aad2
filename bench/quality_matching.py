"""Benchmark: our DOLG + Sub-center ArcFace against pytorch-metric-learning's at one budget.

  ours  `python product-matching/run.py` exactly as users get it (conf/matching.yaml: DOLG on
        ResNet-18 + our `ArcFaceHead` with 3 sub-centres, s = 30, m = 0.15, the synthetic
        postings at 64 px, fold 0 of 5 as validation, batch 64, 16 epochs), composed with
        Hydra's compose API and run by `shared.train.run`; only the seed, epochs, logger (none)
        and output folder are overridden.
  pml   a plain PyTorch loop: the same embedding net (`build_embedding_net`, the repo's DOLG with
        GeM, starting from the very weights ours started from) trained with
        `pytorch_metric_learning.losses.SubCenterArcFaceLoss(num_classes, embedding_size,
        margin=degrees(0.15), scale=30, sub_centers=3)`; the loss's own class weights (its
        initialisation, N(0, 1)) are optimised with the lr ours gives its head.

Held equal: the data (same store, same fold; ours' batches are recorded and replayed, so every
optimiser step sees the same rows on both sides), the augmentation (`TrainTransform` of the
module config: random resized crop scale 0.5-1, flip, mild jitter), the optimiser (AdamW, lr
1e-3 for backbone and DOLG neck, x10 for the head / loss weights, weight decay 1e-4 on all,
1 warm-up epoch then cosine to 1 % per step: `WarmupCosine`), and the evaluation: the
pipeline's own `MatchingEvalCallback` (conf/callbacks/matching_eval.yaml: one k = 51 search,
the F1 sweep over 101 thresholds, Recall@1 and mAP@R) on the validation fold, after the same
epochs as ours (init, then every 4 epochs). What differs is only the margin head / loss
implementation (and its initialisation) and the training loop (Lightning vs plain PyTorch);
the augmentation's random draws differ too (the two loops consume the RNG differently).

Reported: best-threshold F1, its threshold, precision and recall, Recall@1 and mAP@R of the
final weights (no selection), mean ± std over seeds; the untrained network (identical for
both, checked); in the JSON also the best evaluation by F1 (what ours' ModelCheckpoint keeps
and tests), every evaluation, the per-seed paired difference and the identity checks.

    python bench/quality_matching.py                 # 3 seeds x 16 epochs, ~25 min (below)
    python bench/quality_matching.py --seeds 0 1 2 3 4
    python bench/quality_matching.py --quick         # 1 seed, 1 epoch: a smoke run

Writes bench/results/quality_matching.json and quality_matching.png. `--threads` sets torch's
intra-op threads (default: OMP_NUM_THREADS, else 1); on a quiet 2-core machine use 2.
Time per seed, 1 thread on a busy 2-core machine: about 4 min for each method.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import pytorch_metric_learning
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
from omegaconf import OmegaConf
from pytorch_metric_learning.losses import SubCenterArcFaceLoss
from tqdm.auto import tqdm

from shared.data.augment import EvalTransform, TrainTransform
from shared.instantiate import instantiate
from shared.models.registry import build_embedding_net
from shared.modules.metric_learning import WarmupCosine

KEYS = ["f1", "threshold", "precision", "recall", "recall@1", "map@r"]
LABELS = ["F1", "threshold", "precision", "recall", "Recall@1", "mAP@R"]
QUICK = {"seeds": [0], "epochs": 1}
# Head options our ArcFaceHead has and SubCenterArcFaceLoss does not: they must be off.
HEAD_DEFAULTS = {"easy_margin": False, "margin_warmup_steps": 0, "label_smoothing": 0.0}


def pml_loss(hp: dict, num_classes: int, embedding_size: int) -> SubCenterArcFaceLoss:
    """PML's Sub-center ArcFace with ours' values (its margin is in degrees)."""
    head = hp["head"]
    unsupported = {k: head[k] for k, v in HEAD_DEFAULTS.items() if head.get(k, v) != v}
    if unsupported or hp.get("dynamic_margins") or hp.get("aux_weight") or hp["triplet_weight"]:
        raise ValueError(f"SubCenterArcFaceLoss has no equivalent of {unsupported or hp}")
    return SubCenterArcFaceLoss(
        num_classes=num_classes,
        embedding_size=embedding_size,
        margin=math.degrees(head["margin"]),
        scale=head["scale"],
        sub_centers=head["subcenters"],
    )


def run_pml(cfg, probe) -> dict:
    """PML's loss on ours' embedding net, starting weights and batches; evaluated like ours."""
    hp = OmegaConf.to_container(cfg.module, resolve=True)
    L.seed_everything(cfg.seed, workers=True)
    t0 = time.perf_counter()
    dm = instantiate(cfg.data, "data")
    dm.setup()  # ours builds its net in `setup`, after the data: same order here
    net = build_embedding_net(hp["model"], hp["backbone"], dm.num_classes)
    init_by_seed = states_equal(net.state_dict(), probe.init_state)
    net.load_state_dict(probe.init_state)
    loss_fn = pml_loss(hp, dm.num_classes, net.embedding_dim)

    # The optimiser and schedule of MetricLearningModule.configure_optimizers.
    backbone = list(net.backbone.parameters())
    ids = {id(p) for p in backbone}
    neck = [p for p in net.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW(
        [
            {"params": backbone, "lr": hp["lr"] * hp["backbone_lr_mult"]},
            {"params": neck, "lr": hp["lr"]},
            {"params": loss_fn.parameters(), "lr": hp["lr"] * hp["head_lr_mult"]},
        ],
        lr=hp["lr"],
        weight_decay=hp["weight_decay"],
    )
    epochs = len(probe.batches)
    total = max(1, sum(len(b) for b in probe.batches))
    warmup = min(total - 1, hp["warmup_epochs"] * total // epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup, total, hp["min_lr_ratio"]))

    train_transform = TrainTransform(**hp["train_transform"])
    eval_transform = EvalTransform(hp["eval_size"])
    evaluator = instantiate(cfg.callbacks.matching_eval, "callbacks.matching_eval", plot_dir=None)

    def evaluate(epoch: int) -> dict:
        net.eval()

        def embed(images):
            return F.normalize(net(eval_transform(images)).float(), dim=-1)

        data = {"fold": embed_loader(embed, dm.val_dataloader()["fold"])}
        return {"epoch": epoch, **evaluate_with(evaluator, data)}

    eval_epochs = {h["epoch"] for h in probe.history if h["epoch"] > 0}
    history = [evaluate(0)]
    first_digest, losses = None, []
    bar = tqdm(total=total, desc="pml", unit="step", leave=False)
    for epoch in range(epochs):
        net.train()
        loss_fn.train()
        for rows in probe.batches[epoch]:
            rows = torch.as_tensor(rows)
            images, labels = dm.store.images[rows], dm.store.labels[rows]
            if first_digest is None:
                first_digest = digest(images)
            loss = loss_fn(net(train_transform(images)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
        if epoch + 1 in eval_epochs:
            history.append(evaluate(epoch + 1))
    bar.close()
    return peer_record(history, t0, losses, first_digest, init_by_seed, dm)


def run_seed(seed: int, args, tmp: Path) -> tuple[dict, dict, dict]:
    overrides = run_overrides(seed, args.epochs, eval_every(4, args.epochs)) + args.override
    cfg = compose("matching", overrides, tmp / f"ours-{seed}", args.root)
    probe, ours_s = run_ours(cfg)
    return paired_records(seed, cfg, probe, ours_s, run_pml(cfg, probe), KEYS, "f1")


def main() -> None:
    ap = base_parser(
        __doc__, "quality_matching.json", "data dir (postings and stores written once, by key)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch")
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for ours")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs = QUICK["seeds"], QUICK["epochs"]
    results, elapsed = run_seeds(args, run_seed, "pml", "f1")
    table = {
        "keys": KEYS,
        "labels": LABELS,
        "scale": 1,
        "digits": 3,
        "chart": ["f1", "precision", "recall", "recall@1", "map@r"],
        "title": "Product matching, fold 0",
        "ylabel": "score",
    }
    report(
        args,
        elapsed,
        "matching",
        "pml",
        results,
        table,
        pytorch_metric_learning=pytorch_metric_learning.__version__,
    )


if __name__ == "__main__":
    main()
