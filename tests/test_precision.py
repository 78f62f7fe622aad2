"""Precision presets (trainer/precision=bf16|fp16|fp32): mixed precision trains, the ArcFace
head and its loss stay fp32."""

import math

import pytest
import torch
from lightning import Callback

from shared.instantiate import instantiate
from tests.pipelines import TINY


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def train_one_step(compose_cfg, *overrides):
    one_step = [
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=0",
    ]
    cfg = compose_cfg("matching", [*TINY["matching"], *overrides, *one_step])
    losses = Losses()
    trainer = instantiate(
        cfg.trainer,
        "trainer",
        logger=False,
        callbacks=[losses],
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    module = instantiate(cfg.module, "module")
    trainer.fit(module, datamodule=instantiate(cfg.data, "data"))
    return cfg, trainer, module, losses.values


def check_head_in_fp32(head, device_type, dtype):
    assert head.weight.dtype == torch.float32  # master weights stay fp32
    embeddings = torch.randn(4, head.embedding_size, device=head.weight.device)
    labels = torch.arange(4, device=head.weight.device) % head.num_classes
    with torch.autocast(device_type=device_type, dtype=dtype):
        loss, logits = head(embeddings.to(dtype), labels)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert math.isfinite(loss.detach().item())


def test_arcface_head_computes_in_fp32_under_autocast():
    from shared.models.margin_heads import ArcFaceHead

    check_head_in_fp32(ArcFaceHead(32, 5, subcenters=3), "cpu", torch.bfloat16)


# The batch augmentations run inside training_step, under autocast: they must switch it off
# (their hue rotation would come out in bf16 and be written into an fp32 batch).
def test_bf16_preset_on_the_cpu(compose_cfg):
    cfg, trainer, module, losses = train_one_step(compose_cfg, "trainer/precision=bf16")
    assert cfg.trainer.precision == "bf16-mixed" == trainer.precision
    assert losses and all(math.isfinite(v) for v in losses)
    check_head_in_fp32(module.head, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_mixed_precision_presets_on_a_gpu(compose_cfg, preset, dtype):
    cfg, trainer, module, losses = train_one_step(
        compose_cfg, "trainer=gpu", f"trainer/precision={preset}"
    )
    assert trainer.precision == {"fp16": "16-mixed", "bf16": "bf16-mixed"}[preset]
    assert losses and all(math.isfinite(v) for v in losses)
    check_head_in_fp32(module.head, "cuda", dtype)
