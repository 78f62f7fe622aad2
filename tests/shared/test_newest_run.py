"""The one "newest run" finder (the service's default model, the notebooks' default run)."""

from shared.run_loading import newest_run


def make_run(root, name, config=True, checkpoint=True):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    if config:
        (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    if checkpoint:
        (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    return run


def test_the_newest_complete_run_by_its_timestamp_name(tmp_path):
    runs = tmp_path / "logs" / "ssl"
    assert newest_run(runs, "*/runs/*") is None  # no folder yet
    old = make_run(runs / "dino" / "runs", "2026-01-01_00-00-00")
    make_run(runs / "dino" / "runs", "2026-03-01_00-00-00", checkpoint=False)  # not trained
    make_run(runs / "dolg" / "runs", "2026-04-01_00-00-00", config=False)  # not a run
    assert newest_run(runs, "*/runs/*") == old
    newer = make_run(runs / "simclr" / "runs", "2026-02-01_00-00-00")
    old.touch()  # modification times do not decide: the run's name does
    assert newest_run(runs, "*/runs/*") == newer
    assert newest_run(runs / "dino" / "runs") == old
