"""The metric-learning module's head covers the training labels only, its logged accuracy is
the nearest class centre's (plain cosines), checked against a brute-force computation, and its
loss is the ArcFace + auxiliary + triplet formula on the net's own outputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from shared.models.cgd import batch_hard_triplet_loss
from shared.modules.metric_learning import MetricLearningModule


class LogCapture(MetricLearningModule):
    """Keeps what `training_step` logs instead of sending it to a trainer."""

    def log_dict(self, logs, **_):
        self.logged = {
            k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in logs.items()
        }

    def log(self, *_, **__):
        pass


def module(train_labels, margin=0.5):
    torch.manual_seed(0)
    return LogCapture(
        model={"type": "dolg", "local_dim": 16, "global_dim": 16, "embedding_dim": 8},
        backbone={"name": "test_resnet"},
        head={"margin": margin, "scale": 30.0},
        num_classes=len(train_labels),
        train_labels=train_labels,
        train_transform={"size": 32},
    )


def test_store_labels_map_to_head_classes_and_others_are_refused():
    m = module([2, 5, 7])  # store labels 0, 1, 3, 4, 6: validation / test groups
    assert m.head.weight.shape[0] == 3
    assert m.head_class.tolist() == [-1, -1, 0, -1, -1, 1, -1, 2]
    batch = {"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "labels": torch.tensor([2, 3])}
    try:
        m.training_step(batch, 0)
    except ValueError as exc:
        assert "outside module.train_labels" in str(exc)
    else:
        raise AssertionError("a label without a head class was trained")


class FixedEmbeddings(torch.nn.Module):
    """Stands in for the embedding net: returns the given embeddings whatever the images."""

    def __init__(self, embeddings):
        super().__init__()
        self.embeddings = embeddings
        self.embedding_dim = embeddings.shape[1]

    def forward(self, x):
        return self.embeddings.clone().requires_grad_(True)


def test_train_accuracy_is_the_nearest_class_centre_not_the_margin_logits():
    m = module([2, 5, 7], margin=0.5)
    # Class centres e0, e1, e2; each embedding has cosine 0.6 to its own centre and 0.55 to
    # the next one: nearest centre right (accuracy 1), but ArcFace's target logit
    # cos(acos(0.6) + 0.5) = 0.14 falls below 0.55 (accuracy 0 on the logits).
    m.head.weight.data = torch.eye(3, 8).repeat_interleave(m.head.subcenters, 0)
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    emb = torch.zeros(6, 8)
    emb[torch.arange(6), classes] = 0.6
    emb[torch.arange(6), (classes + 1) % 3] = 0.55
    emb[:, 7] = (1 - 0.6**2 - 0.55**2) ** 0.5
    m.net = FixedEmbeddings(emb)
    images = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([2, 5, 7, 2, 5, 7])  # store labels of head classes 0, 1, 2
    m.training_step({"images": images, "labels": labels}, 0)
    _, logits = m.head(emb, classes)
    assert (logits.argmax(1) == classes).float().mean() == 0  # what the old figure read
    assert m.logged["train/acc"] == 1.0


def reference_loss(m, batch):
    """The training loss written out on the net's outputs: ArcFace + w_aux x smoothed CE of
    the auxiliary logits (CGD only) + w_trip x batch-hard triplet of the unit embeddings."""
    labels = m.head_class[batch["labels"]]
    x = m.train_transform(batch["images"])
    embedding, aux_logits = m.net.forward_with_aux(x)
    loss = m.head(embedding, labels)[0]
    if aux_logits is not None:
        smoothed = F.cross_entropy(aux_logits.float(), labels, label_smoothing=0.1)
        loss = loss + 0.5 * smoothed
    triplet = batch_hard_triplet_loss(F.normalize(embedding.float(), dim=-1), labels, 0.1)
    return loss + 2.0 * triplet


@pytest.mark.parametrize("kind", ["cgd", "dolg"])
def test_training_steps_follow_the_loss_formula(kind):
    model = {"type": kind, "embedding_dim": 12}
    model.update({"descriptors": "SMG"} if kind == "cgd" else {"local_dim": 16, "global_dim": 16})
    torch.manual_seed(0)
    m = LogCapture(
        model=model,
        backbone={"name": "test_resnet", "features_only": kind == "dolg"},
        head={"margin": 0.3, "scale": 30.0},
        num_classes=4,
        aux_weight=0.5,  # DOLG has no auxiliary classifier: no aux term, no aux log
        triplet_weight=2.0,
        train_transform={"size": 32},
    )
    ref = copy.deepcopy(m)
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-2) for n in (m, ref)]
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        images = torch.randint(0, 256, (8, 3, 40, 40), generator=gen, dtype=torch.uint8)
        batch = {"images": images, "labels": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])}
        rng = torch.get_rng_state()  # the same random augmentation for both
        losses = [m.training_step(batch, step)]
        torch.set_rng_state(rng)
        losses.append(reference_loss(ref, batch))
        assert torch.equal(losses[0], losses[1]), (step, losses)
        assert ("train/aux_loss" in m.logged) == (kind == "cgd")
        for opt, loss in zip(opts, losses, strict=True):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), b in zip(m.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
