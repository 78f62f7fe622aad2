"""Learning-rate range test (Smith 2017) on a pipeline's config, with Lightning's Tuner.

    python -m shared.tracking.lr_find --pipeline ssl module=dolg backbone=resnet50
    python -m shared.tracking.lr_find --pipeline matching --num-training 200 --max-lr 0.1

Composes the config exactly as `ssl/run.py` / `product-matching/run.py` would (any Hydra
override after the options), trains `--num-training` steps while the lr grows exponentially
from `--min-lr` to `--max-lr`, then writes into the output directory (default
`logs/<pipeline>/<task>/lr_find/<time>/`):

    lr_find.png    loss against lr, the suggestion marked (steepest descent)
    lr_find.json   lrs, losses, the suggested optimiser lr and the config override it means

The suggestion is the optimiser's lr; `lr_find.json` also translates it into the config key
the module class declares (`lr_key`): `module.lr` for metric learning (per-group multipliers
kept), `module.base_lr` for the self-supervised methods (lr = base_lr x global batch / 256).
The weights are restored afterwards; nothing else of a run (checkpoints, loggers,
callbacks) is involved.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import hydra

from shared.tracking.compose import PIPELINES, compose_pipeline

log = logging.getLogger(__name__)


def let_finder_drive_lr(module) -> None:
    """Keep the finder's lr in the optimiser of modules that set their own lr every step.

    The SSL methods write their scheduled lr in `on_train_batch_start`, after the finder's
    scheduler has set it: re-apply the finder's lr after the module's hook. Groups keep their
    ratio to `hparams.lr` when the module has one (metric learning: backbone / head
    multipliers).
    """
    configure, batch_start = module.configure_optimizers, module.on_train_batch_start
    ratios: list[float] = []

    def configure_optimizers():
        out = configure()
        opt = out["optimizer"] if isinstance(out, dict) else out
        opt = opt[0] if isinstance(opt, (list, tuple)) else opt
        ref = module.hparams.get("lr")
        ratios[:] = [g.get("initial_lr", g["lr"]) / ref if ref else 1.0 for g in opt.param_groups]
        return out

    def on_train_batch_start(batch, batch_idx):
        out = batch_start(batch, batch_idx)
        configs = module.trainer.lr_scheduler_configs
        if configs and hasattr(configs[0].scheduler, "lr"):  # the finder's own scheduler
            lr = configs[0].scheduler.lr[0]
            for group, ratio in zip(module.trainer.optimizers[0].param_groups, ratios):
                group["lr"] = lr * ratio
        return out

    module.configure_optimizers = configure_optimizers
    module.on_train_batch_start = on_train_batch_start


def config_override(cfg, lr: float | None) -> dict:
    """The config value the suggested optimiser lr stands for, as the module class declares
    it (`lr_key`, `lr_override`): read from `module._target_`, nothing built."""
    if lr is None:
        return {}
    module_class = hydra.utils.get_class(cfg.module._target_)
    if not hasattr(module_class, "lr_override"):
        return {}
    t = cfg.trainer
    devices = t.devices if isinstance(t.devices, int) else 1
    batch = cfg.data.batch_size * devices * t.get("num_nodes", 1)
    return module_class.lr_override(lr, batch * t.get("accumulate_grad_batches", 1))


def lr_find(
    cfg,
    num_training: int = 100,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    mode: str = "exponential",
    early_stop_threshold: float | None = 4.0,
) -> dict:
    """Run the range test for `cfg`; write lr_find.png and lr_find.json to its output dir."""
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    from shared.instantiate import instantiate

    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data, "data")
    module = instantiate(cfg.module, "module")
    let_finder_drive_lr(module)
    trainer = instantiate(
        cfg.trainer,
        "trainer",
        callbacks=[],
        logger=False,
        enable_checkpointing=False,
        max_epochs=-1,
        max_steps=num_training,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=10**9,  # the finder sets limit_val_batches; never validate
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=min_lr,
        max_lr=max_lr,
        num_training=num_training,
        mode=mode,
        early_stop_threshold=early_stop_threshold,
        update_attr=False,
    )
    suggestion = finder.suggestion()
    import matplotlib

    matplotlib.use("Agg")
    fig = finder.plot(suggest=suggestion is not None)
    fig.axes[0].set_title(
        f"{cfg.pipeline} / {cfg.task_name}: suggested lr "
        + (f"{suggestion:.2e}" if suggestion is not None else "none")
    )
    fig.savefig(out / "lr_find.png", dpi=100)
    result = {
        "pipeline": cfg.pipeline,
        "task_name": cfg.task_name,
        "suggestion": suggestion,
        "config": config_override(cfg, suggestion),
        "num_training": num_training,
        "min_lr": min_lr,
        "max_lr": max_lr,
        "mode": mode,
        "lr": [float(x) for x in finder.results["lr"]],
        "loss": [float(x) for x in finder.results["loss"]],
    }
    (out / "lr_find.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pipeline", required=True, choices=sorted(PIPELINES))
    p.add_argument("--out-dir", default=None, help="default logs/<pipeline>/<task>/lr_find/<time>")
    p.add_argument("--num-training", type=int, default=100, help="steps (one lr each)")
    p.add_argument("--min-lr", type=float, default=1e-7)
    p.add_argument("--max-lr", type=float, default=1.0)
    p.add_argument("--mode", choices=["exponential", "linear"], default="exponential")
    p.add_argument(
        "--early-stop-threshold",
        type=float,
        default=4.0,
        help="stop when the loss exceeds this times the best loss",
    )
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. module=dolg data.batch_size=32"
    )
    # overrides may come before, between or after the flags, as a user types them
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = compose_pipeline(args.pipeline, args.overrides, args.out_dir)
    result = lr_find(
        cfg, args.num_training, args.min_lr, args.max_lr, args.mode, args.early_stop_threshold
    )
    out = Path(cfg.paths.output_dir)
    suggestion = result["suggestion"]
    print(f"suggested optimiser lr: {suggestion if suggestion is None else f'{suggestion:.3e}'}")
    if result["config"]:
        print(f"as an override: {result['config']['key']}={result['config']['value']:.3e}")
    print(f"wrote {out / 'lr_find.png'} and {out / 'lr_find.json'}")
    return result


if __name__ == "__main__":
    main()
