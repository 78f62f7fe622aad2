"""bench/train_step.py compares like with like: its plain loop trains exactly what the
LightningModule on a real Trainer trains (same weights, buffers and centre after 3 steps,
in fp32 and bf16-mixed)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from selfsup.dino import DINOModule

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling `_report`
    try:
        spec = importlib.util.spec_from_file_location("bench_train_step", BENCH / "train_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize(
    "freeze_last_layer_epochs, precision", [(1, "32-true"), (0, "32-true"), (1, "bf16-mixed")]
)
def test_plain_loop_and_lightning_module_train_the_same_weights(
    bench, freeze_last_layer_epochs, precision
):
    torch.manual_seed(0)
    initial = DINOModule(
        backbone={"name": "test_resnet"},
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
        use_bn_in_head=True,  # BatchNorm buffers must agree too
        norm_last_layer=False,
        clip_grad=0.05,  # small enough to clip every parameter
        momentum_teacher=0.9,
        base_lr=0.5,  # lr 0.008 at batch 4: a wrong schedule or step shows at once
        warmup_epochs=0,
        freeze_last_layer_epochs=freeze_last_layer_epochs,
        multicrop=dict(global_size=16, local_size=8, n_local=2),
    )
    cpu = torch.device("cpu")
    batch = bench.make_batch(initial, batch_size=4, image_size=16, device=cpu)
    ours, plain = copy.deepcopy(initial), copy.deepcopy(initial)
    times, _ = bench.lightning_fit(ours, batch, 3, 4, cpu, precision)
    assert len(times) == 2  # step-start intervals of 3 steps
    bench.plain_fit(plain, batch, 3, 4, cpu, precision)

    diff = bench.max_weight_diff(ours, plain)
    assert max(diff.values()) <= 1e-6, diff
    # ... and both really trained: student, EMA teacher and centre all moved.
    moved = bench.max_weight_diff(ours, initial)
    assert all(moved[k] > 1e-4 for k in ("student_backbone", "student_head", "teacher_head"))
    assert moved["center"] > 0
    last = [m.student_head.last_layer.parametrizations.weight.original1 for m in (ours, initial)]
    assert torch.equal(*last) == (freeze_last_layer_epochs > 0)
