"""ArcFaceHead against pytorch-metric-learning's ArcFaceLoss / SubCenterArcFaceLoss."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss, SubCenterArcFaceLoss

from shared.models.margin_heads import ArcFaceHead, arcface_logits, dynamic_margins

E, C, B = 16, 7, 12


def _pair(margin_deg, scale, subcenters=1, seed=0):
    """Our head and PML's loss with the same class weights (PML's W is our weight transposed)."""
    torch.manual_seed(seed)
    head = ArcFaceHead(E, C, scale=scale, margin=math.radians(margin_deg), subcenters=subcenters)
    head = head.double()
    if subcenters == 1:
        ref = ArcFaceLoss(num_classes=C, embedding_size=E, margin=margin_deg, scale=scale)
    else:
        ref = SubCenterArcFaceLoss(
            num_classes=C, embedding_size=E, margin=margin_deg, scale=scale, sub_centers=subcenters
        )
    # both class-major: our row c*k + j and PML's column c*k + j are sub-centre j of class c
    ref.W = torch.nn.Parameter(head.weight.detach().t().clone())
    return head, ref


def _compare(head, ref, emb, labels):
    emb_a = emb.clone().requires_grad_(True)
    emb_b = emb.clone().requires_grad_(True)
    loss, _ = head(emb_a, labels)
    loss_ref = ref(emb_b, labels)
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(emb_a.grad, emb_b.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, ref.W.grad.t(), rtol=1e-8, atol=1e-12)


def _target_cos(head, emb, labels):
    return head.cosine(emb).gather(1, labels[:, None]).squeeze(1)


@pytest.mark.parametrize("margin_deg", [0.0, 10.0, 28.6, 57.3])
@pytest.mark.parametrize("subcenters", [1, 3])
def test_matches_pml_random(margin_deg, subcenters):
    head, ref = _pair(margin_deg, scale=30.0, subcenters=subcenters)
    emb = torch.randn(B, E, dtype=torch.float64)
    labels = torch.randint(0, C, (B,))
    _compare(head, ref, emb, labels)


@pytest.mark.parametrize("subcenters", [1, 3])
def test_matches_pml_past_the_boundary(subcenters):
    """Embeddings near the negated class weight: theta + m > pi for some samples, not others."""
    margin_deg = 70.0
    head, ref = _pair(margin_deg, scale=16.0, subcenters=subcenters, seed=1)
    labels = torch.arange(B) % C
    # opposite every sub-centre of the class, so that even the nearest one is far
    centres = F.normalize(head.weight.detach(), dim=1).view(C, subcenters, E).sum(dim=1)
    emb = torch.randn(B, E, dtype=torch.float64)
    emb[: B // 2] = -centres[labels[: B // 2]] * 4.0 + 0.3 * emb[: B // 2]
    cos = _target_cos(head, emb, labels)
    past = cos < math.cos(math.pi - math.radians(margin_deg))
    assert past.any() and (~past).any()
    _compare(head, ref, emb, labels)


def test_boundary_and_easy_margin_direct_formula():
    m, s = 0.5, 10.0
    cos = torch.tensor([[0.9, 0.1], [0.2, 0.0], [-0.5, 0.0], [-0.95, 0.3], [-0.999, 0.0]])
    labels = torch.zeros(5, dtype=torch.long)
    theta = torch.acos(cos[:, 0])
    hard = torch.where(theta + m <= math.pi, torch.cos(theta + m), cos[:, 0] - m * math.sin(m))
    easy = torch.where(cos[:, 0] > 0, torch.cos(theta + m), cos[:, 0])
    for flag, expected in [(False, hard), (True, easy)]:
        logits = arcface_logits(cos, labels, m, s, easy_margin=flag)
        torch.testing.assert_close(logits[:, 0], s * expected)
        torch.testing.assert_close(logits[:, 1], s * cos[:, 1])
    assert (theta + m > math.pi).sum() == 2  # the boundary branch is exercised


def test_per_sample_margin_tensor():
    torch.manual_seed(0)
    cos = torch.rand(6, 4) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    margins = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.0])
    out = arcface_logits(cos, labels, margins, 30.0)
    for i in range(6):
        row = arcface_logits(cos[i : i + 1], labels[i : i + 1], float(margins[i]), 30.0)
        torch.testing.assert_close(out[i : i + 1], row)


@pytest.mark.parametrize("easy_margin", [False, True])
def test_no_nan_gradient_at_exact_unit_cosine(easy_margin):
    cos = torch.tensor([[1.0, 0.2], [-1.0, 0.3], [0.3, 1.0]], requires_grad=True)
    logits = arcface_logits(cos, torch.tensor([0, 0, 1]), 0.5, 1.0, easy_margin=easy_margin)
    F.cross_entropy(logits, torch.tensor([0, 0, 1])).backward()
    assert torch.isfinite(logits).all() and torch.isfinite(cos.grad).all()


@pytest.mark.parametrize("subcenters", [1, 3])
def test_no_nan_gradient_at_unit_cosine(subcenters):
    torch.manual_seed(0)
    head = ArcFaceHead(E, C, subcenters=subcenters, margin=0.5)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():  # cos = -1 to a class needs all its sub-centres equal
        weight = head.weight.view(C, subcenters, E)
        weight[2:4] = weight[2:4, :1]
    rows = head.weight.detach()[labels * subcenters]
    emb = torch.cat([rows[:2], -rows[2:]]).clone().requires_grad_(True)  # cos = +1 and -1
    cos = _target_cos(head, emb.detach(), labels)
    torch.testing.assert_close(cos.abs(), torch.ones(4))
    loss, _ = head(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_subcenter_layout_is_class_major():
    torch.manual_seed(0)
    k = 3
    head = ArcFaceHead(E, C, subcenters=k)
    emb = head.weight.detach()[[2 * k + 1, 5 * k + 2]].clone()  # sub-centre 1 of class 2, ...
    cos = head.cosine(emb)
    torch.testing.assert_close(cos[[0, 1], [2, 5]], torch.ones(2))
    full = F.normalize(emb) @ F.normalize(head.weight.detach()).t()
    torch.testing.assert_close(cos, full.view(2, C, k).amax(dim=2))


def test_dynamic_margins():
    counts = [1, 2, 5, 10, 100, 1000]
    m = dynamic_margins(counts)
    assert m.dtype == torch.float32 and m.shape == (6,)
    assert m[0].item() == pytest.approx(0.5) and m[-1].item() == pytest.approx(0.05)
    assert torch.all(m[1:] < m[:-1])
    x = [n**-0.25 for n in counts]
    expected = [0.45 * (v - min(x)) / (max(x) - min(x)) + 0.05 for v in x]
    torch.testing.assert_close(m, torch.tensor(expected))
    torch.testing.assert_close(dynamic_margins([4, 4]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=">= 1"):
        dynamic_margins([0, 3])


def test_head_uses_dynamic_margins_per_sample():
    counts = [3, 50, 7, 1, 20, 9, 100]
    head = ArcFaceHead(E, C, margin=0.5, class_counts=counts)
    assert "class_margins" in head.state_dict()
    labels = torch.tensor([0, 3, 6, 3])
    torch.testing.assert_close(head.sample_margins(labels), dynamic_margins(counts)[labels])
    emb = torch.randn(4, E)
    loss, logits = head(emb, labels)
    expected = arcface_logits(head.cosine(emb), labels, dynamic_margins(counts)[labels], 30.0)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(loss, F.cross_entropy(expected, labels))


def test_margin_warmup_schedule():
    head = ArcFaceHead(E, C, margin=0.4, margin_warmup_steps=100)
    labels = torch.tensor([1, 2])
    for step, expected in [(0, 0.0), (25, 0.1), (50, 0.2), (100, 0.4), (1000, 0.4)]:
        head.set_step(step)
        torch.testing.assert_close(head.sample_margins(labels), torch.full((2,), expected))
    head.set_step(0)
    emb = torch.randn(2, E)
    loss, logits = head(emb, labels)  # no margin yet: plain scaled-cosine softmax
    torch.testing.assert_close(logits, 30.0 * head.cosine(emb))
    assert head.state_dict()["step"].item() == 0
    assert ArcFaceHead(E, C, margin=0.4).sample_margins(labels).tolist() == pytest.approx([0.4] * 2)


def test_fp32_under_autocast():
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, E)
    head = ArcFaceHead(E, C, subcenters=2)
    x = torch.randn(B, 8)
    labels = torch.randint(0, C, (B,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = proj(x)
        loss, logits = head(emb, labels)
        cos = head.cosine(emb)
    assert emb.dtype == torch.bfloat16
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert cos.dtype == torch.float32
    loss_ref, logits_ref = head(emb.float(), labels)
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=0)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)


def test_label_smoothing_passed_to_cross_entropy():
    head = ArcFaceHead(E, C, label_smoothing=0.1)
    emb, labels = torch.randn(4, E), torch.tensor([0, 1, 2, 3])
    loss, logits = head(emb, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_errors():
    with pytest.raises(ValueError, match="num_classes >= 2"):
        ArcFaceHead(E, 1)
    with pytest.raises(ValueError, match="subcenters >= 1"):
        ArcFaceHead(E, C, subcenters=0)
    with pytest.raises(ValueError, match="class_counts has 2 entries"):
        ArcFaceHead(E, C, class_counts=[1, 2])
    head = ArcFaceHead(E, C)
    for bad in ([0, C], [-1, 0]):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\]"):
            head(torch.randn(2, E), torch.tensor(bad))
    with pytest.raises(ValueError, match="integer class ids"):
        head(torch.randn(2, E), torch.tensor([0.0, 1.0]))


def test_init_std_sets_the_class_weight_distribution():
    torch.manual_seed(0)
    default = ArcFaceHead(512, 200).weight.detach()
    bound = 1 / math.sqrt(512)  # nn.Linear's range: uniform, std bound / sqrt(3)
    assert default.abs().max() <= bound
    assert default.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    wide = ArcFaceHead(512, 200, init_std=1.0).weight.detach()
    assert wide.mean().item() == pytest.approx(0.0, abs=0.01)
    assert wide.std().item() == pytest.approx(1.0, rel=0.02)
    with pytest.raises(ValueError, match="init_std > 0 or null"):
        ArcFaceHead(E, C, init_std=0.0)


def test_state_dict_loads_weights_only():
    head = ArcFaceHead(E, C, subcenters=3, class_counts=list(range(1, C + 1)))
    head.set_step(7)
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = ArcFaceHead(E, C, subcenters=3, class_counts=list(range(1, C + 1)))
    fresh.load_state_dict(state)
    assert fresh.step.item() == 7 and torch.equal(fresh.weight, head.weight)


def test_built_by_hydra_from_plain_values():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "_target_": "shared.models.margin_heads.ArcFaceHead",
            "embedding_size": E,
            "num_classes": 3,
            "subcenters": 3,
            "class_counts": [1, 5, 9],
            "margin_warmup_steps": 10,
        }
    )
    head = instantiate(cfg)
    torch.testing.assert_close(head.class_margins, dynamic_margins([1, 5, 9]))
    assert all(isinstance(v, torch.Tensor) for v in head.state_dict().values())
