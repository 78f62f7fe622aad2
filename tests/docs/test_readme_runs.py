"""The README's commands run as typed (slow stage), with budget overrides only: fewer epochs
and batches, tiny data and networks, 2 Optuna trials. Output goes to a pipe, as on a
cluster. Placeholders (`<time>`, example paths like /data/imgs) become the workspace's own
files, as a user puts their own paths there. Commands that need a GPU, a network service or
the SLURM cluster are not run here (the SLURM ones run in `tests/slurm`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.docs.readme import Command, all_commands, substitute

pytestmark = pytest.mark.slow

COMMANDS = all_commands()
BUDGET_KEYS = ("trainer.max_epochs", "hydra.sweeper.n_trials", "--num-training")


def not_here(command: Command) -> str | None:
    """Why a command cannot run on this machine, or None."""
    text = command.text
    if ("trainer=gpu" in text or "trainer=ddp " in text + " ") and not torch.cuda.is_available():
        return "needs a GPU"
    if "hydra/launcher=slurm" in text:
        return "runs on the SLURM cluster (tests/slurm)"
    if "wandb_online=true" in text or "tracking_uri=http" in text:
        return "needs a network service"
    if "=s3://" in text:
        return "needs a bucket (tests/shared/data/test_object_store.py runs one in SeaweedFS)"
    if "init_from_run=" in text:
        return "starts from the run of the command before it (test_catalog_to_matcher_chain)"
    return None


def budget(command: Command) -> list[str]:
    """Overrides that shrink a pipeline command's cost without changing what it exercises."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF

    args = [a for a in command.overrides if not a.startswith("hydra.sweeper.n_trials")]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # a sweep's first value (a comma inside [...] or {...} is a list or a dict, not a sweep)
        base = [a.split(",")[0] if "," in a and not set("[{") & set(a) else a for a in args]
        cfg = compose(config_name=command.pipeline, overrides=base, return_hydra_config=True)
    GlobalHydra.instance().clear()
    given = {a.split("=", 1)[0].lstrip("+~") for a in args}
    # A network the command names keeps the image sizes it was made for (a ConvNeXt needs
    # crops of 32 px or more); the test networks take 32 / 16 px.
    own_net = bool(given & {"backbone.name", "backbone.pretrained_path"})
    px = [] if own_net else ["data.image_size=32"]
    out = ["trainer.max_epochs=2", "+trainer.limit_train_batches=2"]
    if any(a.startswith("hparams_search=") for a in args):
        out.append("hydra.sweeper.n_trials=2")
    if command.pipeline == "ssl":
        if cfg.data.source._target_.endswith("SyntheticSource"):
            out += [
                "data.source.num_families=6",
                "data.source.groups_per_family=2",
                "data.source.min_instances=4",
                "data.source.max_instances=6",
                *(["data.source.image_size=32"] if px else []),
            ]
        out += [*px, "data.batch_size=8", "data.eval_batch_size=16"]
        if cfg.module._target_.endswith("DINOModule"):
            out += ["module.out_dim=256", "module.hidden_dim=128", "module.bottleneck_dim=64"]
            out += ["module.multicrop.n_local=2"]
            if px:
                out += ["module.multicrop.global_size=32", "module.multicrop.local_size=16"]
        if cfg.module._target_.endswith("SimCLRModule") and px:
            out += ["module.views.size=32"]
    else:
        if "synthetic" in cfg.data.source:  # postings written from the synthetic products
            out += [
                "data.source.synthetic.num_families=6",
                "data.source.synthetic.groups_per_family=2",
                "data.source.synthetic.image_size=32",
            ]
        out += [
            "data.image_size=32",
            "data.batch_size=8",
            "data.eval_batch_size=16",
        ]
    if "model" in cfg.module and cfg.module.model.type == "dolg":
        out += ["module.model.local_dim=32", "module.model.global_dim=32"]
    if "model" in cfg.module:  # CGD splits it over its 3 descriptors
        out += [f"module.model.embedding_dim={48 if cfg.module.model.type == 'cgd' else 32}"]
    name = str(cfg.backbone.name)
    if not own_net:
        out.append("backbone.name=" + ("test_vit" if "vit" in name else "test_resnet"))
    return [
        a for a in out if a.split("=", 1)[0].lstrip("+") not in given or a.startswith(BUDGET_KEYS)
    ]


