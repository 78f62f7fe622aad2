"""The searchable gallery: a FAISS inner-product index plus each row's posting, one lock.

Rows are only ever appended, so row i names the same posting for the life of the gallery.
`add` and `search` take the same lock: a search sees the index either before or after an
add, never half of one (FAISS does not allow adding to an index while it is searched). An
exact search over a product gallery takes microseconds to milliseconds, far less than
decoding and embedding the query, so one lock costs the service no measurable throughput
(see bench/serve_load.py).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from shared.retrieval.search import as_float32_matrix, l2_normalize
from shared.retrieval.threshold import MAX_NEIGHBOURS

SAVE_VERSION = 1


@dataclass(frozen=True)
class Posting:
    posting_id: str
    label_group: str | None
    title: str | None
    image: str  # absolute path of the posting's image file (served by GET /gallery/{id}/image)


@dataclass(frozen=True)
class Hit:
    posting: Posting
    similarity: float


class DuplicatePostingError(ValueError):
    pass


def select_matches(
    sims: np.ndarray, threshold: float, min2: float | None, max_neighbours: int = MAX_NEIGHBOURS
) -> np.ndarray:
    """Positions (into one query's similarity-sorted row) of its predicted matches.

    The rule of `shared.retrieval.threshold.matches_from_threshold`, for a query that is not
    itself in the gallery: the best `max_neighbours` gallery items with similarity >=
    `threshold`; with `min2`, a query left with none keeps its nearest item when that one's
    similarity is >= `min2`.
    """
    sims = np.asarray(sims, dtype=np.float64)[:max_neighbours]
    chosen = np.flatnonzero(np.isfinite(sims) & (sims >= threshold))
    if not len(chosen) and min2 is not None and len(sims) and sims[0] >= min2:
        chosen = np.array([0])
    return chosen


class Gallery:
    """Postings and their L2-normalised embeddings, searchable by cosine similarity.

    `model_key` names the weights that produced the embeddings; a gallery saved to
    `index_path` (rewritten after every add) is only loaded back with the same key.
    """

    def __init__(self, dim: int, model_key: str, index_path: str | Path | None = None) -> None:
        self._index = faiss.IndexFlatIP(int(dim))
        self._postings: list[Posting] = []
        self._rows: dict[str, int] = {}
        self._lock = threading.Lock()
        self.model_key = model_key
        self.index_path = Path(index_path) if index_path else None

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        with self._lock:
            return len(self._postings)

    @property
    def size_now(self) -> int:
        """The number of postings without waiting for the lock that a long addition or search
        holds (a list's length is read atomically): for health checks on a busy service."""
        return len(self._postings)

    def get(self, posting_id: str) -> Posting | None:
        with self._lock:
            row = self._rows.get(posting_id)
            return None if row is None else self._postings[row]

    def __contains__(self, posting_id: str) -> bool:
        return self.get(posting_id) is not None

    def add(self, embeddings, postings: list[Posting]) -> int:
        """Append postings (all or none); returns the new size. DuplicatePostingError when
        a posting_id is already in the gallery or given twice."""
        x = l2_normalize(as_float32_matrix(embeddings, "embeddings"))
        if x.shape != (len(postings), self.dim):
            raise ValueError(
                f"{len(postings)} postings need embeddings [{len(postings)}, {self.dim}], "
                f"got {list(x.shape)}"
            )
        ids = [p.posting_id for p in postings]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise DuplicatePostingError(f"posting_id given more than once: {twice[:5]}")
        with self._lock:
            taken = [i for i in ids if i in self._rows]
            if taken:
                raise DuplicatePostingError(f"posting_id already in the gallery: {taken[:5]}")
            start = len(self._postings)
            self._index.add(x)
            self._postings.extend(postings)
            self._rows.update((pid, start + i) for i, pid in enumerate(ids))
            if self.index_path is not None:
                self._save_locked(self.index_path)
            return len(self._postings)

    def search(self, queries, k: int) -> list[list[Hit]]:
        """The `k` most similar postings of each query, best first (fewer in a smaller
        gallery). Queries are L2-normalised here, so similarities are cosines."""
        q = l2_normalize(as_float32_matrix(queries, "queries"))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the gallery {self.dim}")
        with self._lock:
            n = len(self._postings)
            if n == 0 or len(q) == 0:
                return [[] for _ in range(len(q))]
            sims, idx = self._index.search(q, min(int(k), n))
            return [
                [Hit(self._postings[j], float(s)) for s, j in zip(row_s, row_i) if j >= 0]
                for row_s, row_i in zip(sims, idx)
            ]

    def embeddings(self) -> np.ndarray:
        """A copy of every stored embedding, row order = posting order."""
        with self._lock:
            return self._index.reconstruct_n(0, self._index.ntotal)

    def postings(self) -> list[Posting]:
        with self._lock:
            return list(self._postings)

    # Persistence: one .npz (the serialised FAISS index + the postings as JSON), written to
    # a temporary file in the same folder and renamed into place.

    def save(self, path: str | Path) -> Path:
        with self._lock:
            return self._save_locked(Path(path))

    def _save_locked(self, path: Path) -> Path:
        meta = {
            "version": SAVE_VERSION,
            "model_key": self.model_key,
            "dim": self.dim,
            "postings": [asdict(p) for p in self._postings],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "wb") as fh:
            np.savez(fh, index=faiss.serialize_index(self._index), meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, model_key: str) -> Gallery:
        """A gallery saved by `save`; ValueError when it was built with other weights."""
        path = Path(path)
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            index = faiss.deserialize_index(data["index"])
        if meta.get("version") != SAVE_VERSION or meta.get("model_key") != model_key:
            raise ValueError(
                f"index_path={str(path)!r} holds embeddings of another model or version "
                f"({meta.get('model_key')!r}, version {meta.get('version')}), not of "
                f"{model_key!r}: delete it or choose another index_path"
            )
        postings = [Posting(**p) for p in meta["postings"]]
        if index.ntotal != len(postings):
            raise ValueError(
                f"index_path={str(path)!r} is inconsistent: {index.ntotal} vectors for "
                f"{len(postings)} postings"
            )
        gallery = cls(index.d, model_key, path)
        gallery._index = index
        gallery._postings = postings
        gallery._rows = {p.posting_id: i for i, p in enumerate(postings)}
        return gallery
