"""Title embeddings from a local Hugging Face model folder the user names by path.

Nothing is downloaded and nothing in the folder runs: the tokenizer and `AutoModel` load with
`local_files_only=True`, `trust_remote_code=False` and weights-only unpickling. A title is the
mean of its token states over the attention mask (the sentence-transformers recipe),
L2-normalised, so the inner product of two rows is their cosine similarity.

A run keeps the folder's path and a hash of the files that decide the vectors (config,
tokenizer, weights); inference and the service refuse a folder whose hash differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shared.retrieval.text import has_title

KEY = "callbacks.matching_eval.text.encoder"
# Files of a model folder that decide its vectors: config, tokenizer and weights.
_HASHED = (".json", ".txt", ".model", ".safetensors", ".bin")


def folder_hash(path: str | Path) -> str:
    """sha256 over the names and bytes of the folder's config, tokenizer and weight files."""
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix in _HASHED):
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            f"{KEY} is set, and title encoders need the transformers package: "
            "pip install transformers"
        ) from None
    return transformers


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{KEY}={str(path)!r}: no such folder")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{KEY}={str(path)!r} is not a Hugging Face model folder (no config.json): "
            "expected a folder written by save_pretrained"
        )


class TitleEncoder:
    """A local transformer as title embedder: float32 [N, D] unit rows (zero rows for postings
    without a title). `batch_size` titles per forward pass, on `device`."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        expected_sha256: str | None = None,
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        _check_folder(self.path)
        self.sha256 = folder_hash(self.path)
        if expected_sha256 is not None and self.sha256 != expected_sha256:
            raise ValueError(
                f"{KEY}={str(self.path)!r}: the folder's files changed since the run was "
                "trained (its config, tokenizer or weight files hash differently), so its "
                "title vectors would not be the ones the thresholds were chosen on: restore "
                "the folder, or retrain"
            )
        hf = _transformers()
        safe = {"local_files_only": True, "trust_remote_code": False}
        try:
            self.tokenizer = hf.AutoTokenizer.from_pretrained(self.path, **safe)
            self.model = hf.AutoModel.from_pretrained(self.path, weights_only=True, **safe)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{KEY}={str(self.path)!r}: not a loadable model ({exc})") from exc
        self.model.eval().to(device)
        self.device, self.batch_size = torch.device(device), int(batch_size)
        limit = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_length = min(int(self.tokenizer.model_max_length), int(limit))

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def transform(self, titles: Sequence[str | None]) -> np.ndarray:
        titled = np.flatnonzero(has_title(titles))
        out = np.zeros((len(titles), self.dim), dtype=np.float32)
        for lo in range(0, len(titled), self.batch_size):
            rows = titled[lo : lo + self.batch_size]
            batch = self.tokenizer(
                [str(titles[i]) for i in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            mean = (states * mask).sum(1) / mask.sum(1).clamp_min(1)
            out[rows] = torch.nn.functional.normalize(mean.float(), dim=1).cpu().numpy()
        return out

    def state_dict(self) -> dict:
        """The folder and its hash: the weights stay in the folder, not in the run."""
        return {"kind": "encoder", "path": str(self.path), "sha256": self.sha256}

    @classmethod
    def from_state(cls, state: dict, device: str | torch.device = "cpu") -> TitleEncoder:
        """The run's encoder, refused when its folder is gone or its files changed."""
        return cls(state["path"], device, expected_sha256=state["sha256"])