def with_budget(command: Command, argv: list[str]) -> list[str]:
    """`argv` with budget values in place of the command's own budget keys, then the rest."""
    extra = budget(command)
    keys = {e.split("=", 1)[0].lstrip("+") for e in extra}
    kept = [a for a in argv if a.split("=", 1)[0].lstrip("+") not in keys]
    return kept + extra


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A user's folder: PROJECT_ROOT (logs/, data/), their own images, CSV and weights."""
    import timm

    from shared.data.synthetic import SyntheticProducts, write_class_folders

    root = tmp_path_factory.mktemp("workspace")
    products = SyntheticProducts(num_families=4, groups_per_family=2, image_size=32, seed=1)
    folders = write_class_folders(products, root / "imgs")
    rows = sorted(p.relative_to(folders) for p in folders.rglob("*.png"))
    with open(root / "a.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows([f"imgs/{p}", p.parts[0]] for p in rows)  # paths beside the CSV
    torch.save(timm.create_model("resnet18").state_dict(), root / "resnet18.pth")
    return root


def environment(root: Path) -> dict[str, str]:
    wandb = {f"WANDB_{k}": str(root / f"wandb_{k.lower()}") for k in ("DIR", "CACHE_DIR")}
    return {
        **os.environ,
        **wandb,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PROJECT_ROOT": str(root),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "1",
    }


def placeholders(root: Path) -> dict[str, str]:
    return {
        "/data/imgs": str(root / "imgs"),
        "/data/a.csv": str(root / "a.csv"),
        "/weights/resnet18.pth": str(root / "resnet18.pth"),
    }


def run(argv: list[str], root: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable if a == "python" else a for a in argv],
        cwd=REPO,
        env=environment(root),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"{' '.join(argv)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


RUNNABLE = [c for c in COMMANDS if c.kind == "pipeline"]


@pytest.mark.parametrize("command", RUNNABLE, ids=[f"{c.doc}:{c.line}" for c in RUNNABLE])
def test_pipeline_command_runs_as_typed(workspace, command):
    if reason := not_here(command):
        pytest.skip(reason)
    before = set(workspace.glob("logs/**/results.json"))
    argv = substitute(command.argv, placeholders(workspace))
    run(with_budget(command, argv), workspace)
    new = set(workspace.glob("logs/**/results.json")) - before
    expected = 2 if command.multirun else 1  # the sweeps here start two jobs
    assert len(new) == expected, sorted(map(str, new))
    for path in new:
        results = json.loads(path.read_text())
        assert results["optimized_metric"] and (results.get("test") or "debug" in command.text)


def newest_run(root: Path, pipeline: str, task: str) -> Path:
    runs = sorted((root / "logs" / pipeline / task / "runs").glob("*"))
    assert runs, f"no {pipeline}/{task} run in the workspace"
    return runs[-1]


def tool_command(kind: str) -> list[Command]:
    return [c for c in COMMANDS if c.kind == kind]


def test_infer_export_lr_find_and_wandb_offline_as_typed(workspace):
    """The tools, each run on a run the README's own commands made in this workspace."""
    main = {c.text: c for c in COMMANDS if c.kind == "pipeline"}
    for text in ("python product-matching/run.py", "python ssl/run.py logger=wandb"):
        run(with_budget(main[text], list(main[text].argv)), workspace)
    matching_run = newest_run(workspace, "product-matching", "dolg")
    ssl_run = newest_run(workspace, "ssl", "dino")  # the logger=wandb run

    # infer: new postings = this run's own postings CSV and images, as a user's new batch
    postings = next((workspace / "data" / "synthetic_postings").glob("*/postings.csv"))
    (workspace / "new_postings.csv").write_text(postings.read_text())
    if not (workspace / "new_images").exists():
        (workspace / "new_images").symlink_to(postings.parent / "images")
    values = {
        "logs/product-matching/dolg/runs/<time>": str(matching_run),
        "logs/ssl/dino/runs/<time>": str(ssl_run),
        "new_postings.csv": str(workspace / "new_postings.csv"),
        "new_images/": str(workspace / "new_images") + "/",
        "matches.csv": str(workspace / "matches.csv"),
        "model.onnx": str(workspace / "model.onnx"),
    }
    for command in tool_command("infer") + tool_command("export") + tool_command("wandb_offline"):
        run(substitute(command.argv, values), workspace)
    with open(workspace / "matches.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(postings.read_text().splitlines()) - 1 and "matches" in rows[0]
    assert (workspace / "model.onnx").stat().st_size > 0

    for command in tool_command("lr_find"):
        argv = substitute(command.argv, values)
        if "--num-training" in argv:
            argv[argv.index("--num-training") + 1] = "8"
        else:
            argv += ["--num-training", "8"]
        pipeline = argv[argv.index("--pipeline") + 1]
        script = {"ssl": "ssl/run.py", "matching": "product-matching/run.py"}[pipeline]
        overrides = tuple(a for a in argv if "=" in a and not a.startswith("-"))
        as_run = Command(command.doc, command.line, ("python", script, *overrides))
        extra = [b for b in budget(as_run) if not b.startswith(("trainer.", "+trainer."))]
        run(argv + extra, workspace)
    found = list(workspace.glob("logs/**/lr_find/*/lr_find.json"))
    assert len(found) == len(tool_command("lr_find"))


def test_catalog_to_matcher_chain(workspace):
    """DINO on the postings, then the matcher from its teacher: both commands as typed. The
    matcher's log names DINO's checkpoint, and its backbone's stem (lr x0.1 x0.7^4, held
    still in the first epoch) ends next to DINO's teacher, not to its own random start."""
    from shared.models.backbone import TimmBackbone
    from shared.run_loading import backbone_from_run

    dino_cmd, match_cmd = (
        next(c for c in RUNNABLE if c.text.startswith(start))
        for start in (
            "python ssl/run.py experiment=dino_resnet18 data/source=postings",
            "python product-matching/run.py experiment=matching_from_dino",
        )
    )
    # another seed than the matcher's: at this budget DINO's teacher is still almost its
    # random start, which with one seed would be the matcher's own random start as well
    run(with_budget(dino_cmd, list(dino_cmd.argv)) + ["seed=1"], workspace)
    dino_dir = newest_run(workspace, "ssl", "dino_resnet18")
    argv = substitute(match_cmd.argv, {"logs/ssl/dino_resnet18/runs/<time>": str(dino_dir)})
    match_cmd = dataclasses.replace(match_cmd, argv=tuple(argv))  # the user's own path typed
    out = run(with_budget(match_cmd, argv), workspace)
    teacher = backbone_from_run(dino_dir)
    logs = out.stdout + out.stderr
    assert f"backbone initialised from {teacher.source} of {teacher.checkpoint}" in logs
    assert teacher.source.endswith("DINOModule.teacher_backbone")
    tuned = backbone_from_run(newest_run(workspace, "product-matching", "matching_from_dino"))
    torch.manual_seed(0)
    fresh = TimmBackbone("test_resnet").model.state_dict()
    stem = [k for k, v in teacher.state.items() if not k.startswith("layer") and v.dim() == 4]
    for key in stem:
        to_teacher = (tuned.state[key] - teacher.state[key]).abs().max()
        to_fresh = (tuned.state[key] - fresh[key]).abs().max()
        assert to_teacher < 1e-3 and to_teacher < to_fresh / 10, key
