"""Online linear probe: a linear head on detached features, trained alongside the run.

As solo-learn's online linear evaluation: a cheap, running estimate of the linear probe
(`python -m shared.linear_probe` is the offline protocol). It reads nothing but
`module.embed`, so it can never change the network's training.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shared.callbacks.embeddings import EmbeddingCallback
from shared.data.sources import UNLABELLED


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """`module.eval()` inside, each submodule's own mode restored after: batch norm must not
    update its running statistics from the probe's forward passes."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class OnlineProbeCallback(EmbeddingCallback):
    """After each train step, one SGD step of a linear head on `embed(images)` of that batch
    (the un-augmented images, eval mode, no gradient to the network); logs
    `train/probe_loss`, `train/probe_acc`, and `<stage>/probe_top1` on the query loader.

    Under DDP the head's gradients are averaged over ranks, so every rank holds the same head.
    Its weights and optimiser state are part of the checkpoint (a resume continues them).
    """

    def __init__(
        self,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        loader: str = "query",
        every_n_epochs: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.loader, self.seed = loader, seed
        self.head: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        names = tuple(getattr(trainer.datamodule, "VAL_LOADERS", ()))
        if self.loader not in names:
            raise ValueError(
                f"callbacks.online_probe.loader={self.loader!r}: the data module's evaluation "
                f"loaders are {names}; the probe scores classes seen in training, so it needs "
                "the kNN protocol's 'query' loader (the ssl pipeline, split_by=instance)"
            )

    def _build(self, dim: int, num_classes: int, device) -> None:
        self.head = nn.Linear(dim, num_classes)
        gen = torch.Generator().manual_seed(self.seed)  # the same head on every rank
        nn.init.normal_(self.head.weight, std=0.01, generator=gen)
        nn.init.zeros_(self.head.bias)
        self.head.to(device)
        self.optimizer = torch.optim.SGD(
            self.head.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        if self._pending is not None:  # restored before the head existed
            self.head.load_state_dict(self._pending["head"])
            self.optimizer.load_state_dict(self._pending["optimizer"])
            self._pending = None

    def features(self, trainer, pl_module, batch) -> torch.Tensor:
        """`embed` of the batch's uint8 images (the store's evaluation squares when the loader
        sent views or whole images padded into a batch)."""
        images = batch.get("images")
        if images is None or "sizes" in batch:
            rows = batch["index"].cpu()
            images = trainer.datamodule.store.images[rows].to(pl_module.device)
        with eval_mode(pl_module), torch.no_grad():
            return pl_module.embed(images).detach().float()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x = self.features(trainer, pl_module, batch)
        y = batch["labels"].to(x.device)
        if self.head is None:
            self._build(x.shape[1], trainer.datamodule.num_classes, x.device)
        labelled = y != UNLABELLED
        n = max(1, int(labelled.sum()))  # a batch of unlabelled rows only: zero gradients
        with torch.enable_grad():
            logits = self.head(x)
            loss = F.cross_entropy(logits, y, ignore_index=UNLABELLED, reduction="sum") / n
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if dist.is_available() and dist.is_initialized():
            for p in self.head.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        self.optimizer.step()
        acc = (logits.detach().argmax(1) == y).sum() / n
        pl_module.log_dict(
            {"train/probe_loss": loss.detach(), "train/probe_acc": acc},
            on_step=True,
            on_epoch=False,
            batch_size=len(y),
        )

    @torch.no_grad()
    def evaluate(self, data, trainer) -> dict[str, float]:
        if self.head is None and self._pending is not None:  # a test of a restored run
            classes, dim = self._pending["head"]["weight"].shape
            self._build(dim, classes, trainer.strategy.root_device)
        if self.head is None or self.loader not in data:
            return {}
        query = data[self.loader]
        x = query["embeddings"].to(self.head.weight.device)
        hits = self.head(x).argmax(1).cpu() == query["labels"]
        return {"probe_top1": float(hits.float().mean())}

    def state_dict(self):
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        if not state_dict:
            return
        if self.head is None:
            self._pending = state_dict
        else:
            self.head.load_state_dict(state_dict["head"])
            self.optimizer.load_state_dict(state_dict["optimizer"])
