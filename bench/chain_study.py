"""Study: does DINO pretraining on the unlabeled catalog make a better matcher? (issue #17)

The README's chain, through the real command lines, once per seed:

  dino    python ssl/run.py experiment=dino_resnet18 data/source=postings
          (ResNet-18, 64 px, 16 epochs on the synthetic postings' images, no labels)
  random  python product-matching/run.py                      (a) the default recipe,
          DOLG + Sub-center ArcFace from random init, 16 epochs
  dino    python product-matching/run.py experiment=matching_from_dino
          backbone.init_from_run=<dino run>                   (b) the same, from the DINO
          teacher, fine-tuned gently (backbone lr x0.1, layer decay 0.7, 1 head-only epoch)
  titles  (b) + callbacks.matching_eval.text=TITLE_RULE     (c) image and title (TF-IDF)
          thresholds chosen jointly on validation; it also logs image-only and title-only F1
  probe   python -m shared.linear_probe --run-dir <dino run> [--which init]: linear top-1 of
          the trained teacher and of the untrained network; kNN top-1 from the DINO run's own
          results.json (trained and untrained)

Only the seed and the output folder (`hydra.run.dir`) are overridden (plus `--dino-override`
/ `--match-override` for a stated ablation, and tiny sizes under `--quick`). Every matching
run picks its checkpoint and threshold on fold 0 and is scored once on fold 1 (the test fold):
the figures are each run's `results.json` (`test`, and `untrained_test` for the network before
training). Wall and CPU time (user + system of the child process, `getrusage`) per stage.

Printed: mean ± std over seeds of test F1 / Recall@1 / mAP@R for (a), (b), (c), (c)'s
image-only and title-only F1, the paired differences (b) - (a) and (c) - (b), the DINO run's
kNN / linear top-1 against its untrained network, and the time per stage.

    python bench/chain_study.py --threads 2            # 3 seeds: ~20 min per seed on 2 cores
    python bench/chain_study.py --seeds 0 1 2 3 4
    python bench/chain_study.py --quick                # 1 seed, tiny data, 2 short epochs
    python bench/chain_study.py --dino-override trainer.max_epochs=48 --tag dino48
    python bench/chain_study.py --finetune-override module.backbone_lr_mult=1 --tag lr1

Writes bench/results/chain_study[_<tag>].json. Runs land in logs/bench/chain_study/seed<s>/
<stage>-<hash of its command>/, its wall / CPU record and log beside it; a stage whose record
exists is reused, not rerun (so an ablation reruns only the stages its overrides change).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _quality import default_threads, fmt, mean_std, print_table
from _report import write_results

from shared.atomic import write_text
from shared.run_loading import CHOSEN

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SSL, MATCHING = "ssl/run.py", "product-matching/run.py"

MATCH_KEYS = ["f1", "precision", "recall", "threshold", "recall@1", "map@r"]
TEXT_KEYS = ["f1", "f1_image", "f1_text", "recall@1", "map@r"]
KNN_KS = (10, 20, 100, 200)
STAGES = ["dino", "random", "from_dino", "titles", "probe", "probe_init"]
# (c)'s rule: with the synthetic titles of generator version 3 the weighted sum beats union on
# validation (bench/README 7., "Harder titles"; union suited the version-2 titles)
TITLE_RULE = "{mode:sum,weight:0.3}"

# --quick: the tests' tiny sizes (tests/pipelines.py). DINO and matching read the same
# postings and share the backbone group (init_from_run checks it).
QUICK_DATA = [
    "data.source.synthetic.num_families=6",
    "data.source.synthetic.groups_per_family=2",
    "data.source.synthetic.min_instances=4",
    "data.source.synthetic.max_instances=6",
    "data.source.synthetic.image_size=32",
    "data.image_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "backbone.name=test_resnet",
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=2",
    "trainer.check_val_every_n_epoch=1",
]
QUICK_DINO = [
    "data.val_fraction=0.3",
    "data.test_fraction=0.3",
    "module.out_dim=256",
    "module.hidden_dim=128",
    "module.bottleneck_dim=64",
    "module.multicrop.global_size=32",
    "module.multicrop.local_size=16",
    "module.multicrop.n_local=2",
]
QUICK_MATCH = ["module.model.local_dim=32", "module.model.global_dim=32",
               "module.model.embedding_dim=32"]  # fmt: skip


def stage_dir(base: Path, name: str, cmd: list[str]) -> Path:
    """`<base>/<name>-<hash of the command>`: a stage reruns only when its command changed
    (an ablation that changes DINO reruns DINO and what starts from it, nothing else)."""
    key = hashlib.sha1(json.dumps(cmd).encode()).hexdigest()[:8]
    return base / f"{name}-{key}"


def stage_commands(seed: int, base: Path, args) -> dict[str, tuple[list[str], Path]]:
    """(command line after `python`, run / record dir) of every stage of one seed."""
    quick = ["--epochs", "5"] if args.quick else []
    common = [f"seed={seed}", f"paths.data_dir={args.root}"]
    dino = [SSL, "experiment=dino_resnet18", "data/source=postings", *common,
            *(QUICK_DATA + QUICK_DINO if args.quick else []), *args.dino_override]  # fmt: skip
    dino_dir = stage_dir(base, "dino", dino)
    match = [MATCHING, *common, *(QUICK_DATA + QUICK_MATCH if args.quick else [])]
    from_dino = [*match, "experiment=matching_from_dino", f"backbone.init_from_run={dino_dir}"]
    matching = {
        "random": [*match, *args.match_override],
        "from_dino": [*from_dino, *args.match_override, *args.finetune_override],
        "titles": [
            *from_dino,
            f"callbacks.matching_eval.text={TITLE_RULE}",
            *args.match_override,
            *args.finetune_override,
        ],  # fmt: skip
    }
    probe = ["-m", "shared.linear_probe", "--run-dir", str(dino_dir), *quick]
    stages = {"dino": ([*dino, f"hydra.run.dir={dino_dir}"], dino_dir)}
    for name, cmd in matching.items():
        run_dir = stage_dir(base, name, cmd)
        stages[name] = ([*cmd, f"hydra.run.dir={run_dir}"], run_dir)
    # the probes write into the DINO run: their records sit beside it
    if args.no_titles:
        del stages["titles"]
    stages["probe"] = (probe, dino_dir)
    stages["probe_init"] = ([*probe, "--which", "init"], dino_dir)
    return stages


def cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(name: str, cmd: list[str], record: Path, env: dict[str, str]) -> dict:
    """Run one stage (unless `record` says it finished before); its wall and CPU seconds.
    Output goes to `<record dir>/<name>.log`; a failure raises with its tail."""
    if record.exists():
        return json.loads(record.read_text())
    record.parent.mkdir(parents=True, exist_ok=True)
    log = record.with_suffix(".log")
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT)  # fmt: skip
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"stage {name} failed (exit {proc.returncode}): {cmd}\n{tail}")
    timing = {"stage": name, "cmd": cmd, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    write_text(record, json.dumps(timing, indent=1))
    return timing


def test_figures(run_dir: Path, keys: list[str]) -> dict:
    """`results.json` of a run: test figures at the validation-chosen checkpoint and threshold,
    and the untrained network's; missing keys are an error naming the run."""
    res = json.loads((run_dir / "results.json").read_text())

    def pick(part: str) -> dict:
        scores = res[part]
        missing = [k for k in keys if f"test/{k}" not in scores]
        if missing:
            raise KeyError(f"{run_dir}/results.json {part} lacks {missing}: {sorted(scores)}")
        return {k: scores[f"test/{k}"] for k in keys}

    return {"test": pick("test"), "untrained": pick("untrained_test"),
            "validation": res["optimized_metric"], "chosen": res.get(CHOSEN),
            "run_dir": str(run_dir)}  # fmt: skip


