"""Load a finished (or running) run from its directory alone: config, module, data module.

    run = load_run("logs/ssl/dino/runs/2026-11-25_12-00-00")
    run.module.embed(images)        # best weights, eval mode
    run.datamodule.setup()          # the same store and splits as training

Checkpoints are read with `weights_only=True`: they hold tensors and plain values only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import shared.config  # noqa: F401  (resolvers)

# The checkpoint key under which evaluation callbacks store what they chose on validation
# (e.g. the matching threshold), read by name by inference, the service and results.json.
CHOSEN = "chosen_on_validation"


@dataclass
class LoadedRun:
    run_dir: Path
    config: DictConfig
    checkpoint: Path
    module: torch.nn.Module
    datamodule: object
    callbacks_state: dict
    chosen: dict  # the checkpoint's CHOSEN entry: {"threshold": ...} for matching runs


def newest_run(root: str | Path, pattern: str = "*") -> Path | None:
    """The newest run directory `root/<pattern>` (run names are timestamps) that has a config
    and a checkpoint, or None."""
    root = Path(root)
    runs = {
        ckpt.parents[1]
        for ckpt in (root.glob(f"{pattern}/checkpoints/*.ckpt") if root.is_dir() else [])
        if (ckpt.parents[1] / ".hydra" / "config.yaml").is_file()
    }
    return max(runs, key=lambda p: p.name, default=None)


def find_checkpoint(run_dir: Path, which: str = "best") -> Path:
    ckpt_dir = run_dir / "checkpoints"
    candidates = sorted(p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt")
    last = ckpt_dir / "last.ckpt"
    if which == "last" and last.is_file():
        return last
    if which == "best" and last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=True)
        for key, value in state.get("callbacks", {}).items():
            # the monitoring ModelCheckpoint (another one, monitor None, may write last.ckpt)
            if (
                key.startswith("ModelCheckpoint")
                and value.get("best_model_path")
                and value.get("monitor")
            ):
                best = Path(value["best_model_path"])
                if (ckpt_dir / best.name).is_file():  # this directory's copy (moved or copied)
                    return ckpt_dir / best.name
                if best.is_file():
                    return best
    if candidates:
        return candidates[-1]
    if last.is_file():
        return last
    raise FileNotFoundError(
        f"{run_dir} has no checkpoint: expected {ckpt_dir}/last.ckpt or epoch_*.ckpt "
        "(was the run stopped before its first epoch ended?)"
    )


def load_run(run_dir: str | Path, which: str = "best", map_location: str = "cpu") -> LoadedRun:
    """Resolved config + module with the chosen weights + data module of a run directory."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / ".hydra" / "config.yaml"
    resolved_file = run_dir / "config_resolved.yaml"
    cfg = OmegaConf.load(run_config_file(run_dir))
    for key in ("module", "data"):
        if key not in cfg or "_target_" not in cfg[key]:
            raise ValueError(f"{cfg_file} has no {key}._target_: is it from another version?")
    with open_output_dir(cfg, run_dir):
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in ("module", "data"):
        check_targets(
            resolved[key], f"{resolved_file.name if resolved_file.is_file() else cfg_file}: {key}"
        )
    ckpt = find_checkpoint(run_dir, which)
    state = torch.load(ckpt, map_location=map_location, weights_only=True)
    module = build_module(resolved.module._target_, state, ckpt)
    module.eval()
    datamodule = hydra.utils.instantiate(resolved.data)
    return LoadedRun(
        run_dir,
        resolved,
        ckpt,
        module,
        datamodule,
        state.get("callbacks", {}),
        state.get(CHOSEN, {}),
    )


def run_config_file(run_dir: Path) -> Path:
    """The run's config: run() writes it with every interpolation resolved beside .hydra/
    (preferred), Hydra writes .hydra/config.yaml."""
    cfg_file = run_dir / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {cfg_file} is missing")
    resolved_file = run_dir / "config_resolved.yaml"
    return resolved_file if resolved_file.is_file() else cfg_file


@dataclass
class RunBackbone:
    """The backbone a run's `embed()` uses, as weights: what `backbone.init_from_run` copies."""

    checkpoint: Path
    config: dict  # the run's resolved `backbone` group
    source: str  # e.g. "selfsup.dino.DINOModule.teacher_backbone"
    state: dict[str, torch.Tensor]  # the TimmBackbone's timm model state dict


