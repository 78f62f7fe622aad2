"""Product-matching evaluation: one kNN search, then every threshold at once (mean row F1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shared.atomic import write_text
from shared.callbacks.embeddings import EmbeddingCallback
from shared.plots import plot_threshold_sweep
from shared.retrieval.metrics import retrieval_metrics
from shared.retrieval.search import knn_search
from shared.retrieval.threshold import neighbourhood_blend, threshold_sweep
from shared.run_loading import CHOSEN


def sweep_embeddings(
    embeddings,
    labels,
    thresholds,
    k: int = 51,
    min2: float | None = None,
    blend_k: int | None = None,
    blend_threshold: float | None = None,
    **search_kwargs,
):
    """Search (k = 51: groups of at most 50 plus the posting itself), optionally blend each
    embedding with its neighbours and search again, then sweep all thresholds.

    `search_kwargs` go to `knn_search` (index="ivf", nlist, nprobe for very large folds)."""
    if len(embeddings) == 0:
        raise ValueError("threshold sweep on an empty validation fold")
    sims, idx = knn_search(embeddings, embeddings, k, **search_kwargs)
    if blend_k:
        embeddings = neighbourhood_blend(
            embeddings, sims, idx, k=blend_k, threshold=blend_threshold
        )
        sims, idx = knn_search(embeddings, embeddings, k, **search_kwargs)
    return threshold_sweep(sims, idx, np.asarray(labels), thresholds, min2=min2), sims, idx


class MatchingEvalCallback(EmbeddingCallback):
    """Validation: the best-threshold F1 / precision / recall, Recall@1 and mAP@R of the
    validation fold. Test: F1 / precision / recall at the threshold chosen on validation
    (never re-chosen on the test fold), Recall@1 and mAP@R.

    Keeps the chosen threshold in its state (saved inside every checkpoint), so testing and
    inference from the best checkpoint use the threshold chosen at that evaluation.
    """

    def __init__(
        self,
        k: int = 51,
        thresholds: tuple[float, float, int] = (0.0, 1.0, 101),
        min2: float | None = None,
        blend_k: int | None = None,
        blend_threshold: float | None = None,
        plot_dir: str | None = None,
        loader: int = 0,
        every_n_epochs: int = 1,
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
    ) -> None:
        super().__init__(every_n_epochs)
        self.search = {"index": index, "nlist": nlist, "nprobe": nprobe}
        start, stop, num = thresholds
        self.thresholds = np.linspace(float(start), float(stop), int(num))
        self.k, self.min2, self.loader = k, min2, loader
        self.blend_k, self.blend_threshold = blend_k, blend_threshold
        self.plot_dir = plot_dir
        self.threshold: float | None = None
        self.history: list[dict] = []
        self.prog = "f1"

    def evaluate(self, data, trainer) -> dict[str, float]:
        fold = data[self.loader]
        emb, labels = fold["embeddings"].numpy(), fold["labels"].numpy()
        testing = trainer.testing
        if testing and self.threshold is None:
            raise RuntimeError(
                "test needs the threshold chosen on validation, and no validation has run "
                "(or the tested checkpoint holds none)"
            )
        thresholds = np.array([self.threshold]) if testing else self.thresholds
        result, _, _ = sweep_embeddings(
            emb, labels, thresholds, self.k, self.min2, self.blend_k, self.blend_threshold,
            **self.search,
        )  # fmt: skip
        b = result.best_index
        metrics = {
            "f1": result.best_f1,
            "threshold": result.best_threshold,
            "precision": float(result.precision[b]),
            "recall": float(result.recall[b]),
        }
        if len(np.unique(labels)) < len(labels):
            metrics.update(retrieval_metrics(emb, labels, ks=(1,)))
        if not (trainer.sanity_checking or testing):
            self.threshold = result.best_threshold
            if trainer.is_global_zero and self.plot_dir:
                self._write(Path(self.plot_dir), result, trainer, metrics)
        return metrics

    def _write(self, out: Path, result, trainer, metrics) -> None:
        out.mkdir(parents=True, exist_ok=True)
        plot_threshold_sweep(result, out / "threshold_sweep.png")
        self.history.append({"epoch": trainer.current_epoch, **metrics})
        state = {"latest": result.to_dict(), "history": self.history}
        write_text(out / "matching_eval.json", json.dumps(state, indent=1, default=float))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """The threshold also under a plain name (`shared.run_loading.CHOSEN`), which
        inference, the service and results.json read."""
        checkpoint.setdefault(CHOSEN, {})["threshold"] = self.threshold

    def state_dict(self):
        return {"threshold": self.threshold, "history": self.history}

    def load_state_dict(self, state_dict):
        self.threshold = state_dict.get("threshold")
        if not (self.restoring_for_test and self.history):
            self.history = list(state_dict.get("history", []))