def probe_figures(dino_dir: Path) -> dict:
    """kNN top-1 (the DINO run's test split, trained and untrained) and linear-probe top-1."""
    knn = test_figures(dino_dir, [f"knn_top1@{k}" for k in KNN_KS])
    linear = {
        which: json.loads((dino_dir / name).read_text())
        for which, name in (("trained", "linear_probe.json"), ("init", "linear_probe_init.json"))
    }
    out = {"trained": dict(knn["test"]), "init": dict(knn["untrained"]), "run_dir": str(dino_dir)}
    for which in ("trained", "init"):
        out[which]["linear_top1"] = linear[which]["test_top1"]
        out[which]["linear_lr"] = linear[which]["lr"]
    return out


def run_seed(seed: int, args, env: dict[str, str]) -> dict:
    stages = stage_commands(seed, args.work / f"seed{seed}", args)
    timing = {}
    for name, (cmd, run_dir) in stages.items():
        if args.only and name not in args.only:
            continue
        record = run_dir.with_name(f"{run_dir.name}.{name}.json")
        timing[name] = run_stage(name, cmd, record, env)
        print(f"seed {seed} {name}: {timing[name]['wall_s']:.0f} s wall, "
              f"{timing[name]['cpu_s']:.0f} s CPU", flush=True)  # fmt: skip
    if args.only:
        return {}
    record = {
        "seed": seed,
        "random": test_figures(stages["random"][1], MATCH_KEYS),
        "from_dino": test_figures(stages["from_dino"][1], MATCH_KEYS),
        "probe": probe_figures(stages["dino"][1]),
        "timing": {k: {"wall_s": v["wall_s"], "cpu_s": v["cpu_s"]} for k, v in timing.items()},
    }
    if "titles" in stages:
        # the title threshold of union sits in "chosen" (sum / concat have one threshold)
        record["titles"] = test_figures(stages["titles"][1], TEXT_KEYS + ["threshold"])
    return record


