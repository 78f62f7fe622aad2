"""The one training run both pipelines share, as a single linear function.

seed -> data module, module, callbacks, loggers, trainer (all from `_target_` groups) ->
(score the untrained network) -> fit (resuming from the run's own last.ckpt; the last epoch
is always validated and checkpointed) -> test the best checkpoint on the held-out split ->
`results.json` and one closing line -> return the validation metric a sweeper maximises.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from shared.atomic import write_text
from shared.callbacks.csv_history import CsvHistory
from shared.callbacks.final_validation import ValidateLastEpoch
from shared.callbacks.loader_position import LoaderPositionCallback
from shared.callbacks.preemption import PreemptionCheckpoint
from shared.callbacks.progress_log import ProgressLog
from shared.callbacks.run_summary import RunSummaryCallback
from shared.checkpoint_io import use_atomic_checkpoints
from shared.config import check_trainer_config, prepare_environment
from shared.instantiate import instantiate, instantiate_group, save_resolved_config
from shared.resume import check_compatible, last_checkpoint, resume_checkpoint
from shared.run_loading import CHOSEN
from shared.tracking.loggers import finish_loggers, log_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    try:
        return _run(cfg)
    except Exception:
        # Hydra prints the traceback to stderr only; the run's own log must hold it too
        log.exception("Run failed")
        raise


def _run(cfg: DictConfig) -> float | None:
    prepare_environment(cfg.get("wandb_online", False))
    check_trainer_config(cfg.trainer)
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, out)

    datamodule = instantiate(cfg.data, "data")
    module = instantiate(cfg.module, "module")
    # + parameter and FLOPs summary (at the first evaluation or fit start, once data is set
    # up), a validation of the last epoch whatever the cadence, plain progress lines, the CSV
    # history kept through resumes, a mid-epoch resume that continues the epoch's order, and
    # last.ckpt saved at a scheduler's preemption signal
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    callbacks += [RunSummaryCallback(), ValidateLastEpoch(), ProgressLog(), CsvHistory()]
    callbacks += [LoaderPositionCallback(), PreemptionCheckpoint(last_checkpoint(out))]
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer = instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    use_atomic_checkpoints(trainer)
    log_config(loggers, cfg)

    results: dict = {"run_dir": str(out)}
    untrained = out / UNTRAINED
    ckpt = resume_checkpoint(cfg.get("ckpt_path"), out, cfg.auto_resume)
    if ckpt:
        check_compatible(ckpt, module)
        if untrained.is_file():  # scored before the run was stopped
            results["untrained_test"] = json.loads(untrained.read_text())
    elif cfg.get("eval_at_init"):  # the untrained network's figures: the baseline
        trainer.validate(module, datamodule=datamodule, verbose=False)
        if cfg.get("test"):
            scores = trainer.test(module, datamodule=datamodule, verbose=False)
            results["untrained_test"] = _first(scores)
            if trainer.is_global_zero:  # kept for results.json if the run is resumed
                write_text(untrained, json.dumps(results["untrained_test"], indent=1))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except SIGTERMException:
        # Lightning ends a fit stopped by SIGTERM with exit code 0, so the run looks finished.
        # Under SLURM submitit owns the signals and requeues: keep Lightning's exit there.
        if "SLURM_JOB_ID" in os.environ:
            raise
        raise SystemExit(
            f"Run stopped by SIGTERM at epoch {trainer.current_epoch + 1}, not finished: "
            f"restart the same command with hydra.run.dir={out} to resume"
        ) from None
    metric = final_metric(trainer, cfg.get("optimized_metric"))
    results["optimized_metric"] = {cfg.get("optimized_metric"): metric}

    if cfg.get("test"):
        best = best_checkpoint(trainer)
        results["best_checkpoint"] = best
        scores = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        results["test"] = _first(scores)
        if best:  # what evaluation chose on validation (a matching threshold), by name
            # mmap: only this small entry is read, not the weights the test just loaded
            chosen = torch.load(best, map_location="cpu", weights_only=True, mmap=True).get(CHOSEN)
            if chosen:
                results[CHOSEN] = chosen
    finish_loggers(loggers)  # close the W&B run: a sweep's next job starts its own
    if trainer.is_global_zero:
        _write_results(out, results)
    return metric


# The untrained network's test figures, written when scored: results.json, written at the
# end, has them even when the run was stopped and resumed in between.
UNTRAINED = "untrained_test.json"


def final_metric(trainer, name: str | None) -> float | None:
    """The value of `name` the sweeper optimises: the best checkpoint's score when it is the
    monitored metric, else the last logged value."""
    if not name:
        return None
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.monitor == name and ckpt.best_model_score is not None:
        return float(ckpt.best_model_score)
    value = trainer.callback_metrics.get(name)
    if value is None:
        available = sorted(trainer.callback_metrics)
        raise KeyError(f"optimized_metric={name!r} was never logged; logged: {available}")
    return float(value)


def best_checkpoint(trainer) -> str | None:
    """Best checkpoint path to test, or None (test the weights in memory)."""
    ckpt = trainer.checkpoint_callback
    if trainer.fast_dev_run or ckpt is None:
        return None
    return ckpt.best_model_path or None


def _first(outputs: list[dict]) -> dict:
    """The test metrics of `trainer.test` (one dict per loader, each holding all of them)."""
    return {k: float(v) for k, v in (outputs[0] if outputs else {}).items()}


def _write_results(out: Path, results: dict) -> None:
    """`results.json` (atomically) and the closing line: where the run is, what it scored."""
    write_text(out / "results.json", json.dumps(results, indent=1))
    test = results.get("test") or {}
    figures = ", ".join(f"{k}={v:.4f}" for k, v in sorted(test.items())) or "not tested"
    log.info(
        "Run finished: %s | best checkpoint: %s | test: %s",
        out,
        results.get("best_checkpoint") or "none",
        figures,
    )
