"""W&B extras offline: model and dataset artifacts, the examples table, the promotion step."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from shared.callbacks.wandb_extras import WandbExtrasCallback
from shared.tracking.examples import nearest_examples
from shared.tracking.wandb_offline import summarize
from tests.tracking.runs import TINY_DINO, run_in_process


def test_offline_run_has_artifacts_table_and_promotion(compose_cfg, tiny_data, wandb_offline):
    cfg = compose_cfg(
        "ssl",
        TINY_DINO
        + [
            "logger=[csv,wandb]",
            "callbacks=[ssl,wandb_extras]",
            "callbacks.wandb_extras.examples=4",
            "callbacks.wandb_extras.promote.registry=wandb-registry-model/reprmatch-test",
            "callbacks.wandb_extras.promote.min_value=0.0",
        ],
        data_dir=tiny_data,
    )
    run_in_process(cfg)
    run = Path(cfg.paths.output_dir)
    info = summarize(run)

    models = [a for a in info["artifacts"] if a["type"] == "model"]
    by_alias = {alias: a for a in models for alias in a["aliases"] if alias != "latest"}
    assert "best" in by_alias
    assert any(f.startswith("checkpoints/epoch_") for f in by_alias["best"]["files"])
    latest = models[-1]  # W&B moves `latest` to the newest version: last.ckpt
    assert "latest" in latest["aliases"] and "checkpoints/last.ckpt" in latest["files"]
    for model in models:  # each version is a loadable run directory
        assert {".hydra/config.yaml", "config_resolved.yaml"} <= set(model["files"])
    assert by_alias["best"]["metadata"]["monitor"] == "val/knn_top1@10"

    (dataset,) = [a for a in info["artifacts"] if a["type"] == "dataset"]
    assert dataset["name"].startswith("store-synthetic-")
    assert "meta.json" in dataset["files"] and dataset["references"]

    tables = {k: t for k, t in info["tables"].items() if "retrieval_examples" in k}
    assert tables, info["tables"].keys()
    table = next(iter(tables.values()))
    assert table["columns"][:5] == ["epoch", "query", "label", "top1_right", "hits"]
    assert {"n1", "n1_sim", "n1_right", "n5_right"} <= set(table["columns"])
    assert len(table["data"]) == 4
    sims = [row[table["columns"].index("n1_sim")] for row in table["data"]]
    assert all(-1.0001 <= s <= 1.0001 for s in sims)

    promotion = json.loads((run / "promotion.json").read_text())
    assert promotion["passes"] and promotion["action"].startswith("pending: offline")
    assert promotion["registry"] == "wandb-registry-model/reprmatch-test"


def test_extras_are_a_no_op_without_wandb(tmp_path):
    cb = WandbExtrasCallback()
    trainer = SimpleNamespace(
        loggers=[],
        is_global_zero=True,
        sanity_checking=False,
        current_epoch=0,
        max_epochs=1,
        checkpoint_callback=None,
        default_root_dir=str(tmp_path),
    )
    assert not cb._due(trainer)  # collects nothing
    cb.on_fit_start(trainer, None)
    cb.on_fit_end(trainer, None)
    assert list(tmp_path.iterdir()) == []


def split(labels, dim=8, seed=0, offset=0):
    centres = torch.nn.functional.normalize(
        torch.randn(10, dim, generator=torch.Generator().manual_seed(0)), dim=1
    )
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    emb = torch.nn.functional.normalize(
        centres[labels] + 0.05 * torch.randn(len(labels), dim, generator=g), dim=1
    )
    return {"embeddings": emb, "labels": labels, "index": torch.arange(len(labels)) + offset}


def test_nearest_examples_bank_and_self_search():
    query = split([0, 1, 2, 0, 1, 2], offset=100)
    bank = split([0, 0, 1, 1, 2, 2], seed=1)
    examples = nearest_examples(query, bank, n_queries=6, k=2)
    assert [len(ex.neighbours) for ex in examples] == [2] * 6
    assert all(all(ex.right) for ex in examples)  # tight clusters: neighbours share the label
    assert all(min(ex.neighbours) >= 0 and max(ex.neighbours) < 6 for ex in examples)

    own = nearest_examples(query, None, n_queries=6, k=3)
    for ex in own:  # self-search: never the query itself, the other same-label item first
        assert ex.query not in ex.neighbours
        assert ex.right[0] and ex.sims == sorted(ex.sims, reverse=True)
    again = nearest_examples(query, None, n_queries=3, k=1, seed=0)
    assert [e.query for e in again] == [e.query for e in nearest_examples(query, None, 3, 1)]
    assert np.all(np.diff([e.query for e in again]) > 0)
