"""SSL and metric-learning pipeline: `python ssl/run.py [key=value ...]`.

One linear run: seed -> data module, module, callbacks, loggers, trainer -> fit -> test ->
the metric a sweeper maximises. Everything is built from `_target_` groups under conf/.
"""

from __future__ import annotations

import logging

import hydra
import lightning as L
from omegaconf import DictConfig

from shared.config import prepare_environment
from shared.instantiate import instantiate, instantiate_group, save_resolved_config
from shared.resume import check_compatible, resume_checkpoint
from shared.summary import best_checkpoint, final_metric, log_run_summary

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    prepare_environment(cfg.get("wandb_online", False))
    L.seed_everything(cfg.seed, workers=True)
    save_resolved_config(cfg, cfg.paths.output_dir)

    datamodule = instantiate(cfg.data, "data")
    module = instantiate(cfg.module, "module")
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer = instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    log_run_summary(module, loggers, cfg)

    ckpt = resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir, cfg.auto_resume)
    if ckpt:
        check_compatible(ckpt, module)
    elif cfg.get("eval_at_init"):
        trainer.validate(module, datamodule=datamodule)  # the untrained network's figures
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    metric = final_metric(trainer, cfg.get("optimized_metric"))

    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule, ckpt_path=best_checkpoint(trainer))
    return metric


@hydra.main(version_base="1.3", config_path="../conf", config_name="ssl")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
