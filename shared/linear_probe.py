"""Linear probe: a linear classifier on frozen features, the standard SSL protocol beside kNN.

    python -m shared.linear_probe --run-dir logs/ssl/dino/runs/<time>
    python -m shared.linear_probe --run-dir <run> --lrs 0.01 0.1 1 --epochs 100
    python -m shared.linear_probe --run-dir <run> --which init    # the untrained baseline

Loads the run (`load_run`, best checkpoint), embeds its train, val and test splits once with
`module.embed` (the teacher backbone for DINO; un-augmented, L2-normalised) and keeps them in
memory, then trains one `nn.Linear` per learning rate on the train features, all on the same
batches (SGD, momentum 0.9, cosine schedule: the sweep of DINO / DINOv2's linear evaluation,
without augmentation since the features are cached). The lr is chosen on validation top-1;
only the chosen head is scored on test. Writes `<run-dir>/linear_probe.json`.

Features are standardised with the train split's mean and std, an affine map (the linear
classifier can express it) that makes one lr grid suit every backbone's feature scale.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared.atomic import write_text
from shared.embedding import embed_rows

log = logging.getLogger(__name__)

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def train_linear_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lrs,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> list[nn.Linear]:
    """One linear head per lr, trained on the same shuffled batches of (x, y)."""
    if len(x) == 0:
        raise ValueError("the linear probe needs training features, got none")
    gen = torch.Generator().manual_seed(seed)
    heads = [nn.Linear(x.shape[1], num_classes) for _ in lrs]
    for head in heads:  # the same start for every lr
        nn.init.normal_(head.weight, std=0.01, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(head.bias)
    opts = [
        torch.optim.SGD(h.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        for h, lr in zip(heads, lrs)
    ]
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x), generator=gen)
        rows = order[(step % steps_per_epoch) * batch_size :][:batch_size]
        scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine to zero
        for head, opt, lr in zip(heads, opts, lrs):
            for group in opt.param_groups:
                group["lr"] = lr * scale
            loss = F.cross_entropy(head(x[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return heads


@torch.no_grad()
def top1(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(x).argmax(1) == y).float().mean()) if len(y) else float("nan")


def standardise(splits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every split scaled with the train split's per-dimension mean and std."""
    mean, std = splits["train"].mean(0), splits["train"].std(0).clamp_min(1e-6)
    return {name: (x - mean) / std for name, x in splits.items()}


def linear_probe(
    features: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    num_classes: int,
    lrs=DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict:
    """Heads per lr on `features["train"]`; the lr with the best val top-1 (the smaller on a
    tie) is chosen and its test top-1 reported (None without test features)."""
    lrs = [float(lr) for lr in lrs]
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ValueError(f"--lrs must be positive learning rates, got {lrs}")
    x = standardise(features)
    heads = train_linear_heads(
        x["train"], labels["train"], num_classes, lrs, epochs, batch_size, weight_decay, seed
    )
    val = [top1(h, x["val"], labels["val"]) for h in heads]
    best = max(range(len(lrs)), key=lambda i: (val[i], -lrs[i]))
    test = x.get("test")
    return {
        "chosen_on": "val",
        "lr": lrs[best],
        "val_top1": val[best],
        "test_top1": None if test is None else top1(heads[best], test, labels["test"]),
        "train_top1": top1(heads[best], x["train"], labels["train"]),
        "val_top1_per_lr": {str(lr): v for lr, v in zip(lrs, val)},
        "epochs": epochs,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "n": {name: len(v) for name, v in labels.items()},
        "num_classes": num_classes,
    }


def split_rows(datamodule) -> dict:
    """Store rows of a run's labelled train rows, val and test splits (test only if any).
    Refused when val / test hold classes train lacks (a class-disjoint split): a classifier
    cannot name a class it never saw."""
    datamodule.setup()
    labels = datamodule.store.labels
    rows = {"train": datamodule.bank_indices, "val": datamodule.val_indices}
    if len(datamodule.test_indices):
        rows["test"] = datamodule.test_indices
    seen = set(labels[torch.as_tensor(rows["train"])].tolist())
    for name in ("val", "test"):
        if name in rows:
            unseen = set(labels[torch.as_tensor(rows[name])].tolist()) - seen
            if unseen:
                raise ValueError(
                    f"the {name} split holds {len(unseen)} classes absent from train (a "
                    "class- or group-disjoint split, e.g. the matching folds): a linear probe "
                    "needs every class in train (data.split_by=instance)"
                )
    return rows


def probe_run(
    run_dir: str | Path,
    lrs=DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    which: str = "best",
    device: str = "auto",
    seed: int = 0,
) -> dict:
    """Embed a run's splits with its frozen module, probe them; write linear_probe.json
    (`linear_probe_<which>.json` for `last` and `init`)."""
    from shared.run_loading import load_run

    run = load_run(run_dir, "best" if which == "init" else which)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    module = initial_module(run.config) if which == "init" else run.module
    module = module.to(device).eval()
    features, labels = {}, {}
    splits = split_rows(run.datamodule)  # sets the data module up
    store = run.datamodule.store
    for name, rows in splits.items():
        features[name] = torch.from_numpy(embed_rows(module, store.images, rows))
        labels[name] = store.labels[torch.as_tensor(rows)]
    num_classes = run.datamodule.num_classes
    result = linear_probe(
        features, labels, num_classes, lrs, epochs, batch_size, weight_decay, seed
    )
    checkpoint = "init: untrained, built from the run's config and seed"
    result = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint if which == "init" else str(run.checkpoint),
        **result,
    }
    write_text(Path(run_dir) / output_name(which), json.dumps(result, indent=1))
    return result


def output_name(which: str) -> str:
    return "linear_probe.json" if which == "best" else f"linear_probe_{which}.json"


def initial_module(cfg):
    """The run's network before training: seeded and built as `shared.train.run` builds it
    (the weights its eval_at_init scored), for modules built whole at construction."""
    import lightning as L

    from shared.instantiate import instantiate

    L.seed_everything(cfg.seed, workers=True)
    module = instantiate(cfg.module, "module")
    if getattr(module, "net", True) is None:
        raise ValueError(
            f"--which init: {cfg.module._target_} builds its network from the data at fit "
            "time, so there is no untrained network to probe from the config alone"
        )
    return module


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-dir", required=True, help="a run directory (.hydra/ + checkpoints/)")
    p.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=list(DEFAULT_LRS),
        help="learning rates swept (one head each); the best on validation is kept",
    )
    p.add_argument("--epochs", type=int, default=100, help="passes over the train features")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--which",
        choices=["best", "last", "init"],
        default="best",
        help="checkpoint to probe; init: the untrained network of the run's config and seed",
    )
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="head initialisation and batch order")
    args = p.parse_args(argv)
    for key in ("epochs", "batch_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    logging.basicConfig(level=logging.INFO)
    result = probe_run(
        args.run_dir,
        args.lrs,
        args.epochs,
        args.batch_size,
        args.weight_decay,
        args.which,
        args.device,
        args.seed,
    )
    test = result["test_top1"]
    print(
        f"linear probe: lr {result['lr']:g} chosen on val (top-1 {result['val_top1']:.4f}); "
        f"test top-1 {'n/a (no test split)' if test is None else f'{test:.4f}'}"
    )
    print(f"wrote {Path(args.run_dir) / output_name(args.which)}")
    return result


if __name__ == "__main__":
    main()
