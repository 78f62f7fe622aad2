import pytest
import torch
import torch.nn.functional as F

from shared.models.backbone import TimmBackbone
from shared.models.cgd import CGDNet, batch_hard_triplet_loss, cgd_aux_loss


@pytest.fixture(scope="module")
def resnet_cgd() -> CGDNet:
    torch.manual_seed(0)
    return CGDNet("resnet18", descriptors="SMG", embedding_dim=48, num_classes=5).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 64, 64)


def _unit(t: torch.Tensor) -> None:
    torch.testing.assert_close(t.norm(dim=1), torch.ones(t.shape[0]))


def test_descriptor_blocks_and_embedding_are_unit_norm(resnet_cgd, images):
    with torch.no_grad():
        blocks = resnet_cgd.forward_descriptors(images)
        emb = resnet_cgd(images)
        fmap = resnet_cgd.feature_map(images)
    assert resnet_cgd.feature_dim == 512 and fmap.shape == (4, 512, 2, 2)
    assert [b.shape for b in blocks] == [(4, 16)] * 3
    for block in blocks:
        _unit(block)
    assert emb.shape == (4, 48)
    _unit(emb)
    # the blocks are the three descriptors in order: S (mean), M (max), G (p = 3)
    pooled = [fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))]
    pooled.append(fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3))
    for fc, p, block in zip(resnet_cgd.projections, pooled, blocks, strict=True):
        torch.testing.assert_close(F.normalize(p @ fc.weight.t()), block)
    torch.testing.assert_close(emb, torch.cat(blocks, dim=1) / 3**0.5)


def test_aux_logits_on_first_descriptor(resnet_cgd, images):
    with torch.no_grad():
        emb, logits = resnet_cgd.forward_with_aux(images)
        spoc = resnet_cgd.feature_map(images).mean(dim=(2, 3))
        expected = resnet_cgd.aux_head(spoc) / 0.5
    assert logits.shape == (4, 5)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(emb, resnet_cgd(images))


def test_without_num_classes_there_are_no_aux_logits(images):
    net = CGDNet("resnet18", descriptors="S", embedding_dim=8).eval()
    with torch.no_grad():
        emb, logits = net.forward_with_aux(images)
        torch.testing.assert_close(emb, net(images))
    assert logits is None and net.aux_head is None


def test_efficientnet_and_features_only_backbones(images):
    net = CGDNet("efficientnet_b0", descriptors="GM", embedding_dim=32)
    assert net.feature_dim == 1280  # forward_features includes EfficientNet's conv_head
    assert net(images).shape == (4, 32)
    backbone = TimmBackbone("resnet18", features_only=True, out_indices=[4])
    net = CGDNet(backbone, descriptors="G", embedding_dim=8, num_classes=3).train()
    emb, logits = net.forward_with_aux(images)
    assert net.feature_dim == 512 and emb.shape == (4, 8) and logits.shape == (4, 3)
    (emb.sum() + logits.sum()).backward()
    assert backbone.model.conv1.weight.grad.abs().sum() > 0


def test_cgd_errors():
    with pytest.raises(ValueError, match="divisible"):
        CGDNet("resnet18", descriptors="SMG", embedding_dim=100)
    with pytest.raises(ValueError, match="unknown pooler"):
        CGDNet("resnet18", descriptors="SX", embedding_dim=64)


def _brute_force_triplet(emb, labels, margin, distance):
    def d(a, b):
        if distance == "euclidean":
            return torch.sqrt(((a - b) ** 2).sum())
        return 1 - F.cosine_similarity(a, b, dim=0)

    losses = []
    for i in range(len(labels)):
        pos = [d(emb[i], emb[j]) for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg = [d(emb[i], emb[j]) for j in range(len(labels)) if labels[j] != labels[i]]
        if pos and neg:
            losses.append(torch.clamp(max(pos) - min(neg) + margin, min=0))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_batch_hard_triplet_matches_brute_force(distance):
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(10, 6, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 0])  # 2 and 4 have no positive: skipped
    for margin in (0.1, 0.5, 2.0):
        got = batch_hard_triplet_loss(emb, labels, margin=margin, distance=distance)
        expected = _brute_force_triplet(emb, labels, margin, distance)
        torch.testing.assert_close(got, expected)


def test_batch_hard_triplet_edge_cases():
    emb = torch.randn(4, 3, requires_grad=True)
    loss = batch_hard_triplet_loss(emb, torch.tensor([0, 0, 0, 0]))  # no negatives
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(emb.grad, torch.zeros_like(emb))
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)  # d = 0 pairs
    batch_hard_triplet_loss(dup, torch.tensor([0, 0, 1])).backward()
    assert torch.isfinite(dup.grad).all()
    with pytest.raises(ValueError, match="distance"):
        batch_hard_triplet_loss(emb, torch.tensor([0, 1, 0, 1]), distance="l1")


def test_cgd_aux_loss_is_smoothed_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    logp = logits.log_softmax(dim=1)
    nll = -logp[torch.arange(5), labels]
    expected = (0.9 * nll - 0.1 * logp.mean(dim=1)).mean()
    torch.testing.assert_close(cgd_aux_loss(logits, labels), expected)
