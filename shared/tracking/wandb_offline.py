"""Read an offline W&B run without the network: its artifacts, tables and history keys.

`wandb.Api` needs the server, so an offline run (before `wandb sync`) can only be inspected
from its folder: `files/` holds the media (tables as `*.table.json`) and `run-<id>.wandb` is
a LevelDB-style log of protobuf `Record`s (the format `wandb sync` replays).

    python -m shared.tracking.wandb_offline logs/ssl/dino/runs/<time>/wandb/offline-run-*
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

_BLOCK = 32768  # LevelDB log block size
_HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version, and also a chunk header's size
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator:
    """Every `wandb_internal_pb2.Record` of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a .wandb transaction log (header {data[:4]!r})")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            parts = [chunk]
        elif kind in (_FIRST, _MIDDLE):
            parts = ([] if kind == _FIRST else parts) + [chunk]
            continue
        elif kind == _LAST:
            parts.append(chunk)
        else:  # zero padding at the end of a block or file
            continue
        record = pb.Record()
        record.ParseFromString(b"".join(parts))
        yield record


def offline_run_dir(path: str | Path) -> Path:
    """The `offline-run-*` folder itself, or the newest one under a run or wandb/ folder."""
    path = Path(path)
    if list(path.glob("run-*.wandb")):
        return path
    found = sorted(path.glob("offline-run-*")) or sorted(path.glob("wandb/offline-run-*"))
    if not found:
        raise FileNotFoundError(f"no offline W&B run under {path}")
    return found[-1]


def summarize(path: str | Path) -> dict:
    """Artifacts (type, name, aliases, files, metadata), use_artifact records, tables and
    history keys of an offline run."""
    run_dir = offline_run_dir(path)
    artifacts, used, keys = [], [], set()
    for record in records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "artifact":
            a = record.artifact
            artifacts.append(
                {
                    "type": a.type,
                    "name": a.name,
                    "aliases": list(a.aliases),
                    "files": [e.path for e in a.manifest.contents],
                    "references": [e.ref for e in a.manifest.contents if e.ref],
                    "metadata": json.loads(a.metadata) if a.metadata else {},
                }
            )
        elif kind == "use_artifact":
            used.append(record.use_artifact.name)
        elif kind == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    tables = {}
    for file in sorted((run_dir / "files").rglob("*.table.json")):
        key = str(file.relative_to(run_dir / "files" / "media" / "table").parent / file.name)
        tables[key] = json.loads(file.read_text())
    return {
        "run_dir": str(run_dir),
        "artifacts": artifacts,
        "used_artifacts": used,
        "tables": tables,
        "history_keys": sorted(keys),
    }


if __name__ == "__main__":
    info = summarize(sys.argv[1] if len(sys.argv) > 1 else ".")
    for a in info["artifacts"]:
        print(f"{a['type']:>10}  {a['name']}  {a['aliases']}  {a['files'][:4]}")
    for key, table in info["tables"].items():
        print(f"{'table':>10}  {key}  {len(table['data'])} rows x {len(table['columns'])} cols")
