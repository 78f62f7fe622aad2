import pytest
import torch

from shared.models.backbone import TimmBackbone
from shared.models.dolg import DOLGNet, orthogonal_fusion


def test_orthogonal_fusion_removes_the_global_direction():
    torch.manual_seed(0)
    f_l = torch.randn(3, 32, 4, 5)
    f_g = torch.randn(3, 32) * 5
    orth = orthogonal_fusion(f_l, f_g)
    assert orth.shape == f_l.shape and orth.dtype == torch.float32
    dot = torch.einsum("bchw,bc->bhw", orth, f_g)
    scale = orth.norm(dim=1) * f_g.norm(dim=1)[:, None, None]
    assert (dot.abs() / scale).max() < 1e-4
    # brute force: per location, f_l - (f_g . f_l) / ||f_g||^2 * f_g
    for b in range(3):
        for h in range(4):
            for w in range(5):
                v, g = f_l[b, :, h, w], f_g[b]
                expected = v - (g @ v) / (g @ g) * g
                torch.testing.assert_close(orth[b, :, h, w], expected, rtol=1e-5, atol=1e-5)


def test_orthogonal_fusion_fp32_under_autocast():
    f_l, f_g = torch.randn(2, 8, 3, 3), torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = orthogonal_fusion(f_l.bfloat16(), f_g.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, orthogonal_fusion(f_l.bfloat16().float(), f_g.bfloat16().float())
    )


@pytest.mark.parametrize(
    ("name", "channels", "multi_atrous"),
    [
        ("resnet18", [256, 512], True),
        ("efficientnet_b0", [112, 320], True),
        ("resnet18", [256, 512], False),
    ],
)
def test_dolg_shapes_and_gradients(name, channels, multi_atrous):
    torch.manual_seed(0)
    net = DOLGNet(name, embedding_dim=16, local_dim=32, global_dim=32, multi_atrous=multi_atrous)
    assert net.backbone.feature_channels == channels
    assert net.backbone.feature_strides == [16, 32]
    x = torch.randn(2, 3, 64, 64)
    local_map, global_vec = net.forward_features(x)
    assert local_map.shape == (2, 32, 4, 4) and global_vec.shape == (2, 32)
    out = net(x)
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    first = next(p for p in net.backbone.parameters() if p.dim() == 4)  # the stem conv
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert net.gem.p.grad is not None and net.local_branch.attention.weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 16)


def test_efficientnet_b3_deepest_stages():
    backbone = TimmBackbone("efficientnet_b3", features_only=True)
    assert backbone.feature_channels == [136, 384]


def test_dolg_errors():
    with pytest.raises(ValueError, match="must equal global_dim"):
        DOLGNet("resnet18", local_dim=32, global_dim=64)
    with pytest.raises(ValueError, match="divisible"):
        DOLGNet("resnet18", local_dim=32, global_dim=32, atrous_dim=30)
