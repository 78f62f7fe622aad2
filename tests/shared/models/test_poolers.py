import pytest
import torch

from shared.models.poolers import MAC, GeM, SPoC, build_pooler


@pytest.fixture
def fmap() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 5, 4, 4, dtype=torch.float64) * 1.4 + 0.1  # in [0.1, 1.5]


def test_gem_p1_is_mean(fmap):
    out = GeM(p=1.0, trainable=False)(fmap)
    torch.testing.assert_close(out, fmap.sum(dim=(2, 3)) / 16)


def test_gem_matches_formula_on_known_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    torch.testing.assert_close(GeM(p=3.0)(x), torch.tensor([[expected]]))


def test_gem_large_p_approaches_max(fmap):
    out = GeM(p=200.0, trainable=False)(fmap)
    top = fmap.flatten(2).max(dim=2).values
    # (mean x^p)^(1/p) >= max * (1/HW)^(1/p) = max * 16^(-1/200) ~ 0.986 max
    assert torch.all(out <= top + 1e-12)
    torch.testing.assert_close(out, top, rtol=0.015, atol=0.0)


def test_gem_clamps_non_positive_inputs():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    gem = GeM()
    gem(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(gem.p.grad).all()


def test_gem_p_trainable_or_buffer():
    assert isinstance(GeM(trainable=True).p, torch.nn.Parameter)
    fixed = GeM(trainable=False)
    assert not list(fixed.parameters()) and "p" in fixed.state_dict()


def test_mac_and_spoc_exact(fmap):
    flat = fmap.flatten(2)
    assert torch.equal(MAC()(fmap), flat.max(dim=2).values)
    torch.testing.assert_close(SPoC()(fmap), flat.sum(dim=2) / flat.shape[2])


@pytest.mark.parametrize(
    ("name", "cls"),
    [("gem", GeM), ("G", GeM), ("mac", MAC), ("M", MAC), ("spoc", SPoC), ("S", SPoC)],
)
def test_build_pooler(name, cls):
    assert isinstance(build_pooler(name), cls)


def test_build_pooler_errors():
    with pytest.raises(ValueError, match="unknown pooler"):
        build_pooler("avg")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        GeM()(torch.rand(2, 3))
