"""The pyzsl HDF5 feature store: the one on-disk layout every part of pyzsl reads and writes.

One ``.h5`` file per split, holding

- ``features``: [N, R, D] region maps (``layout="regions"``, e.g. 196 x 512 for VGG19 conv5_4) or [N, D]
  (``layout="pooled"``), float16 or float32, chunked by whole rows;
- ``labels``: [N, L] int8, 1 = positive, -1 = negative, 0 = unannotated (L may be 0);
- ``label_names``: [L] variable-length UTF-8 strings naming the label columns (distinct);
- ``image_ids``: [N] variable-length UTF-8 strings;

and the file attributes ``pyzsl_store`` (format version, 1), ``layout``, ``rows_written`` (rows [0, rows_written)
are complete: extraction appends rows and advances it after each flush, so a killed run resumes where it stopped),
and optionally ``backbone`` and ``source``.

:class:`FeatureStoreWriter` creates (or resumes) a file, :class:`FeatureStore` reads one as a
``torch.utils.data.Dataset`` whose h5py handle is opened lazily in each process, so it works with DataLoader
workers, and :func:`write_store` writes small in-memory data in one call.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .._checks import check_distinct

FORMAT_VERSION = 1
LAYOUTS = ("regions", "pooled")
REQUIRED_KEYS = ("features", "labels", "label_names", "image_ids")

# Chunks of whole rows of about this many bytes: big enough for sequential reads, small enough that a random row
# read does not drag in tens of megabytes.
_FEATURE_CHUNK_BYTES = 4 << 20
_LABEL_CHUNK_BYTES = 1 << 20
# Label values are scanned in blocks of about this many bytes at open.
_LABEL_SCAN_BYTES = 64 << 20

PathLike = Union[str, os.PathLike]


def _rows_per_chunk(num_rows: int, row_bytes: int, budget: int, cap: int) -> int:
    return max(1, min(num_rows, cap, budget // max(row_bytes, 1)))


def _layout_for(feature_shape: tuple, where: str) -> str:
    if len(feature_shape) == 2:
        return "regions"
    if len(feature_shape) == 1:
        return "pooled"
    raise ValueError(f"{where}: feature_shape must be (R, D) for region maps or (D,) for pooled features, got "
                     f"{feature_shape}")


def _check_label_names(label_names, where: str) -> list[str]:
    if isinstance(label_names, str):
        raise TypeError(f"{where}: label_names must be a sequence of strings, got a single string {label_names!r}")
    names = list(label_names)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"{where}: label_names[{i}] must be a str, got {type(name).__name__} {name!r}")
    check_distinct(names, "label_names", where)
    return names


def _as_numpy(x, name: str, where: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{where}: {name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _first_bad_label(block: np.ndarray) -> Optional[tuple[int, int, int]]:
    """(row, column, value) of the first entry of a 2-D integer block outside {-1, 0, 1}, or None."""
    if block.size == 0 or (block.min() >= -1 and block.max() <= 1):  # min/max run ~10x faster than a mask
        return None
    bad = (block < -1) | (block > 1)
    r, c = np.argwhere(bad)[0]
    return int(r), int(c), int(block[r, c])


class FeatureStoreWriter:
    """Writes a feature store row block by row block, so an interrupted extraction can resume.

    Args:
        path: the ``.h5`` file. It must not exist unless ``resume=True``.
        num_rows: N, the number of images the finished file holds.
        feature_shape: the shape of one image's features, ``(R, D)`` or ``(D,)``.
        label_names: the L label column names (distinct; may be empty).
        dtype: ``torch.float16`` (half the disk) or ``torch.float32``.
        layout: ``"regions"`` or ``"pooled"``; by default read off ``feature_shape`` (2-D or 1-D), and it must agree.
        attrs: extra file attributes, e.g. ``{"backbone": "vgg19", "source": "NUS-WIDE Train"}``.
        resume: reopen an existing file and continue after its ``rows_written`` rows; its shapes, dtype, layout,
            label names and the given ``attrs`` must match (a clear error otherwise). A missing file is created.

    Each :meth:`write` appends rows, advances ``rows_written`` and flushes, so a kill loses at most that block.
    """

    def __init__(self, path: PathLike, *, num_rows: int, feature_shape: Sequence[int], label_names: Sequence[str],
                 dtype: torch.dtype = torch.float16, layout: Optional[str] = None, attrs: Optional[dict] = None,
                 resume: bool = False):
        where = "FeatureStoreWriter"
        self._file: Optional[h5py.File] = None
        self.path = Path(path)
        if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
            raise ValueError(f"{where}: num_rows must be an int >= 1, got {num_rows!r}")
        self.num_rows = int(num_rows)
        self.feature_shape = tuple(int(s) for s in feature_shape)
        if any(s < 1 for s in self.feature_shape):
            raise ValueError(f"{where}: feature_shape must have positive sizes, got {self.feature_shape}")
        inferred = _layout_for(self.feature_shape, where)
        if layout is not None and layout != inferred:
            raise ValueError(f"{where}: layout={layout!r} disagrees with feature_shape {self.feature_shape} "
                             f"(a {len(self.feature_shape)}-D row shape is {inferred!r}; expected one of {LAYOUTS})")
        self.layout = inferred
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"{where}: dtype must be torch.float16 or torch.float32, got {dtype}")
        self.np_dtype = np.float16 if dtype == torch.float16 else np.float32
        self.label_names = _check_label_names(label_names, where)
        attrs = dict(attrs or {})
        reserved = {"pyzsl_store", "layout", "rows_written"} & attrs.keys()
        if reserved:
            raise ValueError(f"{where}: attrs may not set the reserved attribute(s) {sorted(reserved)}")

        if resume and self.path.exists():
            self._file = h5py.File(self.path, "r+")
            try:
                self._check_resumable(attrs)
            except Exception:
                self._file.close()
                raise
        else:
            if self.path.exists():
                raise FileExistsError(f"{where}: {self.path} already exists; pass resume=True to continue it, or "
                                      f"remove it to start over")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.path, "w-")
            self._create(attrs)

    def _create(self, attrs: dict) -> None:
        f, n, L = self._file, self.num_rows, len(self.label_names)
        row_bytes = int(np.prod(self.feature_shape)) * np.dtype(self.np_dtype).itemsize
        chunk = _rows_per_chunk(n, row_bytes, _FEATURE_CHUNK_BYTES, 64)
        f.create_dataset("features", shape=(n, *self.feature_shape), dtype=self.np_dtype,
                         chunks=(chunk, *self.feature_shape))
        if L:
            f.create_dataset("labels", shape=(n, L), dtype=np.int8,
                             chunks=(_rows_per_chunk(n, L, _LABEL_CHUNK_BYTES, 4096), L), fillvalue=0)
        else:
            f.create_dataset("labels", shape=(n, 0), dtype=np.int8)
        f.create_dataset("label_names", data=np.array(self.label_names, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("image_ids", shape=(n,), dtype=h5py.string_dtype(), chunks=(min(n, 4096),))
        f.attrs["pyzsl_store"] = FORMAT_VERSION
        f.attrs["layout"] = self.layout
        f.attrs["rows_written"] = 0
        for key, value in attrs.items():
            f.attrs[key] = value
        f.flush()

    def _check_resumable(self, attrs: dict) -> None:
        where, f = f"FeatureStoreWriter(resume=True) on {self.path}", self._file
        missing = [k for k in REQUIRED_KEYS if k not in f]
        if missing or f.attrs.get("pyzsl_store") != FORMAT_VERSION:
            raise ValueError(f"{where}: not a pyzsl feature store (missing datasets {missing}, pyzsl_store = "
                             f"{f.attrs.get('pyzsl_store')!r})")
        expected = (self.num_rows, *self.feature_shape)
        if f["features"].shape != expected:
            raise ValueError(f"{where}: the file's features have shape {list(f['features'].shape)}, this writer "
                             f"expects {list(expected)} (num_rows, *feature_shape)")
        if f["features"].dtype != self.np_dtype:
            raise ValueError(f"{where}: the file's features are {f['features'].dtype}, this writer writes "
                             f"{np.dtype(self.np_dtype)}")
        if f.attrs.get("layout") != self.layout:
            raise ValueError(f"{where}: the file's layout is {f.attrs.get('layout')!r}, this writer's is "
                             f"{self.layout!r}")
        names = list(f["label_names"].asstr()[()])
        if names != self.label_names:
            if len(names) != len(self.label_names):
                detail = f"{len(names)} names in the file, {len(self.label_names)} given"
            else:
                i = next(i for i, (a, b) in enumerate(zip(names, self.label_names)) if a != b)
                detail = f"position {i}: {names[i]!r} in the file, {self.label_names[i]!r} given"
            raise ValueError(f"{where}: label_names differ ({detail})")
        for key, value in attrs.items():
            old = f.attrs.get(key)
            if old is None or not np.array_equal(np.asarray(old), np.asarray(value)):
                raise ValueError(f"{where}: attribute {key!r} is {old!r} in the file, {value!r} given")
        rows = int(f.attrs.get("rows_written", -1))
        if not 0 <= rows <= self.num_rows:
            raise ValueError(f"{where}: rows_written = {rows} is outside [0, {self.num_rows}]")

    @property
    def rows_written(self) -> int:
        return int(self._file.attrs["rows_written"])

    def write(self, features, labels, image_ids: Sequence[str]) -> None:
        """Appends n rows: ``features`` [n, *feature_shape] (tensor or array), ``labels`` [n, L] integers in
        {1, 0, -1} (``None`` when L = 0) and ``image_ids`` (n strings)."""
        if self._file is None:
            raise ValueError(f"FeatureStoreWriter: {self.path} is closed")
        start = self.rows_written
        where = f"FeatureStoreWriter.write ({self.path}, rows from {start})"
        feats = _as_numpy(features, "features", where)
        n = feats.shape[0] if feats.ndim else 0
        if feats.shape[1:] != self.feature_shape or feats.ndim != 1 + len(self.feature_shape):
            raise ValueError(f"{where}: features must have shape [n, {', '.join(map(str, self.feature_shape))}], "
                             f"got {list(feats.shape)}")
        if feats.dtype.kind != "f":
            raise ValueError(f"{where}: features must be floating point, got dtype {feats.dtype}")
        if not np.isfinite(feats).all():
            r = int(np.argwhere(~np.isfinite(feats))[0][0])
            raise ValueError(f"{where}: features must be finite, row {start + r} has NaN/inf")
        L = len(self.label_names)
        if labels is None:
            if L:
                raise ValueError(f"{where}: labels is None but the store has {L} label columns")
            labels = np.zeros((n, 0), dtype=np.int8)
        labs = _as_numpy(labels, "labels", where)
        if labs.dtype.kind not in "iu":
            raise ValueError(f"{where}: labels must be an integer array with values in {{1, 0, -1}}, got dtype "
                             f"{labs.dtype}")
        if labs.shape != (n, L):
            raise ValueError(f"{where}: labels must have shape [{n}, {L}] (rows of features, label columns), got "
                             f"{list(labs.shape)}")
        bad = _first_bad_label(labs)
        if bad is not None:
            raise ValueError(f"{where}: labels must take values in {{1, 0, -1}}, found {bad[2]} at row "
                             f"{start + bad[0]}, column {bad[1]}")
        if isinstance(image_ids, str):
            raise TypeError(f"{where}: image_ids must be a sequence of {n} strings, got a single string")
        ids = list(image_ids)
        if len(ids) != n or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{where}: image_ids must be {n} strings (one per feature row), got {len(ids)} items "
                             f"of types {sorted({type(i).__name__ for i in ids})}")
        if start + n > self.num_rows:
            raise ValueError(f"{where}: writing {n} rows would pass num_rows = {self.num_rows} "
                             f"({start} already written)")
        if n == 0:
            return
        f = self._file
        f["features"][start:start + n] = feats.astype(self.np_dtype, copy=False)
        if L:
            f["labels"][start:start + n] = labs.astype(np.int8, copy=False)
        f["image_ids"][start:start + n] = np.array(ids, dtype=object)
        f.attrs["rows_written"] = start + n  # only after the rows themselves
        f.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def write_store(path: PathLike, features, labels, label_names: Sequence[str], image_ids: Sequence[str],
                **attrs) -> Path:
    """Writes a complete store from in-memory data in one call (small data, tests, examples).

    ``features`` [N, R, D] or [N, D] (float16 is kept, any other float is stored as float32), ``labels`` [N, L]
    integers in {1, 0, -1}, ``label_names`` L strings, ``image_ids`` N strings; ``attrs`` become file attributes.
    """
    feats = _as_numpy(features, "features", "write_store")
    if feats.ndim not in (2, 3):
        raise ValueError(f"write_store: features must be [N, R, D] or [N, D], got shape {list(feats.shape)}")
    dtype = torch.float16 if feats.dtype == np.float16 else torch.float32
    with FeatureStoreWriter(path, num_rows=feats.shape[0], feature_shape=feats.shape[1:], label_names=label_names,
                            dtype=dtype, attrs=attrs) as writer:
        writer.write(feats, labels, image_ids)
    return Path(path)


class FeatureStore(torch.utils.data.Dataset):
    """A feature store file as a Dataset of ``(features float32 [R, D] or [D], labels int8 [L'])``.

    Args:
        path: the ``.h5`` file.
        rows: the row indices this dataset exposes, in order (e.g. ``range(5000)`` for a validation split);
            all rows by default.
        label_columns: the label columns each item carries, in order, as column indices or label names
            (e.g. the seen labels of a zero-shot split); all by default.

    Opening validates the file: the four datasets and the format attributes exist, the row counts of features,
    labels and image ids agree, ``label_names`` has one distinct name per label column, labels are int8 with values
    in {1, 0, -1} (scanned block by block; the first bad row, column and value are named), and the extraction that
    wrote it finished (``rows_written`` = N). The h5py handle is then closed and reopened lazily by whichever process
    reads items, so the dataset pickles into DataLoader workers.
    """

    def __init__(self, path: PathLike, *, rows=None, label_columns=None):
        self.path = Path(path)
        self._file: Optional[h5py.File] = None
        self._pid: Optional[int] = None
        self._open: Optional[tuple[h5py.Dataset, h5py.Dataset]] = None
        if not self.path.is_file():
            raise FileNotFoundError(f"FeatureStore: no such file {self.path}")
        with h5py.File(self.path, "r") as f:
            self._validate(f)
            self.all_label_names: list[str] = list(f["label_names"].asstr()[()])
            self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            num_rows, *shape = f["features"].shape
            self.feature_dtype = f["features"].dtype
        self.num_rows = num_rows
        self.feature_shape = tuple(shape)
        self.layout = self.attrs["layout"]
        self.rows = self._select_rows(rows)
        self.columns = self._select_columns(label_columns)
        self.label_names = [self.all_label_names[c] for c in self.columns] if self.columns is not None \
            else list(self.all_label_names)

    def _validate(self, f: h5py.File) -> None:
        where = f"FeatureStore({self.path})"
        for key in REQUIRED_KEYS:
            if key not in f:
                raise KeyError(f"{where}: missing dataset {key!r} (a pyzsl feature store has {list(REQUIRED_KEYS)}; "
                               f"found {sorted(f.keys())})")
        for key in ("pyzsl_store", "layout", "rows_written"):
            if key not in f.attrs:
                raise KeyError(f"{where}: missing file attribute {key!r}")
        if f.attrs["pyzsl_store"] != FORMAT_VERSION:
            raise ValueError(f"{where}: format version pyzsl_store = {f.attrs['pyzsl_store']!r}, this pyzsl reads "
                             f"{FORMAT_VERSION}")
        feats, labels, names, ids = (f[k] for k in REQUIRED_KEYS)
        layout = f.attrs["layout"]
        if layout not in LAYOUTS:
            raise ValueError(f"{where}: layout must be one of {LAYOUTS}, got {layout!r}")
        want_ndim = 3 if layout == "regions" else 2
        if feats.ndim != want_ndim:
            raise ValueError(f"{where}: layout {layout!r} needs {want_ndim}-D features, got shape {list(feats.shape)}")
        if feats.dtype not in (np.float16, np.float32):
            raise ValueError(f"{where}: features must be float16 or float32, got {feats.dtype}")
        if labels.ndim != 2:
            raise ValueError(f"{where}: labels must be 2-D [N, L], got shape {list(labels.shape)}")
        if labels.dtype != np.int8:
            raise ValueError(f"{where}: labels must be int8 with values in {{1, 0, -1}}, got dtype {labels.dtype}")
        if names.ndim != 1 or ids.ndim != 1 or h5py.check_string_dtype(names.dtype) is None \
                or h5py.check_string_dtype(ids.dtype) is None:
            raise ValueError(f"{where}: label_names and image_ids must be 1-D string datasets, got "
                             f"{names.dtype} {list(names.shape)} and {ids.dtype} {list(ids.shape)}")
        n = feats.shape[0]
        if labels.shape[0] != n or ids.shape[0] != n:
            raise ValueError(f"{where}: row counts disagree: features {n}, labels {labels.shape[0]}, image_ids "
                             f"{ids.shape[0]}")
        if names.shape[0] != labels.shape[1]:
            raise ValueError(f"{where}: label_names has {names.shape[0]} names but labels has {labels.shape[1]} "
                             f"columns")
        check_distinct(list(names.asstr()[()]), "label_names", where)
        written = int(f.attrs["rows_written"])
        if written < n:
            raise ValueError(f"{where}: incomplete extraction, rows_written = {written} of {n} rows; resume the "
                             f"extraction that writes it (FeatureStoreWriter(..., resume=True))")
        if written > n:
            raise ValueError(f"{where}: rows_written = {written} exceeds the {n} rows")
        self._scan_labels(labels, where)

    @staticmethod
    def _scan_labels(labels: h5py.Dataset, where: str) -> None:
        n, L = labels.shape
        if n == 0 or L == 0:
            return
        step = max(1, _LABEL_SCAN_BYTES // L)
        starts = range(0, n, step)
        for start in tqdm(starts, desc=f"checking labels of {Path(labels.file.filename).name}", unit="block",
                          disable=len(starts) < 8, leave=False):
            bad = _first_bad_label(labels[start:start + step])
            if bad is not None:
                r, c, v = bad
                raise ValueError(f"{where}: labels must take values in {{1, 0, -1}}, found {v} at row {start + r}, "
                                 f"column {c}")

    def _select_rows(self, rows) -> Union[None, range, np.ndarray]:
        if rows is None:
            return None
        if isinstance(rows, slice):
            rows = range(*rows.indices(self.num_rows))
        if isinstance(rows, range):  # kept as a range: a split of millions of rows pickles into workers for free
            if len(rows) and (min(rows[0], rows[-1]) < 0 or max(rows[0], rows[-1]) >= self.num_rows):
                raise ValueError(f"FeatureStore({self.path}): rows must lie in [0, {self.num_rows}), got {rows}")
            return rows
        idx = np.asarray(rows.cpu() if isinstance(rows, Tensor) else rows)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError(f"FeatureStore({self.path}): rows must be a 1-D sequence of integer row indices, got "
                             f"{idx.dtype} of shape {list(idx.shape)}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise ValueError(f"FeatureStore({self.path}): rows must lie in [0, {self.num_rows}), got values from "
                             f"{idx.min()} to {idx.max()}")
        return idx.astype(np.int64)

    def _select_columns(self, label_columns) -> Optional[np.ndarray]:
        if label_columns is None:
            return None
        cols = list(label_columns)
        L = len(self.all_label_names)
        where = f"FeatureStore({self.path})"
        if all(isinstance(c, str) for c in cols):
            check_distinct(cols, "label_columns", where)
            index = {name: i for i, name in enumerate(self.all_label_names)}
            missing = [c for c in cols if c not in index]
            if missing:
                shown = ", ".join(repr(m) for m in missing[:10]) + (", ..." if len(missing) > 10 else "")
                raise KeyError(f"{where}: {len(missing)} of the {len(cols)} requested label names are not in the "
                               f"file's label_names ({L} names): {shown}")
            return np.array([index[c] for c in cols], dtype=np.int64)
        if all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in cols):
            if any(not 0 <= c < L for c in cols):
                raise ValueError(f"{where}: label_columns must lie in [0, {L}), got {cols}")
            return np.array(cols, dtype=np.int64)
        raise TypeError(f"{where}: label_columns must be all label names (str) or all column indices (int)")

    def with_rows(self, rows) -> "FeatureStore":
        """The same file and label columns over other file rows (a split), without validating the file again."""
        other = copy.copy(self)
        other._file, other._pid, other._open = None, None, None
        other.rows = other._select_rows(rows)
        return other

    def _datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        """(features, labels) of this process's handle. A handle opened before a fork must not be shared with the
        child, so the file is reopened when the process changes; the dataset objects are kept, because looking them
        up again for every item costs more than reading a row."""
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            self._open = (self._file["features"], self._file["labels"])
        return self._open

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"], state["_pid"], state["_open"] = None, None, None
        return state

    def __len__(self) -> int:
        return self.num_rows if self.rows is None else len(self.rows)

    def _file_row(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"FeatureStore({self.path}): index {index} out of range for {n} items")
        index %= n
        return index if self.rows is None else int(self.rows[index])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        row = self._file_row(int(index))
        features, labels = self._datasets()
        y = labels[row]
        if self.columns is not None:
            y = y[self.columns]
        return torch.from_numpy(features[row]).float(), torch.from_numpy(y)

    @property
    def image_ids(self) -> list[str]:
        """The image ids of this dataset's rows, in item order."""
        self._datasets()
        ids = self._file["image_ids"].asstr()[()]
        return list(ids) if self.rows is None else [ids[r] for r in self.rows]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._open = None, None

    def __del__(self):
        self.close()
