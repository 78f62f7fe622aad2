"""FLOPs and parameter summary of `embed`."""

from __future__ import annotations

import torch
from torch import nn

from shared.callbacks.run_summary import flop_counts, log_run_summary


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def embed(self, images):
        return nn.functional.normalize(self.fc(self.bn(images.float())), dim=-1)


def test_flops_of_embed_per_image_and_modes_restored():
    module = Tiny().train()
    before = module.bn.running_mean.clone()
    flops = flop_counts(module, torch.randn(5, 4) * 10)
    assert flops["flops/per_image"] == 2 * 4 * 3  # one 4x3 matmul, a multiply-add = 2 FLOPs
    assert module.training and module.bn.training  # restored
    assert torch.equal(module.bn.running_mean, before)  # counted in eval mode: stats untouched


class Recorder:
    def __init__(self):
        self.params = {}

    def log_hyperparams(self, params):
        self.params.update(params)


def test_summary_reaches_every_logger():
    loggers = [Recorder(), Recorder()]
    counts = log_run_summary(Tiny(), loggers, images=torch.randn(2, 4))
    assert counts["params/total"] == 4 * 3 + 3 + 4 + 4
    for logger in loggers:
        assert logger.params["flops/per_image"] == 24 and logger.params["params/total"] == 23
