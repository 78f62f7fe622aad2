"""Online weighted kNN evaluation (the DINO protocol) with FAISS."""

from __future__ import annotations

import json
from pathlib import Path

from shared.atomic import write_text
from shared.callbacks.embeddings import EmbeddingCallback
from shared.retrieval.knn import knn_accuracy


class KNNCallback(EmbeddingCallback):
    """Top-1 of a weighted kNN vote of the `query` loader's items among the `bank` loader's
    (train, un-augmented).

    Weight exp(sim / T) with T = 0.07 over the k nearest L2-normalised bank features
    (Wu et al. 2018; Caron et al. 2021). Logs `<stage>/knn_top1@k` for each k (capped at the
    bank size, the name kept), `<stage>/search_recall` with a tuned approximate index, and
    keeps a JSON history + PNG curve in the run directory.
    """

    def __init__(
        self,
        ks: tuple[int, ...] = (10, 20, 100, 200),
        temperature: float = 0.07,
        every_n_epochs: int = 1,
        bank_loader: str = "bank",
        query_loader: str = "query",
        device: str = "auto",
        history_dir: str | None = None,
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        target_recall: float | None = 0.99,
    ) -> None:
        super().__init__(every_n_epochs)
        self.ks, self.temperature, self.device = tuple(ks), temperature, device
        # index="ivf"/"hnsw" for banks of millions: approximate, so not the protocol's exact
        # figure; tuned to `target_recall` of the exact top-k (None: IVF at a fixed nprobe).
        self.search = {"index": index, "nlist": nlist, "nprobe": nprobe,
                       "target_recall": target_recall}  # fmt: skip
        self.bank_loader, self.query_loader = bank_loader, query_loader
        self.history_dir = history_dir
        self.history: list[dict] = []
        self.prog = "knn_top1@20"

    def evaluate(self, data, trainer) -> dict[str, float]:
        bank, query = data[self.bank_loader], data[self.query_loader]
        info: dict = {}
        acc = knn_accuracy(
            bank["embeddings"],
            bank["labels"],
            query["embeddings"],
            query["labels"],
            ks=self.ks,
            temperature=self.temperature,
            device=self.device,
            search_info=info,
            **self.search,
        )
        # Names stay those of the config (a monitor needs them); k beyond the bank is capped.
        n_bank = len(bank["labels"])
        metrics = {f"knn_top1@{k}": acc[min(k, n_bank)] for k in self.ks}
        if info:  # a tuned approximate search: the recall of the exact top-k it reached
            metrics["search_recall"] = info["recall"]
        validating = not (trainer.sanity_checking or trainer.testing)
        if validating and trainer.is_global_zero and self.history_dir:
            self.history.append(
                {"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics}
            )
            self._write_history(Path(self.history_dir))
        return metrics

    def _write_history(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "knn_history.json", json.dumps(self.history, indent=1))
        from shared.plots import plot_curves

        plot_curves(
            self.history,
            x="epoch",
            keys=[k for k in self.history[-1] if "@" in k],
            path=out / "knn_curve.png",
            ylabel="kNN top-1",
        )

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state_dict):
        if not (self.restoring_for_test and self.history):
            self.history = list(state_dict.get("history", []))
