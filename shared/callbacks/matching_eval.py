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
from shared.retrieval.text import (
    TitleEmbedder,
    embedder_from_state,
    has_title,
    title_embedder,
    titles_by_id,
)
from shared.retrieval.threshold import image_neighbours, threshold_sweep
from shared.run_loading import CHOSEN

# Where the callback state keeps the title embedder (infer reads it): the TF-IDF fitted on the
# training titles, or an encoder's folder and hash. Runs made before encoders: LEGACY_KEY.
EMBEDDER_KEY = "title_embedder"
LEGACY_KEY = "title_tfidf"


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
        # None: images only. Else titles join them (`shared.retrieval.combine`), embedded by
        # TF-IDF (encoder None) or the local model folder `encoder` names.
        text = dict(text) if text is not None else None
        self.encoder_path = text.pop("encoder", None) if text is not None else None
        self.text = None if text is None else TextCombination(**text)
        self.embedder: TitleEmbedder | None = None
        self.embedder_state: dict | None = None  # a checkpoint's, built at its first use
        self._fold_vectors: tuple | None = None  # (rows, vectors, titled) of the last fold
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
            text, titled = self._fold_text(trainer, fold["index"].numpy())
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

    def _fold_text(self, trainer, rows: np.ndarray):
        """Title vectors and has-title flags of store `rows`; the embedder is made once (a
        TF-IDF fitted on the training rows' titles; an encoder on the module's device)."""
        datamodule = trainer.datamodule
        titles = titles_by_id(datamodule.source, datamodule.store.ids)
        if titles is None:
            raise ValueError(
                "callbacks.matching_eval.text is set but the postings have no `title` column"
            )
        if self._fold_vectors is not None and np.array_equal(self._fold_vectors[0], rows):
            return self._fold_vectors[1:]  # the same fold, every epoch: embedded once
        if self.embedder is None:
            module = getattr(trainer, "lightning_module", None)
            device = module.device if module is not None else "cpu"
            if self.embedder_state is not None:
                self.embedder = embedder_from_state(self.embedder_state, device)
            else:
                train = [titles[i] for i in datamodule.train_indices]
                self.embedder = title_embedder(self.encoder_path, train, device)
        fold = [titles[i] for i in rows]
        self._fold_vectors = (rows.copy(), self.embedder.transform(fold), has_title(fold))
        return self._fold_vectors[1:]

    def _embedder_state(self) -> dict | None:
        return self.embedder.state_dict() if self.embedder is not None else self.embedder_state

    def chosen(self) -> dict:
        """What inference needs, by name: the image threshold, and with titles the mode,
        its thresholds (the title embedder sits in the callback state, `EMBEDDER_KEY`)."""
        out = {"threshold": self.threshold}
        titles = self.text is not None and self.chosen_text is not None
        if titles and self._embedder_state() is not None:
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
        if self._embedder_state() is not None:
            state[EMBEDDER_KEY] = self._embedder_state()
        return state

    def load_state_dict(self, state_dict):
        self.threshold = state_dict.get("threshold")
        text = state_dict.get("text")
        if text is not None:
            self.chosen_text = {k: text[k] for k in ("threshold", "text_threshold", "text_only")}
        self.embedder_state = state_dict.get(EMBEDDER_KEY, state_dict.get(LEGACY_KEY))
        self.embedder, self._fold_vectors = None, None
        if not (self.restoring_for_test and self.history):
            self.history = list(state_dict.get("history", []))
