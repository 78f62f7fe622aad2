"""DINO loss, centre and head against a direct formula and against lightly's DINOLoss."""

import math

import pytest
import torch
from lightly.loss import DINOLoss as LightlyDINOLoss

from selfsup.dino import DINOHead, DINOLoss, dino_loss


def direct_dino_loss(student, teacher, center, n_views, s_temp, t_temp):
    """The loop of the official code, written out: every (teacher view, other view) pair."""
    b = teacher.shape[0] // 2
    q = torch.softmax((teacher - center) / t_temp, dim=-1).chunk(2)
    s = (student / s_temp).chunk(n_views)
    total, terms = 0.0, 0
    for iq, qv in enumerate(q):
        for v in range(n_views):
            if v == iq:
                continue
            total = total + torch.sum(-qv * torch.log_softmax(s[v], dim=-1), dim=-1).mean()
            terms += 1
    assert b > 0
    return total / terms


@pytest.mark.parametrize("n_views", [2, 4, 6])
def test_loss_matches_direct_formula(n_views):
    g = torch.Generator().manual_seed(n_views)
    b, k = 5, 32
    student = torch.randn(n_views * b, k, generator=g)
    teacher = torch.randn(2 * b, k, generator=g)
    center = torch.randn(1, k, generator=g) * 0.1
    ours = dino_loss(student, teacher, center, n_views, 0.1, 0.05)
    ref = direct_dino_loss(student, teacher, center, n_views, 0.1, 0.05)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_loss_and_center_match_lightly():
    g = torch.Generator().manual_seed(0)
    b, k, n_views = 8, 64, 6
    ours = DINOLoss(k, center_momentum=0.9)
    ref = LightlyDINOLoss(
        output_dim=k,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
        student_temp=0.1,
        center_momentum=0.9,
    )
    for step in range(3):  # several steps so the centre's EMA is exercised too
        student = torch.randn(n_views * b, k, generator=g, requires_grad=True)
        teacher = torch.randn(2 * b, k, generator=g)
        temp = 0.04 + 0.01 * step
        loss = ours(student, teacher, n_views, 0.1, temp)
        student_ref = student.detach().clone().requires_grad_(True)
        loss_ref = ref(list(teacher.chunk(2)), list(student_ref.chunk(n_views)), teacher_temp=temp)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        loss.backward()
        loss_ref.backward()
        torch.testing.assert_close(student.grad, student_ref.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ours.center, ref.center.view(1, k))


def test_center_is_ema_of_batch_mean():
    loss = DINOLoss(4, center_momentum=0.9)
    t1 = torch.arange(8.0).view(2, 4)
    loss.update_center(t1)
    torch.testing.assert_close(loss.center, 0.1 * t1.mean(0, keepdim=True))
    loss.update_center(t1 * 2)
    expected = 0.9 * 0.1 * t1.mean(0) + 0.1 * 2 * t1.mean(0)
    torch.testing.assert_close(loss.center, expected.view(1, 4))


def test_uniform_outputs_give_log_k():
    """The collapse signature: identical logits everywhere give ln(K) exactly."""
    k = 128
    student = torch.zeros(4 * 3, k)
    teacher = torch.zeros(2 * 3, k)
    assert dino_loss(student, teacher, torch.zeros(1, k), 4).item() == pytest.approx(math.log(k))


def test_head_last_layer_weight_norm_fixed():
    head = DINOHead(16, 100, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(100))
    out = head(torch.randn(3, 16))
    assert out.shape == (3, 100)
    # Output of a unit bottleneck through unit-norm rows is a cosine: bounded by 1.
    assert out.abs().max() <= 1 + 1e-5
    free = DINOHead(16, 100, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
