"""The embedding nets by name: `module.model.type` picks one (conf/net/<name>.yaml).

A new net is one file (an `EmbeddingNet` subclass), one conf/net YAML and one line here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.models.base import EmbeddingNet
from shared.models.cgd import CGDNet
from shared.models.dolg import DOLGNet

NETS: dict[str, type[EmbeddingNet]] = {"cgd": CGDNet, "dolg": DOLGNet}


def build_embedding_net(
    model: Mapping[str, Any], backbone: Mapping[str, Any], num_classes: int | None
) -> EmbeddingNet:
    """`model.type` picks the net; the other `model` keys are its arguments."""
    kind = model.get("type")
    if kind not in NETS:
        raise ValueError(
            f"module.model.type={kind!r} is not a known net; known: {', '.join(sorted(NETS))} "
            "(shared/models/registry.py NETS)"
        )
    kwargs = {k: v for k, v in model.items() if k != "type"}
    return NETS[kind].from_config(kwargs, backbone, num_classes)
