"""Checkpoint writes: staged beside the checkpoint (never in $TMPDIR), renamed into place, so a
kill mid-write leaves the previous checkpoint whole and the next start cleans up."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from shared.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints
from shared.resume import resume_checkpoint

ROOT = Path(__file__).resolve().parents[2]

# Saves a complete last.ckpt, then a second one whose write is killed (SIGKILL) after half
# of its bytes reached the file: what a preemption or an OOM kill during a save does.
KILLED_SAVE = textwrap.dedent(
    """
    import io, os, signal, sys
    import torch
    import shared.checkpoint_io as cio

    path = sys.argv[1]
    io_ = cio.AtomicCheckpointIO()
    io_.save_checkpoint({"epoch": 1, "w": torch.arange(200_000.0)}, path)
    real_save = torch.save

    def save_half_then_die(obj, handle):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: buffer.tell() // 2])
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    cio.torch.save = save_half_then_die
    io_.save_checkpoint({"epoch": 2, "w": torch.zeros(200_000)}, path)
    """
)


@pytest.fixture
def other_tmpdir(tmp_path):
    """$TMPDIR on another file system when we may mount one (a small tmpfs), else a folder."""
    folder = tmp_path / "node-local-tmp"
    folder.mkdir()
    mounted = os.geteuid() == 0 and (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)]).returncode
        == 0
    )
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_save_killed_midway_keeps_the_previous_checkpoint_and_the_next_start_cleans_up(
    tmp_path, other_tmpdir
):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    last = folder / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(other_tmpdir), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(last)], env=env)
    assert proc.returncode == -signal.SIGKILL

    assert torch.load(last, weights_only=True)["epoch"] == 1  # the previous one, whole
    (partial,) = folder.glob(".last.ckpt.tmp-*")  # the half-written file stayed beside it
    assert 0 < partial.stat().st_size < last.stat().st_size
    assert list(other_tmpdir.iterdir()) == []  # nothing staged in $TMPDIR

    assert resume_checkpoint(None, tmp_path / "run") == str(last)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # leftover removed


def test_the_trainer_writes_its_checkpoints_through_it(tmp_path, monkeypatch):
    staging = tmp_path / "tmpdir"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    use_atomic_checkpoints(trainer)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    trainer.fit(BoringModel())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 1 and saved["global_step"] == 4
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=1-step=4.ckpt",
        "last.ckpt",
    ]
    assert list(staging.iterdir()) == []


def test_a_checkpoint_writer_the_user_chose_is_kept():
    class MyIO(AtomicCheckpointIO):
        pass

    chosen = MyIO()
    trainer = L.Trainer(plugins=[chosen], logger=False, enable_progress_bar=False)
    use_atomic_checkpoints(trainer)
    assert trainer.strategy.checkpoint_io is chosen


def test_other_ranks_pick_the_same_fallback_without_touching_files(tmp_path, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"epoch": 3}, folder / "epoch_003.ckpt")
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    (folder / ".last.ckpt.tmp-1-abc").write_bytes(b"partial")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert resume_checkpoint(None, tmp_path) == str(folder / "epoch_003.ckpt")
    assert (folder / "last.ckpt").exists() and (folder / ".last.ckpt.tmp-1-abc").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert resume_checkpoint(None, tmp_path) == str(folder / "epoch_003.ckpt")
    assert not (folder / "last.ckpt").exists() and not (folder / ".last.ckpt.tmp-1-abc").exists()
    # a rank starting after rank 0 set last.ckpt aside still resumes from the same file
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert resume_checkpoint(None, tmp_path) == str(folder / "epoch_003.ckpt")
