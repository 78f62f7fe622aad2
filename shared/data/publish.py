"""Build a directory once, even when several processes ask for it at the same moment.

The jobs of a sweep (or the nodes of a multi-node run) often start together and need the
same image store or generated data set under a shared `data_dir`. `build_lock(target)` makes
them take turns: the first builds, the others wait and then find the finished directory and
reuse it. `publish(tmp, target)` moves a finished build into place by renames only, so a
reader never sees a half-written or half-deleted directory.

The lock is advisory: `fcntl.flock` on a hidden file beside the target, removed again when
the build is done. The kernel drops it when the holder dies, so a killed build never blocks
the next one. Where locking is not available (Windows, some network file systems) builds run
unlocked: `publish` still keeps every reader safe, at the cost of duplicate work.

`build_once` puts the pieces together; the store and the synthetic data sets use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def build_lock(target: str | Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock for building `target` (blocks while another holds it).

    Yields True when the lock is held. Then no one else is building `target`, and the
    temporary directories left by killed builds (`temp_dir`'s names) are removed. The lock
    file is removed on release, so nothing is left beside `target` after a build.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield False
        return
    path = lock_path(target)
    handle, locked = _acquire(path, target)
    try:
        if locked:
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                log.info("Removing %s, left by an interrupted build", stale)
                shutil.rmtree(stale, ignore_errors=True)
        yield locked
    finally:
        if locked:  # unlink before unlocking: a waiter then sees the file is gone and retries
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _acquire(path: Path, target: Path):
    """Open and lock `path`: (handle, True), or (handle, False) where locks do not work.

    A lock taken on a file that its previous holder has since unlinked guards nothing, so
    then the (new) file is opened and locked again.
    """
    while True:
        handle = open(path, "a+b")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("Waiting for another process to finish building %s", target)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # ENOLCK and the like: no locking on this file system
            log.warning("Cannot lock %s (%s); building without a lock", path, err)
            return handle, False
        try:
            same_file = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return handle, True
        handle.close()


def temp_dir(target: Path) -> Path:
    """A fresh name beside `target` to build into (unique across processes and hosts)."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sync_tree(root: Path) -> None:
    """fsync every file under `root`, then the folders (their entries)."""
    folders = [root]
    for path in root.rglob("*"):
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: Path, target: Path, is_complete: Callable[[Path], bool]) -> bool:
    """Rename the finished build `tmp` to `target`; True if ours is the copy now in place.

    An existing `target` is first renamed aside and deleted after the swap. If another
    process put a complete copy in place meanwhile (`is_complete(target)`), ours is dropped
    and False is returned.
    """
    tmp, target = Path(tmp), Path(target)
    if is_complete(target):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    sync_tree(tmp)  # on disk before the rename makes it visible: a crash leaves no torn copy
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        # A concurrent, unlocked writer got there first between our check and the rename.
        if not is_complete(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return True


def build_once(
    target: str | Path, is_complete: Callable[[Path], bool], fill: Callable[[Path], None]
) -> bool:
    """Build `target` with `fill(tmp_dir)` unless a complete copy is there (also one another
    process finished while we waited for the lock); True if this call built it. A failed
    or interrupted `fill` leaves nothing behind; it may raise to refuse the build."""
    target = Path(target)
    if is_complete(target):
        return False
    with build_lock(target):
        if is_complete(target):
            return False
        tmp = temp_dir(target)
        try:
            tmp.mkdir()
            fill(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return publish(tmp, target, is_complete)