def summarise(per_seed: list[dict]) -> dict:
    """Mean ± std over seeds of every figure, and the paired differences."""

    def stat(get, keys) -> dict:
        return {k: mean_std([get(r)[k] for r in per_seed]) for k in keys}

    def diff(a: str, b: str, keys) -> dict:
        return {k: mean_std([r[a]["test"][k] - r[b]["test"][k] for r in per_seed]) for k in keys}

    probe_keys = [f"knn_top1@{k}" for k in KNN_KS] + ["linear_top1"]
    stages = per_seed[0]["timing"]
    time_keys = ["wall_s", "cpu_s"]
    chain = ("dino", "from_dino")  # what a user runs: pretrain, then fine-tune
    methods = [m for m in ("random", "from_dino", "titles") if m in per_seed[0]]
    out = {
        "untrained_matching": stat(lambda r: r["random"]["untrained"], MATCH_KEYS),
        "untrained_from_dino": stat(lambda r: r["from_dino"]["untrained"], MATCH_KEYS),
        "random": stat(lambda r: r["random"]["test"], MATCH_KEYS),
        "from_dino": stat(lambda r: r["from_dino"]["test"], MATCH_KEYS),
        "from_dino_minus_random": diff("from_dino", "random", MATCH_KEYS),
        "probe_trained": stat(lambda r: r["probe"]["trained"], probe_keys),
        "probe_init": stat(lambda r: r["probe"]["init"], probe_keys),
        "timing": {s: stat(lambda r, s=s: r["timing"][s], time_keys) for s in stages},
        # the best validation F1 of each run: what an ablation may be chosen on
        "val_f1": {
            m: mean_std([r[m]["validation"]["val/f1"] for r in per_seed]) for m in methods
        },  # fmt: skip
        "chain_cpu_s": mean_std([sum(r["timing"][s]["cpu_s"] for s in chain) for r in per_seed]),
        "chain_wall_s": mean_std([sum(r["timing"][s]["wall_s"] for s in chain) for r in per_seed]),
    }
    if "titles" in methods:
        out["titles"] = stat(lambda r: r["titles"]["test"], TEXT_KEYS)
        out["titles_minus_from_dino"] = diff("titles", "from_dino", ["f1", "recall@1", "map@r"])
    return out


