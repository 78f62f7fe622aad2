"""Lightning's WandbLogger, continuing the same W&B run when the run directory resumes."""

from __future__ import annotations

import secrets

from lightning.pytorch.loggers import WandbLogger as _WandbLogger

from shared.tracking.loggers import persistent_id


class WandbLogger(_WandbLogger):
    """`run_id_file`: where the W&B run id is kept. A restarted or requeued run (same run
    directory) reads it and resumes that W&B run instead of opening a second one."""

    def __init__(self, *args, run_id_file: str | None = None, **kwargs) -> None:
        if run_id_file and kwargs.get("id") is None and kwargs.get("version") is None:
            kwargs["id"] = persistent_id(run_id_file, lambda: secrets.token_hex(4))
            kwargs.setdefault("resume", "allow")
        super().__init__(*args, **kwargs)
