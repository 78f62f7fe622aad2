"""Supervised metric learning: an embedding net (`shared.models.registry`) + an ArcFace head.

Used by both pipelines: `module=cgd|dolg` in ssl/, and the product-matching model.
Everything is built from plain values, so a checkpoint rebuilds the module on its own.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from shared.data.augment import EvalTransform, TrainTransform
from shared.models.backbone import both_inits_error, init_from_run
from shared.models.cgd import batch_hard_triplet_loss, cgd_aux_loss
from shared.models.margin_heads import ArcFaceHead
from shared.models.registry import build_embedding_net
from shared.modules.base import EmbeddingModule
from shared.schedules import warmup_cosine

log = logging.getLogger(__name__)


class MetricLearningModule(EmbeddingModule):
    """Embedding net + ArcFace / Sub-center ArcFace head (+ the net's auxiliary classification
    loss, where it has an auxiliary classifier, and a batch-hard triplet loss).

    The head (and CGD's auxiliary classifier) has one class per label of the training
    split only, `train_labels` (store labels, in head order): validation and test groups of
    a group-disjoint split never get class weights. `num_classes`, `train_labels` and
    `class_counts` (for dynamic margins) are read from the data module at `setup` when not
    given, then saved as hyper-parameters so the checkpoint is complete.
    """

    lr_key = "lr"
    resume_sensitive = frozenset({"backbone", "model", "head", "num_classes", "train_labels"})
    embed_backbone = "net.backbone"

    def __init__(
        self,
        model: dict,
        backbone: dict,
        head: dict,
        num_classes: int | None = None,
        class_counts: list[int] | None = None,
        train_labels: list[int] | None = None,
        dynamic_margins: bool = False,
        lr: float = 1e-3,
        backbone_lr_mult: float = 1.0,
        layer_decay: float | None = None,
        head_warmup_epochs: int = 0,
        head_lr_mult: float = 10.0,
        weight_decay: float = 1e-4,
        warmup_epochs: int = 1,
        min_lr_ratio: float = 0.01,
        aux_weight: float = 0.0,
        aux_label_smoothing: float = 0.1,
        triplet_weight: float = 0.0,
        triplet_margin: float = 0.1,
        train_transform: dict | None = None,
        eval_size: int | None = None,
    ) -> None:
        super().__init__()
        if backbone.get("init_from_run") and backbone.get("pretrained_path"):
            raise ValueError(both_inits_error(backbone))
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"module.layer_decay must be in (0, 1] or null, got {layer_decay}")
        if head_warmup_epochs < 0:
            raise ValueError(f"module.head_warmup_epochs must be >= 0, got {head_warmup_epochs}")
        self.save_hyperparameters()
        self._backbone_initialised = False
        self.net = None
        self.head = None
        self.train_transform = TrainTransform(**(train_transform or {"size": 64}))
        self.eval_transform = EvalTransform(eval_size)
        if num_classes is not None:
            self._build(num_classes, class_counts)

    def _build(self, num_classes: int, class_counts: list[int] | None) -> None:
        hp = self.hparams
        # store label -> head class; -1 for labels the head has no class for
        labels = hp.train_labels if hp.train_labels is not None else range(num_classes)
        lookup = torch.full((max(labels, default=-1) + 1,), -1, dtype=torch.int64)
        lookup[torch.as_tensor(list(labels), dtype=torch.int64)] = torch.arange(num_classes)
        self.register_buffer("head_class", lookup, persistent=False)
        self.net = build_embedding_net(hp.model, hp.backbone, num_classes)
        dim = self.net.embedding_dim
        counts = class_counts if hp.dynamic_margins else None
        self.head = ArcFaceHead(dim, num_classes, class_counts=counts, **hp.head)

    def setup(self, stage: str) -> None:
        if self.net is None:
            self._build_from_data()
        self._init_backbone_from_run()

    def _init_backbone_from_run(self) -> None:
        """`backbone.init_from_run` once, at the first stage (the baseline evaluation included);
        never when a checkpoint (a resume, a loaded run) provides the weights."""
        run_dir = self.hparams.backbone.get("init_from_run")
        if not run_dir or self._backbone_initialised or self.trainer.ckpt_path:
            return
        init_from_run(self.net.backbone, self.hparams.backbone)
        self._backbone_initialised = True

    def _build_from_data(self) -> None:
        dm = self.trainer.datamodule
        dm.require_labelled_train("metric learning")
        all_counts = dm.train_class_counts()  # per store label
        train_labels = [c for c, n in enumerate(all_counts) if n > 0]
        counts = [all_counts[c] for c in train_labels]
        singletons = sum(1 for c in counts if c == 1)
        if singletons:
            log.warning(
                "%d of %d classes have a single training image: ArcFace can still learn a "
                "class centre from one image, but it gets no positive pair to pull together; "
                "they remain useful as gallery items at evaluation.",
                singletons,
                len(counts),
            )
        self.hparams.num_classes = len(train_labels)
        self.hparams.train_labels = train_labels
        self.hparams.class_counts = counts if self.hparams.dynamic_margins else None
        self._build(len(train_labels), counts)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(self.eval_transform(images)).float(), dim=-1)

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        x = self.train_transform(batch["images"], sizes=batch.get("sizes"))
        labels = self.head_class[batch["labels"]]
        if (labels < 0).any():
            raise ValueError("a training batch holds a label outside module.train_labels")
        self.head.set_step(self.global_step)
        logs = {}
        # the auxiliary classifier runs only when its loss counts (DDP needs every used
        # parameter in the loss); a net without one returns None logits
        embedding, aux_logits = (
            self.net.forward_with_aux(x) if hp.aux_weight else (self.net(x), None)
        )
        arc, logits = self.head(embedding, labels)
        loss = arc
        if aux_logits is not None:
            aux = cgd_aux_loss(aux_logits.float(), labels, hp.aux_label_smoothing)
            loss = arc + hp.aux_weight * aux
            logs["train/aux_loss"] = aux
        logs["train/arcface_loss"] = arc
        if hp.triplet_weight:
            trip = batch_hard_triplet_loss(
                F.normalize(embedding.float(), dim=-1), labels, hp.triplet_margin
            )
            loss = loss + hp.triplet_weight * trip
            logs["train/triplet_loss"] = trip
        logs["train/loss"] = loss
        # on the plain cosines: the margin-penalised logits would under-read it (even below
        # chance), since the target logit is lowered by the margin the loss trains against
        with torch.no_grad():
            cosine = self.head.cosine(embedding.detach().float())
        logs["train/acc"] = (cosine.argmax(1) == labels).float().mean()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(labels))
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=len(labels))
        return loss

    def backbone_param_groups(self) -> list[dict]:
        """The backbone's parameter groups: one at `lr x backbone_lr_mult`, or with
        `layer_decay` one per depth (timm's coarse groups: a ResNet's stem, layer1..layer4; a
        ViT's stem, blocks), the deepest at that lr and each shallower one x layer_decay more:
        early, generic features move least (BEiT, Bao et al. 2021; ELECTRA's layer decay)."""
        hp = self.hparams
        lr = hp.lr * hp.backbone_lr_mult
        if hp.layer_decay is None:
            return [{"params": list(self.net.backbone.parameters()), "lr": lr}]
        depths = self.net.backbone.depth_groups()
        return [
            {"params": params, "lr": lr * hp.layer_decay ** (len(depths) - 1 - i)}
            for i, params in enumerate(depths)
        ]

    def configure_optimizers(self):
        hp = self.hparams
        backbone = self.backbone_param_groups()
        ids = {id(p) for g in backbone for p in g["params"]}
        neck = [p for p in self.net.parameters() if id(p) not in ids]
        groups = [
            *backbone,
            {"params": neck, "lr": hp.lr},
            {"params": self.head.parameters(), "lr": hp.lr * hp.head_lr_mult},
        ]
        opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        if hp.head_warmup_epochs and hp.head_warmup_epochs >= epochs:
            raise ValueError(
                f"module.head_warmup_epochs={hp.head_warmup_epochs} leaves no epoch of the "
                f"trainer.max_epochs={epochs} to train the backbone"
            )
        warmup = min(total - 1, hp.warmup_epochs * total // epochs)
        frozen = hp.head_warmup_epochs * total // epochs
        factors = [WarmupCosine(warmup, total, hp.min_lr_ratio, frozen)] * len(backbone)
        factors += [WarmupCosine(warmup, total, hp.min_lr_ratio)] * 2
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class WarmupCosine:
    """lr factor: `shared.schedules.warmup_cosine` from 1/warmup up to 1, then down to
    `min_ratio`; 0 for the first `frozen` steps (the backbone during the head-only warm-up:
    AdamW with lr 0 leaves a weight exactly as it is, weight decay included, and unlike
    requires_grad=False it keeps DDP's gradient buckets unchanged). A picklable LambdaLR
    callable: its plain fields go into checkpoints."""

    def __init__(self, warmup: int, total: int, min_ratio: float, frozen: int = 0) -> None:
        self.warmup, self.total, self.min_ratio, self.frozen = warmup, total, min_ratio, frozen

    def __call__(self, step: int) -> float:
        if step < self.frozen:
            return 0.0
        start = 1.0 / max(1, self.warmup)
        return float(warmup_cosine(step, 1.0, self.min_ratio, self.total, self.warmup, start))
