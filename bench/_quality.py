"""What the two quality-at-a-fixed-budget benchmarks share (quality_dino.py, quality_matching.py).

"Ours" is always the run users get: the pipeline's primary config composed with Hydra's compose
API, a few keys overridden (seed, epochs, no logger, outputs in a temporary folder), then
`shared.train.run(cfg)`. `RunProbe`, added to that config as one more callback, watches the run
without changing it: the store rows of every training batch (so the peer's loop can replay
exactly the same batches), a digest of the first batch's uint8 pixels, the network's weights
before the first step and the metrics of every evaluation. The peer's loop then starts from
those weights and those batches, and the `identity` record says what was checked.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from lightning import Callback
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
RESULTS = REPO / "bench" / "results"


# ---- ours: the pipeline's own config and run ------------------------------------------------
def compose(config_name: str, overrides: list[str], out_dir: Path, data_dir: Path, conf=CONF):
    """The config `python <pipeline>/run.py <overrides>` would run, writing under `out_dir`
    (`conf`: another checkout's conf/ folder, for that checkout's code)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import shared.config  # noqa: F401  (resolvers, PROJECT_ROOT)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` interpolations read it
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir / "run")
        cfg.paths.log_dir = str(out_dir / "logs")
        cfg.paths.data_dir = str(data_dir)
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


def run_overrides(seed: int, epochs: int, eval_every: int) -> list[str]:
    """Keys every "ours" run overrides, plus the probe callback."""
    return [
        f"seed={seed}",
        f"trainer.max_epochs={epochs}",
        f"trainer.check_val_every_n_epoch={eval_every}",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "+callbacks.quality_probe._target_=_quality.RunProbe",
    ]


def eval_every(default_every: int, epochs: int) -> int:
    """The pipeline's validation interval when it ends on the last epoch, else every epoch:
    Lightning validates only when (epoch + 1) % interval == 0, and the final weights must be
    evaluated."""
    return default_every if epochs % default_every == 0 else 1


class RunProbe(Callback):
    """Records what a run trained on and how it scored, without touching it.

    The last instance is `RunProbe.last` (Hydra builds it from the config, so the benchmark
    cannot hold it otherwise).
    """

    last: RunProbe | None = None

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []  # [epoch][step] -> store rows
        self.first_batch_digest: str | None = None
        self.init_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []  # one entry per evaluation, init included
        self.test: dict[str, float] = {}
        self.data: dict[str, str] = {}
        self._bar = None
        RunProbe.last = self

    @staticmethod
    def _metrics(trainer, prefix: str) -> dict[str, float]:
        return {
            k.removeprefix(prefix): float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(prefix)
        }

    def on_train_start(self, trainer, pl_module):
        # DINO: the student backbone (the teacher starts as its copy); metric learning: the
        # embedding net (backbone + DOLG), built in `setup` from the data's class count.
        net = (
            pl_module.student_backbone if hasattr(pl_module, "student_backbone") else pl_module.net
        )
        self.init_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self.data = split_digests(trainer.datamodule)
        total = int(trainer.estimated_stepping_batches)
        self._bar = tqdm(total=total, desc="ours", unit="step", leave=False)

    def on_train_epoch_start(self, trainer, pl_module):
        self.batches.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[-1].append(batch["index"].tolist())
        if self.first_batch_digest is None:
            # The uint8 batch, or, when the loader already turned it into DINO `views`
            # (module.augment_in=loader), the store rows those views were cut from.
            images = batch.get("images")
            if images is None:
                images = trainer.datamodule.store.images[batch["index"]]
            self.first_batch_digest = digest(images)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._bar is not None:
            self._bar.update()

    def on_train_end(self, trainer, pl_module):
        if self._bar is not None:
            self._bar.close()

    def on_validation_end(self, trainer, pl_module):
        fitting = trainer.state.fn == "fit"
        epoch = trainer.current_epoch + 1 if fitting else 0  # epochs trained so far
        self.history.append({"epoch": epoch, **self._metrics(trainer, "val/")})

    def on_test_end(self, trainer, pl_module):
        self.test = self._metrics(trainer, "test/")