def print_report(summary: dict, per_seed: list[dict]) -> None:
    n = len(per_seed)
    keys, labels = ["f1", "recall@1", "map@r"], ["F1", "Recall@1", "mAP@R"]
    rows = [
        ("untrained (random init)", summary["untrained_matching"]),
        ("untrained (DINO teacher)", summary["untrained_from_dino"]),
        ("(a) random init", summary["random"]),
        ("(b) DINO init", summary["from_dino"]),
    ]
    diffs = [("(b) - (a)", summary["from_dino_minus_random"])]
    titles = "titles" in summary
    if titles:
        rows.append(("(c) (b) + titles", summary["titles"]))
        diffs.append(("(c) - (b)", summary["titles_minus_from_dino"]))
    print_table(f"Matching, test fold, mean ± std over {n} seed(s)", rows, keys, labels, 1, 3)
    print_table("paired by seed", diffs, keys, labels, 1, 3)
    if titles:
        row, keys3 = [("(c)", summary["titles"])], ["f1_image", "f1_text", "f1"]
        print_table("(c): F1 of images only, titles only, combined", row, keys3,
                    ["image", "title", "combined"], 1, 3)  # fmt: skip
    pk = [f"knn_top1@{k}" for k in KNN_KS] + ["linear_top1"]
    print_table("DINO run, test split top-1 (%)",
                [("untrained", summary["probe_init"]), ("DINO", summary["probe_trained"])],
                pk, [f"kNN k={k}" for k in KNN_KS] + ["linear"], 100, 1)  # fmt: skip
    print_table("time per stage (s)", list(summary["timing"].items()), ["wall_s", "cpu_s"],
                ["wall", "CPU"], 1, 0)  # fmt: skip
    print("validation F1 (fold 0, best checkpoint): " + ", ".join(
        f"{m} {fmt(v, 1, 3)}" for m, v in summary["val_f1"].items()))  # fmt: skip
    print(f"chain (DINO + fine-tune) CPU {fmt(summary['chain_cpu_s'], 1, 0)} s, "
          f"wall {fmt(summary['chain_wall_s'], 1, 0)} s per seed")  # fmt: skip
    for r in per_seed:
        f = [f"({c}) {r[m]['test']['f1']:.3f}" for c, m in zip("abc", summary["val_f1"])]
        print(f"seed {r['seed']}: F1 " + " ".join(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="OMP_NUM_THREADS of every run (default: its own, else 1)")  # fmt: skip
    ap.add_argument("--root", type=Path, default=REPO / "data", help="data dir (paths.data_dir)")
    ap.add_argument("--work", type=Path, default=REPO / "logs" / "bench" / "chain_study",
                    help="run dirs, one per seed and stage command")  # fmt: skip
    ap.add_argument("--tag", default="", help="names the JSON of an ablation")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", nargs="*", choices=STAGES, default=[],
                    help="run only these stages (a later full call reuses them)")  # fmt: skip
    ap.add_argument("--no-titles", action="store_true", help="skip (c), e.g. in an ablation")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, tiny data")
    ap.add_argument("--dino-override", nargs="*", default=[], help="extra overrides for DINO")
    ap.add_argument("--match-override", nargs="*", default=[],
                    help="extra overrides for all three matching runs")  # fmt: skip
    ap.add_argument("--finetune-override", nargs="*", default=[],
                    help="extra overrides for the DINO-initialised runs (b), (c) only")  # fmt: skip
    args = ap.parse_args()
    suffix = f"_{args.tag}" if args.tag else ""
    if args.quick:
        args.seeds = [0]
    args.out = args.out or RESULTS / f"chain_study{suffix}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1",
           "HYDRA_FULL_ERROR": "1"}  # fmt: skip
    t0 = time.perf_counter()
    per_seed = [run_seed(seed, args, env) for seed in args.seeds]
    if args.only:
        return  # some stages only (e.g. started beside others): no summary
    summary = summarise(per_seed)
    print_report(summary, per_seed)
    write_results(args, time.perf_counter() - t0, {"summary": summary, "per_seed": per_seed})


if __name__ == "__main__":
    main()
