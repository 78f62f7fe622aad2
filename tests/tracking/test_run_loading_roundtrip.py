"""`load_run` rebuilds what run() trained, and says what is missing when it cannot."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from shared.run_loading import load_run


def stored_images(run, n=16):
    run.datamodule.setup()
    return torch.as_tensor(run.datamodule.store.images[:n])


@pytest.mark.parametrize("name", ["dino_run", "matching_run"])
def test_load_run_gives_the_live_modules_embeddings(request, name):
    tiny = request.getfixturevalue(name)
    run = load_run(tiny.run_dir)
    assert run.checkpoint.parent.name == "checkpoints"
    images = stored_images(run)
    live = tiny.module.eval()
    with torch.no_grad():
        expected = live.embed(images.to(live.device)).cpu()
    got = run.module.embed(images)
    assert got.shape == expected.shape and got.shape[0] == len(images)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert torch.allclose(got.norm(dim=1), torch.ones(len(images)), atol=1e-5)
    assert run.config.paths.output_dir  # resolved, no ${hydra:...} left


def copy_run(tiny, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(tiny.run_dir, dst)
    return dst


def test_load_run_without_checkpoint_says_so(dino_run, tmp_path):
    run_dir = copy_run(dino_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(FileNotFoundError, match="has no checkpoint.*last.ckpt"):
        load_run(run_dir)


def test_load_run_without_config_says_so(dino_run, tmp_path):
    run_dir = copy_run(dino_run, tmp_path)
    shutil.rmtree(run_dir / ".hydra")
    with pytest.raises(FileNotFoundError, match=r"not a run directory.*\.hydra/config\.yaml"):
        load_run(run_dir)


def edit_config(run_dir, edit):
    for name in (".hydra/config.yaml", "config_resolved.yaml"):
        path = run_dir / name
        cfg = yaml.safe_load(path.read_text())
        edit(cfg)
        path.write_text(yaml.safe_dump(cfg))


def test_config_from_another_version_names_what_is_missing(dino_run, tmp_path):
    run_dir = copy_run(dino_run, tmp_path)
    edit_config(run_dir, lambda cfg: cfg["module"].pop("_target_"))
    with pytest.raises(ValueError, match="no module._target_.*another version"):
        load_run(run_dir)


def test_config_naming_a_class_that_moved(dino_run, tmp_path):
    run_dir = copy_run(dino_run, tmp_path)
    edit_config(run_dir, lambda cfg: cfg["module"].update(_target_="selfsup.old.DINOModule"))
    with pytest.raises(ImportError, match="selfsup.old.DINOModule.*another version"):
        load_run(run_dir)


def test_checkpoint_from_another_version_names_the_parameters(dino_run, tmp_path):
    run_dir = copy_run(dino_run, tmp_path)
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        state["hyper_parameters"]["renamed_option"] = 1
        state["hyper_parameters"].pop("backbone")
        torch.save(state, ckpt)
    unknown_and_missing = r"\['renamed_option'\] are unknown.*\['backbone'\] are missing"
    with pytest.raises(ValueError, match=unknown_and_missing):
        load_run(run_dir)


@pytest.mark.parametrize(
    "where", [("data",), ("data", "source"), ("module", "backbone")], ids=lambda w: ".".join(w)
)
def test_a_crafted_config_builds_nothing_outside_the_project(dino_run, tmp_path, where):
    """A downloaded run directory is data: a `_target_` that would write a file (or run any
    other code) is refused before anything is built."""
    run_dir = copy_run(dino_run, tmp_path)
    victim = tmp_path / "written_by_the_config.txt"

    def craft(cfg):
        node = cfg
        for key in where:
            node = node.setdefault(key, {})
        node.clear()
        node.update({"_target_": "pathlib.Path.write_text", "self": str(victim), "data": "x"})

    edit_config(run_dir, craft)
    with pytest.raises(ValueError, match="pathlib.Path.write_text.*refusing to load it"):
        load_run(run_dir)
    assert not victim.exists()