def backbone_from_run(run_dir: str | Path, which: str = "best") -> RunBackbone:
    """The embedding backbone of a run directory's chosen checkpoint, without building the
    module: its class says where the backbone lives (`embed_backbone`)."""
    run_dir = Path(run_dir)
    cfg_file = run_config_file(run_dir)
    cfg = OmegaConf.load(cfg_file)
    for key in ("backbone", "module"):
        if key not in cfg:
            raise ValueError(f"{cfg_file} has no `{key}` group: is it from another version?")
    check_targets(cfg.module, f"{cfg_file.name}: module")
    target = cfg.module._target_
    attr = getattr(module_class(target), "embed_backbone", None)
    if not attr:
        raise ValueError(f"{target} (module of {run_dir}) declares no embed_backbone to copy")
    ckpt = find_checkpoint(run_dir, which)
    state = torch.load(ckpt, map_location="cpu", weights_only=True).get("state_dict", {})
    prefix = f"{attr}.model."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{ckpt} holds no {prefix}* weights: not a checkpoint of {target}")
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    return RunBackbone(ckpt, backbone, f"{target}.{attr}", weights)


# A run directory may come from elsewhere (a downloaded W&B or MLflow artifact): its config
# is data, so only this project's classes are built from it, never an arbitrary `_target_`.
TRUSTED_TARGETS = ("shared.", "selfsup.", "matching.")


def check_targets(node, where: str) -> None:
    """Refuse any `_target_` under `node` outside this project's packages."""
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(TRUSTED_TARGETS):
            raise ValueError(
                f"{where} names _target_={target!r}: a run's config may only build this "
                f"project's classes ({', '.join(p + '*' for p in TRUSTED_TARGETS)}); refusing "
                "to load it"
            )
        for key, value in node.items():
            if key != "_target_":
                check_targets(value, f"{where}.{key}")
    elif OmegaConf.is_list(node):
        for i, value in enumerate(node):
            check_targets(value, f"{where}[{i}]")


def build_module(target: str, state: dict, ckpt: Path) -> torch.nn.Module:
    """The module class named by the config, built from the checkpoint's hyper-parameters and
    loaded with its weights; every mismatch (another version of the code or of the config)
    is reported by name."""
    missing = [k for k in ("hyper_parameters", "state_dict") if k not in state]
    if missing:
        raise ValueError(
            f"{ckpt} has no {' and no '.join(missing)}: not a checkpoint written "
            "by this project's run()"
        )
    module_cls = module_class(target)
    hparams = dict(state["hyper_parameters"])
    params = inspect.signature(module_cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(hparams) - set(params))
        required = sorted(
            n
            for n, p in params.items()
            if n != "self"
            and p.default is p.empty
            and p.kind is not p.VAR_POSITIONAL
            and n not in hparams
        )
        if unknown or required:
            raise ValueError(
                f"{ckpt} does not fit {target} of this version: hyper-parameters "
                f"{unknown or 'none'} are unknown to it and {required or 'none'} are missing"
            )
    module = module_cls(**hparams)
    if hasattr(module, "net") and module.net is None:  # built lazily from the data
        raise ValueError(f"{ckpt} lacks num_classes in its hyper-parameters")
    result = module.load_state_dict(state["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{ckpt} does not fit {target} of this version: {len(result.missing_keys)} weights "
            f"missing (e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})"
        )
    return module


def module_class(target: str) -> type:
    try:
        return hydra.utils.get_class(target)
    except Exception as exc:
        reason = " ".join(str(exc).split())
        raise ImportError(
            f"module._target_={target!r} of the run's config cannot be imported "
            f"({reason}); is the config from another version of the code?"
        ) from exc


class open_output_dir:
    """Resolve `${hydra:...}` interpolations as if the run were live in `run_dir`."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir

    def __enter__(self):
        OmegaConf.set_struct(self.cfg, False)
        if not OmegaConf.is_interpolation(self.cfg.paths, "output_dir"):
            return self.cfg  # already resolved
        self.cfg.paths.output_dir = str(self.run_dir)
        if OmegaConf.is_interpolation(self.cfg, "task_name"):
            self.cfg.task_name = self.run_dir.parent.parent.name
        if "data" in self.cfg and OmegaConf.is_interpolation(self.cfg.data, "store_name"):
            self.cfg.data.store_name = "store"
        return self.cfg

    def __exit__(self, *exc):
        return False
