"""The one training run both pipelines share, as a single linear function.

seed -> data module, module, callbacks, loggers, trainer (all from `_target_` groups) ->
fit (resuming from the run's own last.ckpt) -> test the best checkpoint -> return the metric
a sweeper maximises.
"""

from __future__ import annotations

import logging

import lightning as L
from omegaconf import DictConfig

from shared.config import prepare_environment
from shared.instantiate import instantiate, instantiate_group, save_resolved_config
from shared.resume import check_compatible, resume_checkpoint
from shared.summary import best_checkpoint, final_metric
from shared.tracking.loggers import finish_loggers
from shared.tracking.run_summary import RunSummaryCallback

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    prepare_environment(cfg.get("wandb_online", False))
    L.seed_everything(cfg.seed, workers=True)
    save_resolved_config(cfg, cfg.paths.output_dir)

    datamodule = instantiate(cfg.data, "data")
    module = instantiate(cfg.module, "module")
    # + parameter and FLOPs summary, at the first evaluation or fit start (once data is set up)
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks") + [RunSummaryCallback()]
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer = instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)

    ckpt = resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir, cfg.auto_resume)
    if ckpt:
        check_compatible(ckpt, module)
    elif cfg.get("eval_at_init"):
        trainer.validate(module, datamodule=datamodule)  # the untrained network's figures
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    metric = final_metric(trainer, cfg.get("optimized_metric"))

    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule, ckpt_path=best_checkpoint(trainer))
    finish_loggers(loggers)  # close the W&B run: a sweep's next job starts its own
    return metric
