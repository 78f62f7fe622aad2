"""`module.model.type` picks a net from the registry; an unknown name says which exist."""

from __future__ import annotations

import pytest
import torch
import yaml

from shared.models import registry
from shared.models.base import EmbeddingNet
from shared.models.cgd import CGDNet
from shared.models.dolg import DOLGNet
from shared.models.registry import build_embedding_net
from tests.conftest import CONF


class TinyNet(EmbeddingNet):
    """A user's net: one class, one registry line, no auxiliary classifier."""

    def __init__(self, embedding_dim: int = 4) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.backbone = torch.nn.Conv2d(3, embedding_dim, 1)

    @classmethod
    def from_config(cls, model, backbone, num_classes):
        return cls(**model)

    def forward(self, x):
        return self.backbone(x).mean(dim=(2, 3))


def test_the_type_picks_the_net_with_the_other_keys_as_its_arguments():
    bb = {"name": "test_resnet", "init_from_run": None}
    dolg = build_embedding_net(
        {"type": "dolg", "embedding_dim": 8, "local_dim": 16, "global_dim": 16}, bb, 3
    )
    cgd = build_embedding_net({"type": "cgd", "descriptors": "MG", "embedding_dim": 8}, bb, 3)
    assert isinstance(dolg, DOLGNet) and dolg.embedding_dim == 8
    assert isinstance(cgd, CGDNet) and cgd.descriptors == "MG" and cgd.num_classes == 3


def test_a_registered_net_is_built_and_has_no_aux_logits(monkeypatch):
    monkeypatch.setitem(registry.NETS, "tiny", TinyNet)
    net = build_embedding_net({"type": "tiny", "embedding_dim": 6}, {"name": "unused"}, 3)
    x = torch.randn(2, 3, 8, 8)
    emb, logits = net.forward_with_aux(x)
    assert logits is None
    torch.testing.assert_close(emb, net.backbone(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("model", [{"type": "dolgg"}, {"embedding_dim": 8}])
def test_an_unknown_or_missing_type_names_the_key_and_the_known_nets(model):
    with pytest.raises(ValueError, match=r"module\.model\.type=.*known: cgd, dolg"):
        build_embedding_net(model, {"name": "test_resnet"}, 3)


@pytest.mark.parametrize("path", sorted((CONF / "net").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_net_option_builds_from_its_yaml(path):
    model = yaml.safe_load(path.read_text())
    bb = {"name": "test_resnet", "features_only": model["type"] == "dolg"}
    net = build_embedding_net(model, bb, 3)
    assert isinstance(net, registry.NETS[model["type"]])
    assert net.embedding_dim == model["embedding_dim"]
