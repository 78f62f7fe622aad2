"""What a W&B run gets beyond Lightning's WandbLogger: artifacts, lineage, examples, promotion.

    callbacks=[ssl,wandb_extras] logger=[csv,wandb]        # or add it to any callbacks group

- The best and the last checkpoint as versions of one model artifact `model-<run id>`,
  aliased `best` and `latest`. Each version is laid out like a run directory
  (`.hydra/config.yaml`, `config_resolved.yaml`, `checkpoints/<file>`), so
  `load_run(artifact.download())` rebuilds the module.
- The image store as a dataset artifact (a reference to its folder plus its meta.json), used
  by the run, so W&B draws the lineage data -> run -> model.
- At each evaluation, a `wandb.Table` of retrieval examples: a fixed set of queries, each with
  its top-k neighbours, their similarity and whether they share the query's label.
- Optionally, promotion: when the run's metric passes a bar, the best model is linked to a
  registry collection under an alias (`staging`).

A no-op without a WandbLogger. Offline (the default) everything is written to the offline
run for `wandb sync`, except what W&B can only do online: declaring the dataset as an input
(it is logged as an artifact of the run instead) and linking to a registry (the decision is
logged and written to `promotion.json`; link by hand after syncing, see docs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from shared.callbacks.embeddings import EmbeddingCallback
from shared.tracking.examples import nearest_examples
from shared.tracking.loggers import find_logger
from shared.train import final_metric

log = logging.getLogger(__name__)


class WandbExtrasCallback(EmbeddingCallback):
    def __init__(
        self,
        log_checkpoints: bool = True,
        log_dataset: bool = True,
        examples: int = 16,
        top_k: int = 5,
        every_n_epochs: int = 1,
        query_loader: str | None = None,
        bank_loader: str | None = None,
        seed: int = 0,
        config_file: str | None = None,
        promote: dict | None = None,
    ) -> None:
        super().__init__(every_n_epochs)
        self.log_checkpoints, self.log_dataset = log_checkpoints, log_dataset
        self.examples, self.top_k, self.seed = examples, top_k, seed
        self.query_loader, self.bank_loader = query_loader, bank_loader
        self.config_file = config_file
        self.promote = dict(promote or {})
        self.logged: dict[str, object] = {}  # alias -> logged artifact (for promotion)

    # ---- plumbing -------------------------------------------------------------------------
    @staticmethod
    def _logger(trainer):
        return find_logger(trainer.loggers, "WandbLogger")

    def _run(self, trainer):
        logger = self._logger(trainer)
        return None if logger is None or not trainer.is_global_zero else logger.experiment

    def _due(self, trainer) -> bool:
        return self.examples > 0 and self._logger(trainer) is not None and super()._due(trainer)

    def _loaders(self, names) -> tuple[str, str | None]:
        """(query loader, bank loader or None for a self-search) among the loader `names`."""
        if self.query_loader is not None:
            return self.query_loader, self.bank_loader
        if "query" in names and "bank" in names:
            return "query", "bank"
        return next(iter(names)), None

    # ---- run start: config, dataset --------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        run = self._run(trainer)
        if run is None:
            return
        if self.config_file and Path(self.config_file).is_file():
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(OmegaConf.load(self.config_file))
            run.config.update({"cfg": cfg}, allow_val_change=True)
        if self.log_dataset:
            self._log_dataset(run, trainer)

    def _log_dataset(self, run, trainer) -> None:
        import wandb

        store = getattr(trainer.datamodule, "store", None)
        if store is None:
            log.warning("wandb_extras: the data module has no image store; no dataset artifact")
            return
        meta = {k: v for k, v in store.meta.items() if k not in ("ids", "class_names")}
        artifact = wandb.Artifact(f"store-{store.path.name}", type="dataset", metadata=meta)
        # The folder's name carries the store key (hash of source and size): a reference to
        # it identifies the content without hashing gigabytes of images.
        artifact.add_reference(store.path.resolve().as_uri(), name="store", checksum=False)
        artifact.add_file(str(store.path / "meta.json"), name="meta.json")
        if run.offline:
            run.log_artifact(artifact)
            log.info(
                "wandb_extras: offline, so the store is logged as an artifact of the run; "
                "W&B records it as the run's input (lineage) only online"
            )
        else:
            run.use_artifact(artifact)

    # ---- each evaluation: retrieval examples table ----------------------------------------
    def evaluate(self, data, trainer) -> dict[str, float]:
        if not trainer.is_global_zero:
            return {}
        import wandb

        q, b = self._loaders(data)
        if q not in data or (b is not None and b not in data):
            return {}
        examples = nearest_examples(
            data[q], data[b] if b is not None else None, self.examples, self.top_k, self.seed
        )
        images = trainer.datamodule.store.images
        columns = ["epoch", "query", "label", "top1_right", "hits"]
        for i in range(1, self.top_k + 1):
            columns += [f"n{i}", f"n{i}_sim", f"n{i}_right"]
        table = wandb.Table(columns=columns)
        for ex in examples:
            row = [
                trainer.current_epoch,
                _image(images[ex.query], f"label {ex.label}"),
                ex.label,
                ex.top1_right,
                int(sum(ex.right)),
            ]
            for j in range(self.top_k):
                if j < len(ex.neighbours):
                    mark = "right" if ex.right[j] else "wrong"
                    row += [
                        _image(images[ex.neighbours[j]], f"{ex.sims[j]:.3f} {mark}"),
                        ex.sims[j],
                        ex.right[j],
                    ]
                else:
                    row += [None, None, None]
            table.add_data(*row)
        stage = "test" if trainer.testing else "val"
        self._logger(trainer).log_metrics(
            {f"{stage}/retrieval_examples": table}, step=trainer.global_step
        )
        return {}

    # ---- run end: checkpoints, promotion ---------------------------------------------------
    def on_fit_end(self, trainer, pl_module) -> None:
        run = self._run(trainer)
        if run is None or not self.log_checkpoints:
            return
        root = Path(trainer.default_root_dir)
        best_cb, best, latest = checkpoints(trainer)
        if best is not None:
            score = None if best_cb.best_model_score is None else float(best_cb.best_model_score)
            self.logged["best"] = self._log_model(
                run, best, root, "best", {"score": score, "monitor": best_cb.monitor}
            )
        if latest is not None:
            self.logged["latest"] = self._log_model(
                run,
                latest,
                root,
                "latest",
                {"epoch": trainer.current_epoch, "global_step": trainer.global_step},
            )
        if self.promote.get("registry"):
            self._promote(run, trainer, root)

    def _log_model(self, run, path: Path, root: Path, alias: str, meta: dict):
        import wandb

        artifact = wandb.Artifact(
            f"model-{run.id}", type="model", metadata={**meta, "checkpoint": path.name}
        )
        artifact.add_file(str(path), name=f"checkpoints/{path.name}")
        for name in (".hydra/config.yaml", "config_resolved.yaml"):
            if (root / name).is_file():
                artifact.add_file(str(root / name), name=name)
        return run.log_artifact(artifact, aliases=[alias])

    def _promote(self, run, trainer, root: Path) -> None:
        """Link the best model to `promote.registry` under `promote.alias` when the metric
        passes `promote.min_value` (`mode` max) or stays under it (`mode` min)."""
        p = self.promote
        name, bar, mode = p.get("metric"), p.get("min_value"), p.get("mode", "max")
        try:
            value = final_metric(trainer, name)
        except KeyError as exc:
            value = None
            log.warning("wandb_extras: no promotion, %s", exc)
        passes = value is not None and (
            bar is None or (value >= bar if mode == "max" else value <= bar)
        )
        artifact = self.logged.get("best")
        decision = {
            "metric": name,
            "value": value,
            "bar": bar,
            "mode": mode,
            "registry": p["registry"],
            "alias": p.get("alias", "staging"),
            "artifact": f"model-{run.id}",
            "passes": passes,
        }
        if not passes or artifact is None:
            decision["action"] = "skipped" if artifact is not None else "skipped: no best model"
        elif run.offline:
            # W&B cannot link offline (and link_artifact would log the artifact twice).
            decision["action"] = "pending: offline run; link after `wandb sync`"
        else:
            run.link_artifact(artifact, p["registry"], aliases=[decision["alias"]])
            decision["action"] = "linked"
        log.info(
            "wandb_extras: promotion of %s to %s:%s (%s = %s, bar %s): %s",
            decision["artifact"],
            decision["registry"],
            decision["alias"],
            name,
            value,
            bar,
            decision["action"],
        )
        run.summary["promotion"] = decision
        (root / "promotion.json").write_text(json.dumps(decision, indent=1))


def _image(chw, caption: str):
    import wandb

    return wandb.Image(np.ascontiguousarray(np.asarray(chw).transpose(1, 2, 0)), caption=caption)


def checkpoints(trainer) -> tuple[object, Path | None, Path | None]:
    """(the monitoring ModelCheckpoint, its best file, the newest file of any of them).

    The latest state may come from the monitoring callback's `save_last` or from a second
    ModelCheckpoint without a monitor (conf/callbacks/model_checkpoint.yaml's last.ckpt).
    """
    callbacks = list(getattr(trainer, "checkpoint_callbacks", []))
    best_cb = next((cb for cb in callbacks if cb.monitor), None)
    best = Path(best_cb.best_model_path) if best_cb and best_cb.best_model_path else None
    found = [
        Path(p)
        for cb in callbacks
        for p in (cb.last_model_path, None if cb.monitor else cb.best_model_path)
        if p
    ]
    found = [p for p in found if p.is_file()]
    latest = max(found, key=lambda p: p.stat().st_mtime_ns) if found else None
    return best_cb, best if best is not None and best.is_file() else None, latest
