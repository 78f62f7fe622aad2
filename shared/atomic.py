"""Write a file so that readers, and a crash, only ever see the old or the complete new one.

`atomic_write(path)` opens a temporary file beside `path` (same folder, so same file system:
the final step is a rename, never a copy), and on a clean exit flushes it, fsyncs it, renames
it over `path` and fsyncs the folder. On an error the temporary file is removed; a process
killed meanwhile leaves one behind under a name `remove_stale_temps` recognises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


def temp_name(path: Path) -> Path:
    """A name beside `path` no other process or host will pick: `.<name>.tmp-<pid>-<random>`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """`with atomic_write(p, "w") as f: f.write(...)`: `p` appears complete or not at all."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    sync_folder(path.parent)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def sync_folder(folder: str | Path) -> None:
    """fsync a folder, so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | Path, pattern: str = "*") -> list[Path]:
    """Remove the temporary files `atomic_write` left for `folder/<pattern>` when its process
    was killed. Call it where no other writer of those files can be running (at start-up)."""
    removed = []
    for stale in Path(folder).glob(f".{pattern}.tmp-*"):
        if stale.is_file():
            log.info("Removing %s, left by an interrupted write", stale)
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
            removed.append(stale)
    return removed
