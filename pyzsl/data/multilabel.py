"""Multi-label zero-shot datasets for LESA and the other multi-label methods: label sets, label vectors, features.

:func:`load_multilabel_dataset` returns a :class:`MultilabelZSLData` for

- ``"nus-wide"``: 925 seen labels (the tags of ``TagList1k.txt`` that are not among the 81 concepts) and 81 unseen
  (``Concepts81.txt``), GloVe-300 vectors from the published pickle; ZSL over the 81, GZSL over the 1,006.
- ``"openimages"``: Open Images v4, 7,186 seen labels (``classes-trainable.txt``) and the 400 evaluated unseen
  (``top_400_unseen.csv``: indices into the 2,594 MIDs of ``unseen_labels.pkl``), named by ``class-descriptions.csv``;
  label vectors from a pickle in the published layout, or GloVe 6B 50-d averages of the names' words.
- ``"synthetic"``: :func:`pyzsl.data.synthetic.load_synthetic`, a seeded generator needing no files.

Files under ``data_root`` (``$PYZSL_DATA`` when ``data_root`` is None); the metadata files are the published ones,
the ``.h5`` feature stores (:mod:`pyzsl.data.store`) are the user's, e.g. written by ``python -m pyzsl.extract``::

    nus_wide/TagList1k.txt, nus_wide/Concepts81.txt, nus_wide/NUS_WIDE_pretrained_w2v_glove-wiki-gigaword-300
    nus_wide/train.h5   label columns named by tag: at least the 925 seen tags; its first 5,000 rows are the
                        validation split (as published), the rest the training split
    nus_wide/test.h5    label columns: the 81 concepts (human labels, AllLabels/) and the 925 seen tags
    openimages/classes-trainable.txt, openimages/class-descriptions.csv, openimages/unseen_labels.pkl,
    openimages/top_400_unseen.csv
    openimages/{train,val}.h5   label columns named by MID: at least the 7,186 seen MIDs (val: the validation set)
    openimages/test.h5          label columns: the 400 unseen MIDs and the 7,186 seen MIDs

Store columns are looked up by name (any order, extra columns ignored; a missing one is a clear error). In NUS-WIDE
75 concepts share their name with a tag: a column of that name holds the concept's human labels, and the tag is
not part of the protocol. Targets follow the store's convention: 1 positive, -1 negative, 0 unannotated (Open
Images' unverified labels). GZSL columns and vectors are ordered unseen first, as the published code orders them.
"""
from __future__ import annotations

import csv
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .._checks import check_distinct
from .store import FeatureStore

DATASETS = ("synthetic", "nus-wide", "openimages")
NUS_WIDE_VECTORS = "NUS_WIDE_pretrained_w2v_glove-wiki-gigaword-300"


@dataclass
class MultilabelZSLData:
    """A multi-label ZSL dataset: seen-label train/val splits, a GZSL test split, and the label vectors.

    ``train`` and ``val`` items are ``(features float32 [R, D], targets int8 [S])`` over the seen labels; ``test``
    items are ``(features, targets int8 [U + S])``, unseen columns first. ``seen_vectors`` [S, E] and
    ``unseen_vectors`` [U, E] are float32 with L2-normalised rows. ``seen_ids``/``unseen_ids`` are the keys of the
    labels' store columns when they differ from the display names (Open Images MIDs; names may repeat there).
    """

    name: str
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    seen_names: list[str]
    unseen_names: list[str]
    seen_vectors: torch.Tensor
    unseen_vectors: torch.Tensor
    feature_shape: tuple[int, ...]
    seen_ids: Optional[list[str]] = None
    unseen_ids: Optional[list[str]] = None

    def __post_init__(self):
        where = f"MultilabelZSLData({self.name!r})"
        for split, names, vecs, ids in (("seen", self.seen_names, self.seen_vectors, self.seen_ids),
                                        ("unseen", self.unseen_names, self.unseen_vectors, self.unseen_ids)):
            if not isinstance(vecs, torch.Tensor) or vecs.dim() != 2 or vecs.dtype != torch.float32:
                raise ValueError(f"{where}: {split}_vectors must be a float32 tensor [{len(names)}, E], got "
                                 f"{getattr(vecs, 'dtype', type(vecs).__name__)} of shape "
                                 f"{list(getattr(vecs, 'shape', []))}")
            if vecs.shape[0] != len(names):
                raise ValueError(f"{where}: {vecs.shape[0]} {split} label vectors for {len(names)} {split} labels")
            if ids is not None and len(ids) != len(names):
                raise ValueError(f"{where}: {len(ids)} {split}_ids for {len(names)} {split} labels")
            norms = vecs.norm(dim=1)
            if vecs.numel() and not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
                i = int((norms - 1).abs().argmax())
                raise ValueError(f"{where}: {split}_vectors rows must be L2-normalised, row {i} ({names[i]!r}) has "
                                 f"norm {float(norms[i]):.4g}")
        if self.seen_vectors.shape[1] != self.unseen_vectors.shape[1]:
            raise ValueError(f"{where}: seen vectors are {self.seen_vectors.shape[1]}-d, unseen vectors "
                             f"{self.unseen_vectors.shape[1]}-d")
        keys = (self.unseen_ids or self.unseen_names) + (self.seen_ids or self.seen_names)
        check_distinct(keys, "the unseen and seen labels", where)

    @property
    def gzsl_names(self) -> list[str]:
        """The 1,006 / 7,586 label names of the test targets' columns: unseen first."""
        return self.unseen_names + self.seen_names

    @property
    def gzsl_vectors(self) -> torch.Tensor:
        return torch.cat([self.unseen_vectors, self.seen_vectors])


