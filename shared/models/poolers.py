"""Global pooling of a feature map [B, C, H, W] into a descriptor [B, C].

SPoC (mean), MAC (max) and GeM (generalised mean, Radenovic et al. 2018) are the three
descriptors CGD combines (Jun et al. 2019); GeM with p = 1 is SPoC and tends to MAC as p grows.
"""

from __future__ import annotations

import torch
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling (mean(x^p))^(1/p); p = 3 is the usual start (Radenovic et al.).

    x is clamped at `eps` first: the fractional power of a non-positive activation is undefined.
    Computed in at least fp32 so x^p cannot overflow fp16 under AMP; returned in x's dtype.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, trainable: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM p must be > 0, got {p}")
        if eps <= 0:
            raise ValueError(f"GeM eps must be > 0, got {eps}")
        p_tensor = torch.tensor(float(p))
        if trainable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        p = self.p.to(dtype)
        pooled = x.to(dtype).clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
        return pooled.to(x.dtype)

    def extra_repr(self) -> str:
        trainable = isinstance(self.p, nn.Parameter)
        return f"p={self.p.item():.4f}, eps={self.eps}, trainable={trainable}"


class MAC(nn.Module):
    """Maximum activation of convolutions: spatial max (Tolias et al. 2016)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        return x.amax(dim=(-2, -1))


class SPoC(nn.Module):
    """Sum-pooled convolutional features, as a spatial mean (Babenko & Lempitsky 2015)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        return x.mean(dim=(-2, -1))


# CGD names its descriptors by one letter (Jun et al. 2019): S = SPoC, M = MAC, G = GeM.
_POOLERS = {"gem": GeM, "g": GeM, "mac": MAC, "m": MAC, "spoc": SPoC, "s": SPoC}


def build_pooler(name: str, gem_p: float = 3.0, gem_trainable: bool = True) -> nn.Module:
    """A pooler by name: "gem" / "mac" / "spoc" or CGD's letters "G" / "M" / "S".

    `gem_p` and `gem_trainable` are used only for GeM.
    """
    key = str(name).lower()
    if key not in _POOLERS:
        raise ValueError(
            f"unknown pooler {name!r}: expected one of gem, mac, spoc (or CGD's G, M, S)"
        )
    if _POOLERS[key] is GeM:
        return GeM(p=gem_p, trainable=gem_trainable)
    return _POOLERS[key]()


def _check_map(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"pooling expects a feature map [B, C, H, W], got shape {tuple(x.shape)}")
