"""The searchable gallery: a FAISS inner-product index plus each row's posting, kept durable.

Rows are only ever appended, so row i names the same posting for the life of the gallery.
Searches and the in-memory part of an addition take the same lock: a search sees the index
either before or after an addition, never half of one (FAISS does not allow adding to an
index while it is searched). An exact search over a product gallery takes microseconds to
milliseconds, far less than decoding and embedding the query (see bench/serve_load.py).

With a `GalleryStore` (the service's default), every addition is first committed to SQLite,
postings and vectors in one transaction, and only then added to the index: a posting is
durable before anyone can see it, and an addition that fails leaves nothing behind. The
database is appended to, never rewritten, so an addition costs the same at any gallery size
(bench/gallery_add.py); the index is rebuilt from it at start-up.

A run trained with a title combination also gives the gallery its title embedder (`titles`):
each posting's title vector is kept in memory beside its image vector (made from the stored
title, so nothing more is stored), and `title_pairs` finds a query's candidates and their
similarities with the evaluation's own functions (`shared.retrieval.combine`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from shared.retrieval.combine import Pairs, TextCombination, Vectors, candidate_pairs
from shared.retrieval.search import as_float32_matrix, l2_normalize
from shared.retrieval.text import TitleEmbedder, has_title, stack_rows
from shared.retrieval.threshold import MAX_NEIGHBOURS

SCHEMA_VERSION = 1
WAL_LIMIT = 4 << 20  # bytes of write-ahead log kept between checkpoints (about 1000 pages)


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


class StorageFull(OSError):
    """The disk holding the gallery is full: the addition was rolled back, nothing kept."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


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
    chosen = np.flatnonzero(sims >= threshold)  # +inf: a title match of the union rule
    if not len(chosen) and min2 is not None and len(sims) and sims[0] >= min2:
        chosen = np.array([0])
    return chosen


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS postings (
    row INTEGER PRIMARY KEY,        -- the order of the FAISS rows
    posting_id TEXT NOT NULL UNIQUE,
    label_group TEXT,
    title TEXT,
    image TEXT NOT NULL,
    seed INTEGER NOT NULL,          -- 1: from the configured gallery, 0: added by POST /gallery
    embedding BLOB NOT NULL         -- float32 [dim], L2-normalised
);
"""


class GalleryStore:
    """Postings and their embeddings in one SQLite file (WAL, synchronous=FULL): one
    transaction per addition, durable when `append` returns. One process at a time: a
    second one is refused (an advisory lock on `<path>.lock`), as it would not see the
    first one's additions."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(
                f"gallery_db={str(self.path)!r} is in use by another service process: stop "
                "it first, or give this one its own gallery_db"
            ) from None
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit survives a power cut
            self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            self._db.executescript(SCHEMA)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "_db", None) is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta"))

    def count(self, seed: bool | None = None) -> int:
        where, args = ("", ()) if seed is None else (" WHERE seed = ?", (int(seed),))
        return self._db.execute(f"SELECT COUNT(*) FROM postings{where}", args).fetchone()[0]

    def rows(self, dim: int) -> tuple[list[Posting], np.ndarray]:
        """Every posting, in row order, and its embedding [N, dim]."""
        postings, blobs = [], []
        query = "SELECT posting_id, label_group, title, image, embedding FROM postings ORDER BY row"
        for pid, label, title, image, blob in self._db.execute(query):
            postings.append(Posting(pid, label, title, image))
            blobs.append(blob)
        x = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(postings), dim)
        return postings, x

    def images(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT image FROM postings")}

    def append(self, x: np.ndarray, postings: list[Posting], seed: bool = False) -> None:
        """Insert the rows in one committed transaction; nothing on failure."""
        self._transaction(lambda db: self._insert(db, x, postings, seed))

    def remove(self, ids: list[str]) -> None:
        self._transaction(
            lambda db: db.executemany(
                "DELETE FROM postings WHERE posting_id = ?", [(i,) for i in ids]
            )
        )

    def reseed(self, x: np.ndarray, postings: list[Posting], meta: dict[str, str]) -> None:
        """Replace the seed postings (those of the configured gallery) and set `meta`, in one
        transaction; the added postings stay."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM postings WHERE seed = 1")
            self._insert(db, x, postings, True)
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())

        self._transaction(work)
        self._shrink_wal()  # the whole gallery went through the log: fold it back

    def set_embeddings(self, x: np.ndarray, meta: dict[str, str]) -> None:
        """Replace every embedding (row order) and set `meta`: re-embedding with new weights."""

        def work(db: sqlite3.Connection) -> None:
            rows = [r[0] for r in db.execute("SELECT row FROM postings ORDER BY row")]
            db.executemany(
                "UPDATE postings SET embedding = ? WHERE row = ?",
                [(v.tobytes(), r) for v, r in zip(np.ascontiguousarray(x, np.float32), rows)],
            )
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())

        self._transaction(work)
        self._shrink_wal()

    @staticmethod
    def _insert(db, x, postings, seed: bool) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows = [
            (
                None,
                p.posting_id,
                p.label_group,
                p.title,
                p.image,
                int(seed),
                x[i].tobytes(),
            )
            for i, p in enumerate(postings)
        ]
        db.executemany("INSERT INTO postings VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def _transaction(self, work) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            work(db)
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.IntegrityError):
                raise DuplicatePostingError(f"posting_id already in the gallery: {exc}") from None
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
                isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            ):
                self._shrink_wal()
                raise StorageFull(
                    f"the disk holding gallery_db={str(self.path)!r} is full"
                ) from exc
            raise

    def _shrink_wal(self) -> None:
        """Fold the write-ahead log into the database and truncate it (best effort: on a
        full disk the database cannot grow, and the log keeps at most the failed
        transaction's frames, which the next transaction overwrites)."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass


class Gallery:
    """Postings and their L2-normalised embeddings, searchable by cosine similarity.

    `model_key` names the weights that produced the embeddings. With a `store`, additions
    are committed to it before they become searchable (see the module docstring). With
    `titles` (the run's title embedder), postings' titles are searchable too.
    """

    def __init__(
        self,
        dim: int,
        model_key: str,
        store: GalleryStore | None = None,
        titles: TitleEmbedder | None = None,
    ) -> None:
        self._index = faiss.IndexFlatIP(int(dim))
        self._postings: list[Posting] = []
        self._rows: dict[str, int] = {}
        self._lock = threading.Lock()  # the index, postings and title vectors in memory
        self._write_lock = threading.Lock()  # additions, one at a time, commit included
        self.model_key = model_key
        self.store = store
        self.titles = titles
        # Title vectors per addition, stacked at the first title search after one (a search
        # reads every row anyway), and whether each posting has a title.
        self._text_blocks: list[Vectors] = []
        self._text: Vectors | None = None
        self._titled = np.zeros(0, dtype=bool)

    @classmethod
    def from_store(
        cls, store: GalleryStore, dim: int, model_key: str, titles: TitleEmbedder | None = None
    ) -> Gallery:
        """The gallery held by `store` (its rows in order), appending to it from now on."""
        gallery = cls(dim, model_key, store, titles)
        postings, x = store.rows(dim)
        gallery._append_in_memory(x, postings)
        return gallery

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        with self._lock:
            return len(self._postings)

    @property
    def size_now(self) -> int:
        """The number of postings without waiting for the lock that a long search holds (a
        list's length is read atomically): for health checks on a busy service."""
        return len(self._postings)

    def get(self, posting_id: str) -> Posting | None:
        with self._lock:
            row = self._rows.get(posting_id)
            return None if row is None else self._postings[row]

    def __contains__(self, posting_id: str) -> bool:
        return self.get(posting_id) is not None

    def add(self, embeddings, postings: list[Posting]) -> int:
        """Append postings (all or none), durably first when there is a store; returns the
        new size. DuplicatePostingError when a posting_id is already in the gallery or given
        twice; StorageFull when the disk is full."""
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
        with self._write_lock:  # searches go on while an addition commits
            taken = [i for i in ids if i in self._rows]
            if taken:
                raise DuplicatePostingError(f"posting_id already in the gallery: {taken[:5]}")
            if self.store is not None:
                self.store.append(x, postings)
            try:
                return self._append_in_memory(x, postings)
            except BaseException:
                if self.store is not None:  # committed but not searchable: take it back
                    self.store.remove(ids)
                raise

    def _append_in_memory(self, x: np.ndarray, postings: list[Posting]) -> int:
        if self.titles is not None:
            text = [p.title for p in postings]
            vectors, titled = self.titles.transform(text), has_title(text)
        with self._lock:
            start = len(self._postings)
            if self.titles is not None:
                self._text_blocks.append(vectors)
                self._text = None
                self._titled = np.concatenate([self._titled, titled])
            self._index.add(x)
            self._postings.extend(postings)
            self._rows.update((p.posting_id, start + i) for i, p in enumerate(postings))
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

    @property
    def any_titled(self) -> bool:
        """Whether some posting has a title (and the gallery matches titles at all)."""
        return self.titles is not None and bool(self._titled.any())

    def title_pairs(
        self, queries, titles: list[str | None], combo: TextCombination, k: int
    ) -> tuple[Pairs, list[Posting]]:
        """Each query's candidates under `combo` (its image and title top-k lists, or the
        exact top-k of the weighted sum) with both similarities, as the evaluation finds
        them, and the postings their indices name."""
        if self.titles is None:
            raise RuntimeError("this gallery has no title vectors (no title embedder was given)")
        q = l2_normalize(as_float32_matrix(queries, "queries"))
        q_side = (q, self.titles.transform(titles), has_title(titles))
        with self._lock:
            n = len(self._postings)
            if n == 0:
                raise ValueError("the gallery is empty: nothing to match titles against")
            k = min(int(k), n)
            if self._text is None:
                self._text = stack_rows(self._text_blocks)
                self._text_blocks = [self._text]
            # The index's own rows, no copy: read only while the lock keeps additions out.
            image = faiss.rev_swig_ptr(self._index.get_xb(), n * self.dim).reshape(n, self.dim)
            image_knn = self._index.search(q, k) if combo.mode != "concat" else None
            pairs = candidate_pairs(
                combo, image, self._text, self._titled, k, image_knn, queries=q_side
            )
            return pairs, self._postings  # appended to only: its first n rows stay

    def embeddings(self) -> np.ndarray:
        """A copy of every stored embedding, row order = posting order."""
        with self._lock:
            return self._index.reconstruct_n(0, self._index.ntotal)

    def postings(self) -> list[Posting]:
        with self._lock:
            return list(self._postings)