def load_multilabel_dataset(name: str, data_root: str | Path | None = None, **options) -> MultilabelZSLData:
    """The multi-label ZSL dataset ``name`` (one of ``"synthetic"``, ``"nus-wide"``, ``"openimages"``).

    ``data_root`` defaults to ``$PYZSL_DATA`` (the synthetic dataset reads no files and ignores it). ``options`` go
    to :func:`load_nus_wide`, :func:`load_open_images` or :func:`pyzsl.data.synthetic.load_synthetic`.
    """
    if name == "synthetic":
        from .synthetic import load_synthetic
        return load_synthetic(**options)
    if name not in DATASETS:
        raise ValueError(f"load_multilabel_dataset: unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    root = resolve_data_root(data_root)
    return load_nus_wide(root, **options) if name == "nus-wide" else load_open_images(root, **options)


def resolve_data_root(data_root: str | Path | None) -> Path:
    if data_root is None:
        data_root = os.environ.get("PYZSL_DATA")
        if not data_root:
            raise ValueError("no data root: pass data_root (--data-root) or set PYZSL_DATA")
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} is not a directory")
    return root


def _required(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected the file {path}")
    return path


def _read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines (a trailing newline or a UTF-8 byte-order mark is no label)."""
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line]


def _normalised(vectors: np.ndarray, names: Sequence[str], what: str) -> torch.Tensor:
    v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    if not torch.isfinite(v).all():
        i = int((~torch.isfinite(v)).any(dim=1).nonzero()[0])
        raise ValueError(f"{what}: the vector of {names[i]!r} (row {i}) is not finite")
    norms = v.norm(dim=1)
    if (norms == 0).any():
        i = int((norms == 0).nonzero()[0])
        raise ValueError(f"{what}: the vector of {names[i]!r} (row {i}) is zero and cannot be L2-normalised")
    return v / norms[:, None]


def _load_pickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # the published pickles come from Python 2 as well as 3


# ---------------------------------------------------------------------------------------------------- NUS-WIDE


def nus_wide_labels(root: str | Path) -> tuple[list[str], list[str], torch.Tensor, torch.Tensor]:
    """(seen names [925], unseen names [81], seen vectors [925, 300], unseen vectors [81, 300]) from
    ``root/nus_wide``: seen = the tags of TagList1k that are not concepts, in TagList1k order, with their rows of
    the published GloVe-300 ``vecs_1k``; unseen = Concepts81 in file order with ``vecs_81``. Rows L2-normalised."""
    d = Path(root) / "nus_wide"
    where = "NUS-WIDE"
    tags = _read_lines(_required(d / "TagList1k.txt", where))
    concepts = _read_lines(_required(d / "Concepts81.txt", where))
    check_distinct(tags, "TagList1k.txt tags", where)
    check_distinct(concepts, "Concepts81.txt concepts", where)
    vecs = _load_pickle(_required(d / NUS_WIDE_VECTORS, where))
    if not isinstance(vecs, (list, tuple)) or len(vecs) != 2:
        raise ValueError(f"{where}: {d / NUS_WIDE_VECTORS} must hold [vecs_1k, vecs_81], got {type(vecs).__name__}")
    vecs_1k, vecs_81 = (np.asarray(v) for v in vecs)
    if vecs_1k.ndim != 2 or vecs_1k.shape[0] != len(tags):
        raise ValueError(f"{where}: {len(tags)} tags in TagList1k.txt but vecs_1k has shape {list(vecs_1k.shape)}")
    if vecs_81.ndim != 2 or vecs_81.shape[0] != len(concepts):
        raise ValueError(f"{where}: {len(concepts)} concepts in Concepts81.txt but vecs_81 has shape "
                         f"{list(vecs_81.shape)}")
    concept_set = set(concepts)
    seen_rows = [i for i, t in enumerate(tags) if t not in concept_set]
    seen = [tags[i] for i in seen_rows]
    return (seen, concepts, _normalised(vecs_1k[seen_rows], seen, f"{where} vecs_1k"),
            _normalised(vecs_81, concepts, f"{where} vecs_81"))


def _store(path: Path, what: str, **kwargs) -> FeatureStore:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected the feature store {path} (write it with python -m pyzsl.extract "
                                f"or pyzsl.data.store.FeatureStoreWriter; see pyzsl.data.multilabel for its columns)")
    return FeatureStore(path, **kwargs)


def _same_features(stores: dict[str, FeatureStore], where: str) -> tuple[int, ...]:
    shapes = {k: s.feature_shape for k, s in stores.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: the feature stores disagree on the feature shape: {shapes}")
    return next(iter(shapes.values()))


def load_nus_wide(root: str | Path, *, features_dir: str | Path | None = None, val_rows: int = 5000
                  ) -> MultilabelZSLData:
    """NUS-WIDE (see the module docstring for the files).

    Args:
        root: the data root holding ``nus_wide/``.
        features_dir: where ``train.h5`` and ``test.h5`` are; ``root/nus_wide`` by default.
        val_rows: the validation split is the first ``val_rows`` rows of ``train.h5`` (5,000, as published) and
            the training split the rest.
    """
    where = "NUS-WIDE"
    seen, unseen, seen_vecs, unseen_vecs = nus_wide_labels(root)
    fdir = Path(features_dir) if features_dir is not None else Path(root) / "nus_wide"
    train_all = _store(fdir / "train.h5", where, label_columns=seen)
    n = len(train_all)
    if isinstance(val_rows, bool) or not isinstance(val_rows, int) or not 1 <= val_rows < n:
        raise ValueError(f"{where}: val_rows must be an int in [1, {n}) ({fdir / 'train.h5'} has {n} rows), got "
                         f"{val_rows!r}")
    train, val = train_all.with_rows(range(val_rows, n)), train_all.with_rows(range(val_rows))
    test = _store(fdir / "test.h5", where, label_columns=unseen + seen)
    shape = _same_features({"train.h5": train, "test.h5": test}, where)
    return MultilabelZSLData("nus-wide", train, val, test, seen, unseen, seen_vecs, unseen_vecs, shape)


# ------------------------------------------------------------------------------------------------- Open Images


def open_images_labels(root: str | Path, *, word_vectors: str | Path | None = None, no_known_word: str = "random"
                       ) -> tuple[list[str], list[str], list[str], list[str], torch.Tensor, torch.Tensor]:
    """(seen MIDs [7186], unseen MIDs [400], seen names, unseen names, seen vectors, unseen vectors) from
    ``root/openimages``.

    The unseen labels are ``unseen_labels.pkl[top_400_unseen.csv]`` in the CSV's order. Vectors come from
    ``word_vectors``, a pickle ``(seen_vecs [7186, E], unseen_vecs [2594, E])`` aligned with
    ``classes-trainable.txt`` and ``unseen_labels.pkl`` (the published layout), or, when it is None, from GloVe 6B
    50-d averages of each class name's words (:func:`pyzsl.data.word_vectors.average_word_vectors`, which warns
    about out-of-vocabulary words and about names with no known word; ``no_known_word`` says what those get).
    Display names may repeat (e.g. two classes named "Ball"); MIDs may not. Rows L2-normalised.
    """
    d = Path(root) / "openimages"
    where = "Open Images"
    seen_ids = _read_lines(_required(d / "classes-trainable.txt", where))
    check_distinct(seen_ids, "classes-trainable.txt MIDs", where)
    all_unseen = np.asarray(_load_pickle(_required(d / "unseen_labels.pkl", where)), dtype=object)
    if all_unseen.ndim != 1:
        raise ValueError(f"{where}: unseen_labels.pkl must be a 1-D array of MIDs, got shape {list(all_unseen.shape)}")
    all_unseen_ids = [str(m) for m in all_unseen]
    check_distinct(all_unseen_ids, "unseen_labels.pkl MIDs", where)
    top = _read_lines(_required(d / "top_400_unseen.csv", where))
    try:
        top_idx = [int(x.split(",")[0]) for x in top]
    except ValueError as err:
        raise ValueError(f"{where}: top_400_unseen.csv must hold one integer index per line ({err})") from None
    bad = [i for i in top_idx if not 0 <= i < len(all_unseen_ids)]
    if bad:
        raise ValueError(f"{where}: top_400_unseen.csv indices must lie in [0, {len(all_unseen_ids)}) (the MIDs of "
                         f"unseen_labels.pkl), got {bad[:10]}")
    check_distinct([str(i) for i in top_idx], "top_400_unseen.csv indices", where)
    unseen_ids = [all_unseen_ids[i] for i in top_idx]
    overlap = sorted(set(unseen_ids) & set(seen_ids))
    if overlap:
        raise ValueError(f"{where}: {len(overlap)} unseen MIDs are also seen (classes-trainable.txt): {overlap[:10]}")

    with open(_required(d / "class-descriptions.csv", where), encoding="utf-8-sig", newline="") as f:
        descriptions = {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}
    missing = [m for m in seen_ids + unseen_ids if m not in descriptions]
    if missing:
        raise ValueError(f"{where}: {len(missing)} MIDs have no name in class-descriptions.csv: {missing[:10]}")
    seen_names = [descriptions[m] for m in seen_ids]
    unseen_names = [descriptions[m] for m in unseen_ids]

    if word_vectors is not None:
        vecs = _load_pickle(_required(Path(word_vectors), f"{where} word_vectors"))
        if not isinstance(vecs, (list, tuple)) or len(vecs) != 2:
            raise ValueError(f"{where}: {word_vectors} must hold (seen_vecs, unseen_vecs), got {type(vecs).__name__}")
        seen_v, unseen_v = (np.asarray(v) for v in vecs)
        if seen_v.ndim != 2 or seen_v.shape[0] != len(seen_ids):
            raise ValueError(f"{where}: {word_vectors}: seen_vecs has shape {list(seen_v.shape)}, expected one row "
                             f"per seen label ({len(seen_ids)})")
        if unseen_v.ndim != 2 or unseen_v.shape[0] != len(all_unseen_ids):
            raise ValueError(f"{where}: {word_vectors}: unseen_vecs has shape {list(unseen_v.shape)}, expected one "
                             f"row per MID of unseen_labels.pkl ({len(all_unseen_ids)})")
        unseen_v = unseen_v[top_idx]
    else:
        from .word_vectors import average_word_vectors
        both = average_word_vectors(seen_names + unseen_names, no_known_word=no_known_word)
        seen_v, unseen_v = both[:len(seen_names)], both[len(seen_names):]
    return (seen_ids, unseen_ids, seen_names, unseen_names, _normalised(seen_v, seen_names, f"{where} seen vectors"),
            _normalised(unseen_v, unseen_names, f"{where} unseen vectors"))


def load_open_images(root: str | Path, *, features_dir: str | Path | None = None,
                     word_vectors: str | Path | None = None, no_known_word: str = "random") -> MultilabelZSLData:
    """Open Images v4 (see the module docstring for the files and :func:`open_images_labels` for the vectors).

    ``features_dir`` holds ``train.h5``, ``val.h5`` and ``test.h5`` (``root/openimages`` by default), their label
    columns named by MID.
    """
    where = "Open Images"
    seen_ids, unseen_ids, seen_names, unseen_names, seen_vecs, unseen_vecs = open_images_labels(
        root, word_vectors=word_vectors, no_known_word=no_known_word)
    fdir = Path(features_dir) if features_dir is not None else Path(root) / "openimages"
    stores = {
        "train.h5": _store(fdir / "train.h5", where, label_columns=seen_ids),
        "val.h5": _store(fdir / "val.h5", where, label_columns=seen_ids),
        "test.h5": _store(fdir / "test.h5", where, label_columns=unseen_ids + seen_ids),
    }
    shape = _same_features(stores, where)
    return MultilabelZSLData("openimages", stores["train.h5"], stores["val.h5"], stores["test.h5"], seen_names,
                             unseen_names, seen_vecs, unseen_vecs, shape, seen_ids=seen_ids, unseen_ids=unseen_ids)