class EpochTimer(Callback):
    """Clocks a run's training epochs without touching them: from the epoch's start (before
    the loader's workers start) to the end of its last step, and from the start of its first
    step to the end of its last; validation and checkpointing come after and are not counted.

    The last instance is `EpochTimer.last` (Hydra builds it from the config).
    """

    last: EpochTimer | None = None

    def __init__(self) -> None:
        self.epochs: list[dict] = []  # per epoch: epoch_s, steps_s, steps, images
        EpochTimer.last = self

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0, self._first, self._end, self._steps, self._images = (
            time.perf_counter(), None, None, 0, 0)  # fmt: skip

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._first is None:
            self._first = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._end = time.perf_counter()
        self._steps += 1
        self._images += len(batch["index"])

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({"epoch_s": self._end - self._t0, "steps_s": self._end - self._first,
                            "steps": self._steps, "images": self._images})  # fmt: skip


def run_ours(cfg) -> tuple[RunProbe, float]:
    """`shared.train.run(cfg)`, the probe's record and the wall time. Lightning's result
    tables (printed by validate / test) go to /dev/null; progress bars (stderr) stay."""
    import contextlib
    import time

    from shared.train import run

    RunProbe.last = None
    t0 = time.perf_counter()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        run(cfg)
    return RunProbe.last, time.perf_counter() - t0


def quiet_lightning() -> None:
    """Lightning's start-up banners would bury the tables; warnings still show."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # lightly's DINOProjectionHead uses the old weight_norm; the warning says nothing new.
    warnings.filterwarnings(
        "ignore", message=".*weight_norm.* is deprecated", category=FutureWarning
    )


# ---- the peer's loop: same rows, same evaluation --------------------------------------------
def digest(t: torch.Tensor) -> str:
    """A short content hash of a tensor (shape, dtype and bytes)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha1(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def peer_record(history, t0, losses, first_digest, init_by_seed, dm) -> dict:
    """What a peer's training loop reports: its evaluations, time, steps (one loss each),
    first and last loss, and the identity checks' inputs."""
    return {
        "history": history,
        "time_s": round(time.perf_counter() - t0, 1),
        "steps": len(losses),
        "loss_first_last": [losses[0], losses[-1]],
        "first_batch_digest": first_digest,
        "init_identical_by_seed": init_by_seed,
        "data": split_digests(dm),
    }


def split_digests(dm) -> dict[str, str]:
    """Digests of the train / evaluation rows and of their pixels: same data on both sides."""
    train, val = (torch.as_tensor(np.asarray(x)) for x in (dm.train_indices, dm.val_indices))
    return {
        "store": str(dm.store.path),
        "train_rows": digest(train),
        "eval_rows": digest(val),
        "train_pixels": digest(dm.store.images[train]),
        "eval_pixels": digest(dm.store.images[val]),
    }


@torch.no_grad()
def embed_loader(embed, loader) -> dict[str, torch.Tensor]:
    """What `EmbeddingModule.validation_step` returns, over a whole loader, gathered."""
    parts = [(embed(b["images"]), b["labels"], b["index"]) for b in loader]
    return {
        "embeddings": torch.cat([p[0] for p in parts]).float(),
        "labels": torch.cat([p[1] for p in parts]),
        "index": torch.cat([p[2] for p in parts]),
    }


def evaluate_with(callback, data: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """The pipeline's own evaluator callback scoring the peer's embeddings (nothing written)."""
    trainer = types.SimpleNamespace(sanity_checking=False, testing=False, is_global_zero=True)
    return {k: float(v) for k, v in callback.evaluate(data, trainer).items()}


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))


def default_threads() -> int:
    """OMP_NUM_THREADS when set (the shared machine's rule), else 1."""
    return int(os.environ.get("OMP_NUM_THREADS", "1") or 1)


# ---- summaries, table, chart ----------------------------------------------------------------
def best_of(history: list[dict], key: str) -> dict:
    """The first evaluation after training started with the highest `key` (what a
    `ModelCheckpoint(monitor=key, mode="max")` keeps: a later tie does not replace it)."""
    trained = [h for h in history if h["epoch"] > 0]
    best = trained[0]
    for h in trained[1:]:
        if h[key] > best[key]:
            best = h
    return best


