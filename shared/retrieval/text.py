"""Title embeddings: TF-IDF of word and character n-grams (the default, needs no model), or
a local transformer named by path (`shared.retrieval.title_encoder`).

Both are a `TitleEmbedder`: titles in, unit rows out (sparse for TF-IDF, dense for an
encoder), a plain-value state a run keeps; `shared.retrieval.combine` takes either.

Shopee titles are short, noisy and multilingual; word 1-2 grams catch shared words and
character 3-5 grams (inside word boundaries) catch misspellings, abbreviations and glued
words. The vectoriser is fitted on the training fold's titles only, so validation and test
titles never shape the vocabulary or its weights. Rows are L2-normalised, so the inner
product of two rows is their cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import scipy.sparse as sp

# What the fitted state holds per analyser; kept with the run (plain values, no pickles).
_STATE_KEYS = ("vocabulary", "idf")


def titles_by_id(source, ids: Sequence[str]) -> list[str] | None:
    """The source's title of each of `ids` (a store's rows are in their own order), or None
    when the source has no titles."""
    titles = getattr(source, "titles", None)
    if titles is None:
        return None
    by_id = dict(zip(source.ids, titles, strict=True))
    return [by_id[i] for i in ids]


def has_title(titles: Sequence[str | None]) -> np.ndarray:
    """bool [N]: the posting has a title with something other than spaces."""
    return np.array([bool(t and str(t).strip()) for t in titles], dtype=bool)


class TitleEmbedder(Protocol):
    """Titles -> unit rows [N, D] (zero rows: no title), and the plain values that rebuild it."""

    def transform(self, titles: Sequence[str | None]) -> sp.csr_matrix | np.ndarray: ...

    def state_dict(self) -> dict: ...


def title_embedder(encoder: str | None, train_titles: Sequence[str | None], device="cpu"):
    """`callbacks.matching_eval.text.encoder`: None fits the TF-IDF on `train_titles`;
    a path loads that local model folder (on `device`)."""
    if encoder is None:
        return TitleTfidf().fit(train_titles)
    from shared.retrieval.title_encoder import TitleEncoder

    return TitleEncoder(encoder, device)


def embedder_from_state(state: dict, device="cpu") -> TitleEmbedder:
    """The embedder a run kept (`state_dict`); a state without `kind` is a TF-IDF's."""
    if state.get("kind", "tfidf") == "tfidf":
        return TitleTfidf.from_state(state)
    from shared.retrieval.title_encoder import TitleEncoder

    return TitleEncoder.from_state(state, device)


def stack_rows(blocks: Sequence[sp.csr_matrix | np.ndarray]) -> sp.csr_matrix | np.ndarray:
    """Title vectors of several batches as one matrix, sparse or dense as they came."""
    if sp.issparse(blocks[0]):
        return sp.vstack(blocks, format="csr")
    return np.vstack(blocks)


class TitleTfidf:
    """Word (1-2) and char_wb (3-5) n-gram TF-IDF, each part L2-normalised, the two parts
    weighted equally and the whole row L2-normalised (a title with no known n-gram, or no
    title, is a zero row)."""

    def __init__(
        self,
        word_ngrams: tuple[int, int] = (1, 2),
        char_ngrams: tuple[int, int] = (3, 5),
        min_df: int = 1,
    ) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        common = {"lowercase": True, "sublinear_tf": True, "dtype": np.float32, "min_df": min_df}
        self.parts = {
            "word": TfidfVectorizer(analyzer="word", ngram_range=tuple(word_ngrams), **common),
            "char": TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(char_ngrams), **common),
        }
        self.params = {
            "word_ngrams": list(word_ngrams), "char_ngrams": list(char_ngrams), "min_df": min_df,
        }  # fmt: skip

    def fit(self, titles: Sequence[str | None]) -> TitleTfidf:
        """Learn vocabulary and idf from `titles` (the training fold's); empty ones skipped."""
        kept = [str(t) for t in titles if t and str(t).strip()]
        if not kept:
            raise ValueError("no training titles to fit the TF-IDF on (every title is empty)")
        for vectoriser in self.parts.values():
            vectoriser.fit(kept)
        return self

    @property
    def vocabulary(self) -> set[str]:
        return {term for v in self.parts.values() for term in v.vocabulary_}

    def transform(self, titles: Sequence[str | None]) -> sp.csr_matrix:
        """float32 CSR [N, D], unit rows (zero rows where no title / no known n-gram)."""
        text = ["" if t is None else str(t) for t in titles]
        x = sp.hstack([v.transform(text) for v in self.parts.values()], format="csr")
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        scale = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
        return sp.csr_matrix(sp.diags(scale) @ x, dtype=np.float32)

    def state_dict(self) -> dict:
        """Plain values (str, int, float lists) that rebuild the fitted vectoriser."""
        state = {"kind": "tfidf", "params": dict(self.params)}
        for name, v in self.parts.items():
            state[name] = {
                "vocabulary": {k: int(i) for k, i in v.vocabulary_.items()},
                "idf": [float(x) for x in v.idf_],
            }
        return state

    @classmethod
    def from_state(cls, state: dict) -> TitleTfidf:
        p = state["params"]
        out = cls(tuple(p["word_ngrams"]), tuple(p["char_ngrams"]), int(p["min_df"]))
        for name, v in out.parts.items():
            part = state[name]
            v.vocabulary_ = dict(part["vocabulary"])
            v.idf_ = np.asarray(part["idf"], dtype=np.float32)
        return out
