"""DOLG: Deep Orthogonal fusion of Local and Global features (Yang et al., ICCV 2021).

Local branch on stage 3 (stride 16), global branch on stage 4 (stride 32); the part of each
local feature orthogonal to the global one is pooled and concatenated with it, so the local
half carries only what the global descriptor lacks. Official code: feymanpriv/DOLG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.backbone import TimmBackbone
from shared.models.base import EmbeddingNet
from shared.models.poolers import GeM


def orthogonal_fusion(
    local_map: torch.Tensor, global_vec: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The component of each local feature orthogonal to the global one [B, C, H, W].

    proj = (f_g . f_l) / ||f_g||^2 * f_g (the paper's projection); orth = f_l - proj. The
    Landmark-2021 winning solution divides by ||f_g|| instead, which keeps a scaled share of f_g
    in "orth": a departure we do not follow. Computed in >= fp32 with autocast off (||f_g||^2
    of a 1024-d vector overflows fp16 easily).
    """
    if local_map.dim() != 4 or global_vec.dim() != 2 or local_map.shape[:2] != global_vec.shape:
        raise ValueError(
            f"local_map must be [B, C, H, W] and global_vec [B, C], got "
            f"{tuple(local_map.shape)} and {tuple(global_vec.shape)}"
        )
    dtype = torch.promote_types(
        torch.promote_types(local_map.dtype, global_vec.dtype), torch.float32
    )
    with torch.autocast(device_type=local_map.device.type, enabled=False):
        f_l = local_map.to(dtype)
        f_g = global_vec.to(dtype)
        dot = torch.einsum("bchw,bc->bhw", f_l, f_g).unsqueeze(1)  # [B, 1, H, W]
        norm_sq = f_g.pow(2).sum(dim=1).clamp(min=eps).view(-1, 1, 1, 1)
        proj = dot / norm_sq * f_g[:, :, None, None]
        return f_l - proj


class MultiAtrous(nn.Module):
    """Parallel dilated 3x3 convs plus an image-pooling branch, concatenated (ASPP-like).

    The paper uses dilations 6/12/18; the Landmark-2021 winner 3/6/9 (our default), which suit
    the small stride-16 maps of ~512 px inputs better.
    """

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        n_branches = len(dilations) + 1
        if out_channels % n_branches:
            raise ValueError(
                f"atrous_dim={out_channels} must be divisible by {n_branches} branches "
                f"({len(dilations)} dilations + image pooling)"
            )
        width = out_channels // n_branches
        self.dilated = nn.ModuleList(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=int(d), dilation=int(d))
            for d in dilations
        )
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, width, kernel_size=1), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [conv(x) for conv in self.dilated]
        # a bilinear up-sampling of a 1x1 map is a constant: expand to any input size
        branches.append(self.image_pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return torch.cat(branches, dim=1)


class DOLGLocalBranch(nn.Module):
    """Stage-3 map -> attention-weighted, channel-normalised local features [B, local_dim, H, W].

    (multi-atrous -> 1x1 conv -> ReLU) -> 1x1 conv -> BN -> L2-normalise over channels = f_l;
    attention = softplus(1x1 conv(ReLU(BN output))) with one channel; returns attention * f_l.
    """

    def __init__(
        self,
        in_channels: int,
        local_dim: int,
        multi_atrous: bool = True,
        dilations: Sequence[int] = (3, 6, 9),
        atrous_dim: int | None = None,
    ) -> None:
        super().__init__()
        if multi_atrous:
            atrous_dim = int(atrous_dim or 2 * local_dim)  # 2048 for local_dim 1024 (paper)
            self.atrous = nn.Sequential(
                MultiAtrous(in_channels, atrous_dim, dilations),
                nn.Conv2d(atrous_dim, local_dim, kernel_size=1),
                nn.ReLU(),
            )
            in_channels = local_dim
        else:
            self.atrous = nn.Identity()
        self.conv = nn.Conv2d(in_channels, local_dim, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(local_dim)
        self.attention = nn.Conv2d(local_dim, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.bn(self.conv(self.atrous(x)))
        attention = F.softplus(self.attention(F.relu(feat)))
        return F.normalize(feat, dim=1) * attention


class DOLGNet(EmbeddingNet):
    """Image -> DOLG embedding [B, embedding_dim], not L2-normalised.

    The margin head and the evaluators normalise it themselves; leaving it raw keeps the FC's
    output free for a head with its own normalisation. Uses the two deepest stages of a timm
    backbone (`TimmBackbone(features_only=True)`): stage 3 local, stage 4 global. Defaults are
    the paper's: local_dim = global_dim = 1024, embedding_dim = 512, GeM p = 3 (trainable).
    """

    def __init__(
        self,
        backbone_name: str,
        embedding_dim: int = 512,
        local_dim: int = 1024,
        global_dim: int = 1024,
        multi_atrous: bool = True,
        dilations: Sequence[int] = (3, 6, 9),
        gem_p: float = 3.0,
        pretrained_path: str | None = None,
        atrous_dim: int | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if local_dim != global_dim:
            raise ValueError(
                f"local_dim ({local_dim}) must equal global_dim ({global_dim}): the local "
                "features are projected onto the global vector"
            )
        self.backbone = TimmBackbone(
            backbone_name,
            pretrained=pretrained_path is not None,
            pretrained_path=pretrained_path,
            features_only=True,
            drop_path_rate=drop_path_rate,
        )
        c3, c4 = self.backbone.feature_channels[-2:]
        self.embedding_dim = int(embedding_dim)
        self.local_branch = DOLGLocalBranch(
            c3,
            local_dim,
            multi_atrous=multi_atrous,
            dilations=tuple(dilations),
            atrous_dim=atrous_dim,
        )
        self.gem = GeM(p=gem_p, trainable=True)
        self.global_fc = nn.Linear(c4, global_dim)
        self.fc = nn.Linear(local_dim + global_dim, embedding_dim)

    @classmethod
    def from_config(cls, model, backbone, num_classes):
        """DOLG builds its own features_only backbone and has no auxiliary classifier."""
        return cls(backbone["name"], pretrained_path=backbone.get("pretrained_path"), **model)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local map f_l * attention [B, local_dim, H3, W3], global vector f_g [B, global_dim])."""
        s3, s4 = self.backbone(x)[-2:]
        return self.local_branch(s3), self.global_fc(self.gem(s4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local_map, global_vec = self.forward_features(x)
        orth = orthogonal_fusion(local_map, global_vec).mean(dim=(-2, -1))
        fused = torch.cat([global_vec.to(orth.dtype), orth], dim=1)
        return self.fc(fused)
