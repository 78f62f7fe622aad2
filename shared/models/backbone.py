"""A timm model as a feature extractor, with weights only from a local file.

Run time never touches a model hub: `pretrained_path` is a file the user downloaded
themselves (a timm/torchvision state dict or a Lightning checkpoint); `init_from_run` is a
run directory of this project (e.g. a DINO run) whose trained backbone is copied.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)


def _unknown_model_error(name: str) -> ValueError:
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not close:  # fall back to a family match, e.g. "resnet" -> resnet18, resnet50
        close = [n for n in names if n.startswith(name.split("_")[0])][:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(f"backbone.name={name!r} is not a timm model.{hint}")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from a local .pth/.pt/.bin/.safetensors/.ckpt file (weights_only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone.pretrained_path={str(path)!r} does not exist. Pretrained weights are "
            "read only from a local file: download them once, then point the config at it."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


class TimmBackbone(nn.Module):
    """Any timm model by name, classifier removed.

    `features_only=False`: `forward` returns pooled features [B, num_features].
    `features_only=True`: `forward` returns the feature maps picked by `out_indices`
    (default the two deepest stages, what DOLG needs), channels in `feature_channels`.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        features_only: bool = False,
        out_indices: list[int] | None = None,
        drop_path_rate: float = 0.0,
        img_size: int | None = None,
        strict: bool = True,
        init_from_run: str | None = None,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        if init_from_run:
            raise ValueError(
                f"backbone.init_from_run={init_from_run!r} is applied by the metric-learning "
                "module (module=dolg|cgd) after it builds its net; this module does not use it"
            )
        if pretrained and not pretrained_path:
            raise ValueError(
                f"backbone.pretrained=true for {name!r} but no backbone.pretrained_path: "
                "weights are never downloaded from a hub at run time (runs are offline). "
                "Download the weights once and set backbone.pretrained_path=/path/to/file."
            )
        if not timm.is_model(name):
            raise _unknown_model_error(name)
        kwargs: dict = {"pretrained": False, "num_classes": 0, **timm_kwargs}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        if img_size is not None:
            kwargs["img_size"] = img_size
        self.name = name
        self.features_only = features_only
        if features_only:
            kwargs.pop("num_classes")
            n_stages = len(timm.create_model(name, **kwargs).feature_info)
            out_indices = list(out_indices) if out_indices else [n_stages - 2, n_stages - 1]
            self.model = timm.create_model(
                name, features_only=True, out_indices=tuple(out_indices), **kwargs
            )
            self.feature_channels = list(self.model.feature_info.channels())
            self.feature_strides = list(self.model.feature_info.reduction())
            self.num_features = self.feature_channels[-1]
        else:
            self.model = timm.create_model(name, **kwargs)
            self.num_features = self.model.num_features
            self.feature_channels = [self.num_features]
        if pretrained_path:
            self._load(pretrained_path, strict)

    def _load(self, path: str, strict: bool) -> None:
        state = _select_model_weights(load_state_dict_file(path), self.model.state_dict())
        missing, _ = self.model.load_state_dict(state, strict=False)
        if strict and missing:
            raise ValueError(
                f"backbone.pretrained_path={path!r} does not fit {self.name!r}: "
                f"{len(missing)} missing keys, e.g. {missing[:5]}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.model(x)

    def depth_groups(self) -> list[list[nn.Parameter]]:
        """The parameters by depth, shallowest first: timm's coarse groups (a ResNet's stem,
        layer1..layer4; a ViT's stem, each block), for layer-wise lr decay. A features-only
        model keeps its parameter names but not the method: ask a plain one for the rules."""
        from timm.models import group_parameters

        rules = self.model if hasattr(self.model, "group_matcher") else None
        if rules is None:
            rules = timm.create_model(self.name, pretrained=False, num_classes=0)
        groups = group_parameters(self.model, rules.group_matcher(coarse=True))
        params = dict(self.model.named_parameters())
        return [[params[n] for n in groups[k]] for k in sorted(groups)]


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes that checkpoints add ("module.", "backbone.model.", ...)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.model.", "backbone.", "model.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _select_model_weights(
    state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The checkpoint entries that are this model's weights, their wrapper prefix removed.

    The prefix is whatever most keys carry in front of a model key: "" for a plain state
    dict, "backbone.model." or "net.backbone.model." in our Lightning checkpoints. A DINO
    checkpoint holds two copies (student_backbone / teacher_backbone): the teacher wins, it
    is the network DINO evaluates. Without any match, fall back to the fixed prefixes.
    """
    votes: dict[str, int] = {}
    for key in state:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_state:
                prefix = ".".join(parts[:i]) + "." if i else ""
                votes[prefix] = votes.get(prefix, 0) + 1
                break
    if not votes:
        return _strip_prefixes(state)
    best = max(votes, key=lambda p: (votes[p], "teacher" in p, -len(p)))
    return {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}


# Backbone keys that change neither the weights' shapes nor what they compute at evaluation:
# they may differ between the run that trained a backbone and the run that starts from it.
NOT_ARCHITECTURE = frozenset(
    {
        "pretrained",
        "pretrained_path",
        "init_from_run",
        "features_only",
        "out_indices",
        "drop_path_rate",
        "strict",
    }
)


def check_same_backbone(theirs: dict, ours: dict, run_dir: str) -> None:
    """Every architecture key of the backbone group equal in both runs, or a ValueError."""
    for key in sorted((set(theirs) | set(ours)) - NOT_ARCHITECTURE):
        if theirs.get(key) != ours.get(key):
            raise ValueError(
                f"backbone.{key}={ours.get(key)!r} here, but backbone.init_from_run={run_dir!r} "
                f"trained backbone.{key}={theirs.get(key)!r}: fine-tune the backbone that run "
                f"trained (set backbone.{key}={theirs.get(key)!r})"
            )


def init_from_run(backbone: TimmBackbone, cfg: dict) -> None:
    """Copy into `backbone` the embedding backbone of the run `cfg["init_from_run"]` (a DINO
    run: its teacher), after checking both runs' backbone groups describe one network."""
    from shared.run_loading import backbone_from_run  # hydra, only when a run is read

    run_dir = cfg["init_from_run"]
    if cfg.get("pretrained_path"):
        raise ValueError(both_inits_error(cfg))
    src = backbone_from_run(run_dir)
    check_same_backbone(src.config, cfg, run_dir)
    own = backbone.model.state_dict()
    missing = sorted(set(own) - set(src.state))
    unexpected = sorted(set(src.state) - set(own))
    reshaped = [k for k in own if k in src.state and own[k].shape != src.state[k].shape]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"backbone.init_from_run={run_dir!r}: {src.source} of {src.checkpoint} does not fit "
            f"{backbone.name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}, other "
            f"shapes {reshaped[:3]}"
        )
    backbone.model.load_state_dict(src.state, strict=True)
    log.info("backbone initialised from %s of %s", src.source, src.checkpoint)


def both_inits_error(cfg: dict) -> str:
    return (
        f"backbone.pretrained_path={cfg.get('pretrained_path')!r} and backbone.init_from_run="
        f"{cfg.get('init_from_run')!r} both set: the backbone starts from one of them, "
        "set the other to null"
    )
