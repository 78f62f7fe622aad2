"""Product-matching evaluation: one kNN search, then every threshold at once (mean row F1)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from shared.atomic import write_text
from shared.callbacks.embeddings import EmbeddingCallback
from shared.plots import plot_threshold_sweep
from shared.retrieval.combine import TextCombination, text_matching
from shared.retrieval.metrics import retrieval_metrics
from shared.retrieval.text import TitleTfidf, has_title, titles_by_id
from shared.retrieval.threshold import image_neighbours, threshold_sweep
from shared.run_loading import CHOSEN

# Where the callback state keeps the TF-IDF fitted on the training titles (infer reads it).
TFIDF_KEY = "title_tfidf"


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
        loader: str = "fold",
        every_n_epochs: int = 1,
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        target_recall: float | None = 0.99,
        text: dict | None = None,
    ) -> None:
        super().__init__(every_n_epochs)
        # None: images only. Else titles join them (`shared.retrieval.combine`).
        self.text = None if text is None else TextCombination(**text)
        self.encoder: TitleTfidf | None = None
        self.chosen_text: dict | None = None
        self.search = {"index": index, "nlist": nlist, "nprobe": nprobe,
                       "target_recall": target_recall}  # fmt: skip
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
        info: dict = {}
        searched, sims, idx = image_neighbours(
            emb, self.k, self.blend_k, self.blend_threshold, info, **self.search
        )
        result = threshold_sweep(sims, idx, labels, thresholds, min2=self.min2)
        b = result.best_index
        metrics = {
            "f1": result.best_f1,
            "threshold": result.best_threshold,
            "precision": float(result.precision[b]),
            "recall": float(result.recall[b]),
        }
        picked = None
        if self.text is not None:
            if testing and self.chosen_text is None:
                raise RuntimeError("test needs the title thresholds chosen on validation")
            text, titled = self._fold_text(trainer.datamodule, fold["index"].numpy())
            text_metrics, picked = text_matching(
                searched, sims, idx, text, titled, labels, self.text, self.thresholds, self.k,
                self.chosen_text if testing else None, self.min2,
            )  # fmt: skip
            metrics = {"f1_image": result.best_f1, "threshold_image": result.best_threshold,
                       **text_metrics}  # fmt: skip
        if len(np.unique(labels)) < len(labels):
            metrics.update(retrieval_metrics(emb, labels, ks=(1,)))
        if info:  # a tuned approximate search: the recall of the exact top-k it reached
            metrics["search_recall"] = info["recall"]
        if not (trainer.sanity_checking or testing):
            self.threshold = result.best_threshold
            self.chosen_text = picked
            if trainer.is_global_zero and self.plot_dir:
                self._write(Path(self.plot_dir), result, trainer, metrics)
        return metrics

    def _fold_text(self, datamodule, rows: np.ndarray):
        """TF-IDF rows and has-title flags of store `rows`; the vectoriser is fitted once, on
        the training rows' titles."""
        titles = titles_by_id(datamodule.source, datamodule.store.ids)
        if titles is None:
            raise ValueError(
                "callbacks.matching_eval.text is set but the postings have no `title` column"
            )
        if self.encoder is None:
            self.encoder = TitleTfidf().fit([titles[i] for i in datamodule.train_indices])
        fold = [titles[i] for i in rows]
        return self.encoder.transform(fold), has_title(fold)

    def chosen(self) -> dict:
        """What inference needs, by name: the image threshold, and with titles the mode,
        its thresholds (the fitted TF-IDF sits in the callback state, `TFIDF_KEY`)."""
        out = {"threshold": self.threshold}
        if self.text is not None and self.chosen_text is not None and self.encoder is not None:
            out["text"] = {**asdict(self.text), **self.chosen_text}
        return out

    def _write(self, out: Path, result, trainer, metrics) -> None:
        out.mkdir(parents=True, exist_ok=True)
        plot_threshold_sweep(result, out / "threshold_sweep.png")
        self.history.append({"epoch": trainer.current_epoch, **metrics})
        state = {"latest": result.to_dict(), "history": self.history}
        write_text(out / "matching_eval.json", json.dumps(state, indent=1, default=float))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """The threshold also under a plain name (`shared.run_loading.CHOSEN`), which
        inference, the service and results.json read."""
        checkpoint.setdefault(CHOSEN, {}).update(self.chosen())

    def state_dict(self):
        state = {**self.chosen(), "history": self.history}
        if self.encoder is not None:
            state[TFIDF_KEY] = self.encoder.state_dict()
        return state

    def load_state_dict(self, state_dict):
        self.threshold = state_dict.get("threshold")
        text = state_dict.get("text")
        if text is not None:
            self.chosen_text = {k: text[k] for k in ("threshold", "text_threshold", "text_only")}
        if state_dict.get(TFIDF_KEY) is not None:
            self.encoder = TitleTfidf.from_state(state_dict[TFIDF_KEY])
        if not (self.restoring_for_test and self.history):
            self.history = list(state_dict.get("history", []))