def method_record(history: list[dict], keys: list[str], select: str, **extra) -> dict:
    """One method's result for one seed: its untrained (epoch 0), final and best evaluations
    (best by `select`), and every evaluation, each reduced to `keys`."""
    best = best_of(history, select)

    def pick(h: dict) -> dict:
        return {k: h[k] for k in keys}

    return {
        "final": pick(history[-1]),
        "best": pick(best),
        "best_epoch": best["epoch"],
        "init": pick(history[0]),
        **extra,
        "history": [{"epoch": h["epoch"], **pick(h)} for h in history],
    }


def same_untrained(a: dict, b: dict, keys: list[str], tol: float = 1e-6) -> bool:
    """Both networks scored alike before training (Lightning logs float32: tolerance)."""
    return all(abs(a["init"][k] - b["init"][k]) <= tol for k in keys)


def paired_records(seed: int, cfg, probe, ours_s: float, peer: dict, keys, select: str):
    """(ours, peer, identity) records of one seed: both methods' evaluations and the checks
    that the peer's loop saw what ours saw (store, split, pixels, first batch, steps, the
    same untrained scores)."""
    ours = method_record(probe.history, keys, select, seed=seed, time_s=round(ours_s, 1),
                         test={k: probe.test.get(k) for k in keys})  # fmt: skip
    theirs = method_record(peer["history"], keys, select, seed=seed, time_s=peer["time_s"],
                           loss_first_last=peer["loss_first_last"])  # fmt: skip
    identity = {
        "seed": seed,
        "same_store_split_and_pixels": probe.data == peer["data"],
        "same_first_batch_pixels": probe.first_batch_digest == peer["first_batch_digest"],
        "same_steps": sum(map(len, probe.batches)) == peer["steps"],
        "same_untrained_eval": same_untrained(ours, theirs, keys),
        "init_identical_by_seed": peer["init_identical_by_seed"],
        "eval_every_n_epochs": int(cfg.trainer.check_val_every_n_epoch),
        "store": probe.data.get("store"),
    }
    return ours, theirs, identity


def base_parser(doc: str, out_name: str, root_help: str) -> argparse.ArgumentParser:
    """The flags both quality scripts take: seeds, epochs, threads, data root, output."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=16, help="the budget (conf: 16)")
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="torch intra-op threads (default OMP_NUM_THREADS, else 1)")  # fmt: skip
    ap.add_argument("--root", type=Path, default=REPO / "data", help=root_help)
    ap.add_argument("--out", type=Path, default=RESULTS / out_name)
    return ap


def run_seeds(args, run_seed, peer: str, key: str) -> tuple[dict, float]:
    """Every seed of `args.seeds` through `run_seed(seed, args, tmp)`, in a temporary folder;
    returns {"ours": [...], peer: [...], "identity": [...]} and the seconds taken."""
    set_threads(args.threads)
    quiet_lightning()
    t_start = time.perf_counter()
    results = {"ours": [], peer: [], "identity": []}
    with tempfile.TemporaryDirectory(prefix=f"quality_{peer}_") as tmp:
        for seed in tqdm(args.seeds, desc="seeds", unit="seed"):
            records = run_seed(seed, args, Path(tmp))
            for name, value in zip(results, records):
                results[name].append(value)
            ours, theirs = records[0], records[1]
            tqdm.write(
                f"seed {seed}: {key} ours {ours['final'][key]:.4f}, {peer} "
                f"{theirs['final'][key]:.4f}, untrained {ours['init'][key]:.4f}"
            )
    return results, time.perf_counter() - t_start


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value), plus the count."""
    vals = [float(v) for v in values]
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def summarise(per_seed: list[dict], part: str, keys: list[str]) -> dict[str, dict]:
    """{metric: mean/std/n} of `per_seed[i][part][metric]`."""
    return {k: mean_std([r[part][k] for r in per_seed]) for k in keys}


def paired_difference(ours: list[dict], peer: list[dict], part: str, keys: list[str]) -> dict:
    """Mean and std over seeds of ours - peer (both ran on the same batches of each seed)."""
    return {k: mean_std([a[part][k] - b[part][k] for a, b in zip(ours, peer)]) for k in keys}


