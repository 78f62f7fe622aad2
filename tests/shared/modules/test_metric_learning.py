"""The metric-learning module's head covers the training labels only, and its logged accuracy
is the nearest class centre's (plain cosines), checked against a brute-force computation."""

from __future__ import annotations

import torch

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
