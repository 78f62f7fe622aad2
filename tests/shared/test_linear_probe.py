"""Linear probe: reaches a known answer, picks its lr on validation, runs on a run directory."""

from __future__ import annotations

import json

import pytest
import torch

from shared.linear_probe import linear_probe, main, standardise, top1, train_linear_heads
from tests.tracking.conftest import dino_run, tiny_data  # noqa: F401

# 5 class centres in 16-d, far apart compared with the 0.3 noise around them.
CENTRES = torch.randn(5, 16, generator=torch.Generator().manual_seed(10)) * 3


def separable(n: int, seed: int):
    """Points around the centres, labelled by their centre: nearest-centre, a linear rule,
    labels them all correctly."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(CENTRES), (n,), generator=gen)
    return CENTRES[y] + 0.3 * torch.randn(n, CENTRES.shape[1], generator=gen), y


def splits(n_train=300, n_val=100, n_test=100):
    data = {
        "train": separable(n_train, 1),
        "val": separable(n_val, 2),
        "test": separable(n_test, 3),
    }
    return {k: v[0] for k, v in data.items()}, {k: v[1] for k, v in data.items()}


def test_linearly_separable_features_are_probed_perfectly():
    features, labels = splits()
    # the known answer: the generating directions classify every split without error
    for name in features:
        dists = torch.cdist(features[name], CENTRES)
        assert torch.equal(dists.argmin(1), labels[name])
    result = linear_probe(features, labels, 5, lrs=[0.01, 0.1], epochs=10, batch_size=64)
    assert result["val_top1"] == 1.0 and result["test_top1"] == 1.0
    assert result["n"] == {"train": 300, "val": 100, "test": 100}


def test_the_lr_is_chosen_on_validation_not_on_test():
    """Test labels made to favour the smallest lr (they are its own predictions), val labels
    the true ones: the probe keeps the lr val prefers and scores only that one on test."""
    features, labels = splits()
    lrs, kw = [1e-7, 0.1], dict(epochs=5, batch_size=64)
    x = standardise(features)
    heads = train_linear_heads(x["train"], labels["train"], 5, lrs, **kw)  # same seed
    with torch.no_grad():
        labels["test"] = heads[0](x["test"]).argmax(1)
    val = [top1(h, x["val"], labels["val"]) for h in heads]
    test = [top1(h, x["test"], labels["test"]) for h in heads]
    assert val[1] > val[0] and test[0] == 1.0 > test[1]  # the two splits disagree

    result = linear_probe(features, labels, 5, lrs=lrs, **kw)
    assert result["lr"] == 0.1 and result["chosen_on"] == "val"
    assert result["val_top1"] == val[1] and result["test_top1"] == test[1]
    assert result["val_top1_per_lr"] == {"1e-07": val[0], "0.1": val[1]}


def test_no_test_split_and_bad_lrs():
    features, labels = splits()
    del features["test"], labels["test"]
    assert linear_probe(features, labels, 5, lrs=[0.1], epochs=2)["test_top1"] is None
    with pytest.raises(ValueError, match="positive learning rates"):
        linear_probe(features, labels, 5, lrs=[0.0])


@pytest.mark.slow
def test_command_on_a_run_directory(dino_run, capsys):  # noqa: F811
    """`python -m shared.linear_probe --run-dir <run>`: writes linear_probe.json with the
    val-chosen lr; its figures equal the probe recomputed from the run's own embeddings."""
    from shared.embedding import embed_rows
    from shared.linear_probe import split_rows
    from shared.run_loading import load_run

    result = main(["--run-dir", str(dino_run.run_dir), "--lrs", "0.01", "0.1", "--epochs", "5"])
    written = json.loads((dino_run.run_dir / "linear_probe.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert "chosen on val" in capsys.readouterr().out

    run = load_run(dino_run.run_dir)
    dm = run.datamodule
    rows = split_rows(dm)
    assert set(rows) == {"train", "val", "test"}
    # the probe's features, recomputed one image at a time
    features = {
        k: torch.stack([run.module.embed(dm.store.images[[r]])[0].detach() for r in v])
        for k, v in rows.items()
    }
    labels = {k: dm.store.labels[torch.as_tensor(v)] for k, v in rows.items()}
    for k, v in rows.items():
        batched = torch.from_numpy(embed_rows(run.module, dm.store.images, v))
        assert torch.allclose(batched, features[k], atol=1e-5)
    assert [len(labels[k]) for k in ("train", "val", "test")] == [
        len(dm.train_indices),
        len(dm.val_indices),
        len(dm.test_indices),
    ]
    again = linear_probe(features, labels, dm.num_classes, lrs=[0.01, 0.1], epochs=5)
    assert {k: written[k] for k in again} == json.loads(json.dumps(again))
    assert written["val_top1"] == max(written["val_top1_per_lr"].values())


@pytest.mark.slow
def test_init_probes_the_untrained_network_of_the_run(dino_run):  # noqa: F811
    """--which init: the network the run's config and seed build, not the trained weights."""
    from shared.linear_probe import initial_module
    from shared.run_loading import load_run

    run = load_run(dino_run.run_dir)
    fresh, again = initial_module(run.config), initial_module(run.config)
    trained = run.module.state_dict()
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, again.state_dict()[name])  # seeded: the same every time
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    result = main(["--run-dir", str(dino_run.run_dir), "--which", "init", "--epochs", "2"])
    assert result["checkpoint"].startswith("init")
    assert (dino_run.run_dir / "linear_probe_init.json").is_file()