def report(args, elapsed: float, part: str, peer: str, results: dict, table: dict, **versions):
    """Summaries, the three tables, the JSON (bench/_report.py) and the bar chart of one part.

    `results` holds per-seed lists `ours`, `<peer>` and `identity`; `table` the metric keys,
    their labels, the display scale and digits, the chart's metric keys and the title.
    """
    from _report import write_results

    keys, labels = table["keys"], table["labels"]
    runs = {"ours": results["ours"], peer: results[peer]}
    summary = {"untrained": summarise(results["ours"], "init", keys)}
    for name, per_seed in runs.items():
        summary[name] = {p: summarise(per_seed, p, keys) for p in ("final", "best")}
    summary[f"ours_minus_{peer}"] = {
        p: paired_difference(results["ours"], results[peer], p, keys) for p in ("final", "best")
    }
    n = len(results["ours"])
    show = (table["scale"], table["digits"])
    final_rows = [
        ("untrained", summary["untrained"]),
        ("ours", summary["ours"]["final"]),
        (peer, summary[peer]["final"]),
    ]
    print_table(
        f"{table['title']}{table.get('unit', '')}: final weights after {args.epochs} "
        f"epoch(s), mean ± std over {n} seed(s)",
        final_rows,
        keys,
        labels,
        *show,
    )
    print_table(
        "best evaluation (the checkpoint ours keeps)",
        [("ours", summary["ours"]["best"]), (peer, summary[peer]["best"])],
        keys,
        labels,
        *show,
    )
    diff = summary[f"ours_minus_{peer}"]
    print_table(
        f"ours - {peer}, paired by seed (same batches)",
        [("final", diff["final"]), ("best", diff["best"])],
        keys,
        labels,
        *show,
    )
    identity = results["identity"]
    ok = all(all(v for k, v in i.items() if k.startswith("same_")) for i in identity)
    print(f"identity checks {'passed' if ok else 'FAILED'}: {identity}")
    print(f"total {elapsed:.0f} s")
    out = {
        "part": part,
        "peer": peer,
        "metrics": keys,
        "summary": summary,
        "per_seed": runs,
        "identity": identity,
        "identity_ok": ok,
    }
    write_results(args, elapsed, out, **versions)
    chart = [keys.index(k) for k in table["chart"]]
    bar_chart(
        args.out.with_suffix(".png"),
        f"{table['title']}, {args.epochs} epoch(s), {n} seed(s), final weights",
        final_rows,
        [keys[i] for i in chart],
        [labels[i] for i in chart],
        table.get("ylabel", ""),
    )
    return out


def fmt(stat: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    m, s = stat["mean"] * scale, stat["std"] * scale
    return f"{m:.{digits}f} ± {s:.{digits}f}" if stat["n"] > 1 else f"{m:.{digits}f}"


def print_table(title: str, rows: list[tuple[str, dict]], keys, labels, scale, digits) -> None:
    """One line per method: mean ± std over seeds of each metric."""
    width = max(len(r[0]) for r in rows)
    cols = [max(len(lab), 14) for lab in labels]
    print(f"\n{title}")
    print(f"{'method':<{width}} " + " ".join(f"{lab:>{c}}" for lab, c in zip(labels, cols)))
    for name, summary in rows:
        cells = [fmt(summary[k], scale, digits) if k in summary else "-" for k in keys]
        print(f"{name:<{width}} " + " ".join(f"{v:>{c}}" for v, c in zip(cells, cols)))


def bar_chart(
    path: Path, title: str, rows: list[tuple[str, dict]], keys, labels, ylabel: str
) -> Path:
    """Grouped bars (one group per metric, one bar per method), error bars = std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.6 + 1.5 * len(keys), 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    for i, (name, summary) in enumerate(rows):
        x = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(keys))]
        means = [summary[k]["mean"] if k in summary else math.nan for k in keys]
        stds = [summary[k]["std"] if k in summary else 0.0 for k in keys]
        ax.bar(x, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(range(len(keys)), labels)
    ax.set_ylabel(ylabel)
    tops = [s[k]["mean"] + s[k]["std"] for _, s in rows for k in keys if k in s]
    ax.set_ylim(0, min(1.0, 1.15 * max(tops, default=1.0)) or 1.0)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path
