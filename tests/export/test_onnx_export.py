"""ONNX export of `embed`: parity with PyTorch on the run's images, errors that name the op."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from timm.models import register_model
from torch import nn

from shared.export.onnx import ExportError, ParityError, check_parity, main, onnx_session
from shared.run_loading import load_run


class SvdNet(nn.Module):
    """A backbone whose forward uses an op ONNX cannot express (an SVD)."""

    def __init__(self, num_classes: int = 0, **_):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.num_features = 8

    def forward(self, x):
        return torch.linalg.svdvals(self.conv(x).flatten(2))  # [B, 8]


@register_model
def untraceable_test_net(pretrained=False, **kwargs):
    return SvdNet(**kwargs)


@pytest.fixture(scope="module")
def exported(dino_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = main(["--run-dir", str(dino_run.run_dir), "--out", str(out), "--n-check", "16"])
    return out, report


def test_export_matches_pytorch_on_the_runs_images(exported, dino_run):
    out, report = exported
    assert report.max_abs_diff <= 1e-4 and report.n_images == 16
    assert json.loads(out.with_suffix(".json").read_text())["max_abs_diff"] == report.max_abs_diff
    graph = onnx.load(str(out)).graph
    (inp,) = graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert inp.type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis

    run = load_run(dino_run.run_dir)
    run.datamodule.setup()
    images = torch.as_tensor(run.datamodule.store.images[:5])  # a batch size never exported
    got = onnx_session(out).run(["embeddings"], {"images": images.numpy()})[0]
    expected = run.module.embed(images).numpy()
    assert got.shape == (5, report.embedding_dim)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_parity_check_fails_when_the_graph_differs(exported, dino_run):
    out, _ = exported
    run = load_run(dino_run.run_dir)
    changed = copy.deepcopy(run.module)
    with torch.no_grad():
        for p in changed.teacher_backbone.parameters():
            p.add_(0.05)
    run.datamodule.setup()
    images = torch.as_tensor(run.datamodule.store.images[:4])
    with pytest.raises(ParityError, match="differs from PyTorch by .* above the tolerance"):
        check_parity(changed, out, images)


def test_untraceable_backbone_names_the_op(dino_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(dino_run.run_dir, run_dir)
    ckpt_dir = run_dir / "checkpoints"
    state = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    hparams = state["hyper_parameters"]
    hparams["backbone"] = {**hparams["backbone"], "name": "untraceable_test_net"}
    module = type(dino_run.module)(**hparams)
    shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir()
    torch.save(
        {"hyper_parameters": hparams, "state_dict": module.state_dict()},
        ckpt_dir / "epoch_000.ckpt",
    )
    with pytest.raises(ExportError, match=r"operator aten\._linalg_svd\S* has no ONNX") as err:
        main(["--run-dir", str(run_dir), "--out", str(tmp_path / "x.onnx")])
    assert err.value.op.startswith("aten._linalg_svd")
    assert "DINOModule" in str(err.value)
