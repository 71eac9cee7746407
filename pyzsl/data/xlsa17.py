"""Generalized zero-shot datasets in the xlsa17 format (CUB, AWA2, SUN, FLO, ...), a generic HDF5 layout for your
own data, and the embedded ``synthetic-gzsl`` dataset.

**xlsa17** (Xian et al., "Proposed Split"): a dataset folder holds

- ``res101.mat`` (or any feature file in the same schema): ``features`` [d, N] (one column per image, any d) and
  ``labels`` [N, 1], **1-based** class ids;
- ``att_splits.mat``: ``att`` [A, C] (one column per class), ``trainval_loc``, ``test_seen_loc``,
  ``test_unseen_loc`` and, in most copies, ``train_loc`` / ``val_loc`` (all **1-based** image indices);
- ``sent_splits.mat`` (CUB): the same keys with 1024-d sentence embeddings as ``att``.

Loading follows the published code (tfvaegan ``datasets/image_util.py``): labels and locations become 0-based, class
embeddings are the rows of ``att.T`` re-normalised to unit L2 norm (a no-op for ``att``, not for CUB ``sent``), and
features are MinMax-scaled to [0, 1] with the minimum and maximum of the training split (trainval for the test task),
so test features may fall slightly outside [0, 1]. (The published code then divides by the maximum training
feature, which is 1 after MinMax scaling, so that step is left out.)

**Tasks.** :meth:`GZSLData.test_task` is the published protocol: train on trainval (seen classes), test on test_seen
and test_unseen. :meth:`GZSLData.validation_task` is the honest model-selection protocol, which the published code
offers but cannot run: the seen classes are split into *train* classes, which play the seen role, and class-disjoint
*val* classes, which play the unseen role. Only trainval images are used (xlsa17's ``train_loc``/``val_loc`` also
contain test_seen images, which are dropped): val-class images are the unseen test set and a seeded 20 % of each
train class's images is the seen test set. Where ``train_loc``/``val_loc`` are missing (some copies, e.g. CUB here),
the val classes are drawn, with ``split_seed``, from the seen classes: as many as there are unseen classes, at most a
third of the seen classes. A warning says so.

In a task, classes are renumbered: seen classes are 0..S-1 and unseen classes S..S+U-1, in increasing order of their
dataset ids (``GZSLTask.class_ids`` maps back).

**Generic HDF5 layout** (:func:`load_hdf5`, :func:`save_hdf5`), for your own features; everything 0-based::

    /features          float [N, X]   one row per image
    /labels            int   [N]      class id in [0, C)
    /class_embeddings  float [C, A]   one row per class (attributes, sentence or word embeddings)
    /splits/trainval   int   [n]      row indices of training images (seen classes)
    /splits/test_seen  int   [n]      row indices of test images of seen classes
    /splits/test_unseen int  [n]      row indices of test images of unseen classes
    /splits/train, /splits/val  int [n]  optional: class-disjoint validation split inside trainval
    /class_names       str   [C]      optional

**synthetic-gzsl** (:func:`make_synthetic_gzsl`): see its docstring.
"""
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

XLSA17_DATASETS = {"cub": "CUB", "awa1": "AWA1", "awa2": "AWA2", "sun": "SUN", "flo": "FLO", "apy": "APY"}
SPLIT_KEYS = ("trainval_loc", "test_seen_loc", "test_unseen_loc")
VALIDATION_SEEN_FRACTION = 0.2  # share of each train class's images held out as validation test_seen


@dataclass
class GZSLTask:
    """One train/evaluate problem, classes renumbered so that seen = 0..S-1 and unseen = S..S+U-1.

    Features are MinMax-scaled with the statistics of ``train_features``.
    """
    name: str
    train_features: Tensor        # [n, X] float32, seen classes only
    train_labels: Tensor          # [n] int64 in [0, S)
    test_seen_features: Tensor    # [n_s, X]
    test_seen_labels: Tensor      # [n_s] in [0, S)
    test_unseen_features: Tensor  # [n_u, X]
    test_unseen_labels: Tensor    # [n_u] in [S, S+U)
    attributes: Tensor            # [S+U, A] float32, rows L2-normalised
    num_seen: int
    class_ids: Tensor             # [S+U] dataset class id of each task class

    @property
    def num_classes(self) -> int:
        return self.attributes.shape[0]

    @property
    def num_unseen(self) -> int:
        return self.num_classes - self.num_seen

    @property
    def seen_classes(self) -> Tensor:
        return torch.arange(self.num_seen)

    @property
    def unseen_classes(self) -> Tensor:
        return torch.arange(self.num_seen, self.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.train_features.shape[1]

    @property
    def attribute_dim(self) -> int:
        return self.attributes.shape[1]


@dataclass
class GZSLData:
    """A whole dataset, unscaled, 0-based: features [N, X], labels [N], class embeddings [C, A] and split indices."""
    name: str
    features: Tensor
    labels: Tensor
    attributes: Tensor
    trainval: Tensor
    test_seen: Tensor
    test_unseen: Tensor
    train: Optional[Tensor] = None
    val: Optional[Tensor] = None

    def __post_init__(self):
        _validate(self)

    @property
    def seen_classes(self) -> Tensor:
        return self.labels[self.trainval].unique()

    @property
    def unseen_classes(self) -> Tensor:
        return self.labels[self.test_unseen].unique()

    def test_task(self) -> GZSLTask:
        """The published protocol: train on trainval, evaluate on test_seen / test_unseen."""
        return _make_task(f"{self.name}/test", self.features, self.labels, self.attributes, self.trainval,
                          self.test_seen, self.test_unseen, self.seen_classes, self.unseen_classes)

    def validation_task(self, split_seed: int = 0) -> GZSLTask:
        """Train classes as seen, class-disjoint val classes as unseen, inside trainval only (module docstring)."""
        trainval_labels = self.labels[self.trainval]
        seen = self.seen_classes
        if self.train is not None and self.val is not None:
            in_trainval = torch.zeros(self.labels.shape[0], dtype=torch.bool)
            in_trainval[self.trainval] = True
            train_classes = self.labels[self.train[in_trainval[self.train]]].unique()
            val_classes = self.labels[self.val[in_trainval[self.val]]].unique()
            if train_classes.numel() == 0 or val_classes.numel() == 0:
                raise ValueError(f"{self.name}: train_loc/val_loc select no trainval image of some split "
                                 f"({train_classes.numel()} train classes, {val_classes.numel()} val classes)")
            overlap = train_classes[torch.isin(train_classes, val_classes)]
            if overlap.numel():
                raise ValueError(f"{self.name}: train_loc and val_loc must be class-disjoint, both hold classes "
                                 f"{overlap.tolist()[:10]}")
        else:
            generator = torch.Generator().manual_seed(split_seed)
            num_val = max(1, min(self.unseen_classes.numel(), seen.numel() // 3))
            if seen.numel() < 2:
                raise ValueError(f"{self.name}: a validation split needs at least 2 seen classes, got {seen.numel()}")
            perm = seen[torch.randperm(seen.numel(), generator=generator)]
            val_classes, train_classes = perm[:num_val].sort().values, perm[num_val:].sort().values
            warnings.warn(f"{self.name}: no train_loc/val_loc split; using a class-disjoint validation split of "
                          f"{num_val} of the {seen.numel()} seen classes drawn with split_seed={split_seed}",
                          stacklevel=2)
        val_unseen = self.trainval[torch.isin(trainval_labels, val_classes)]
        train_rows = self.trainval[torch.isin(trainval_labels, train_classes)]
        generator = torch.Generator().manual_seed(split_seed)
        keep, held_out = [], []
        for c in train_classes.tolist():  # per class, so every train class has validation test images
            rows = train_rows[self.labels[train_rows] == c]
            rows = rows[torch.randperm(rows.numel(), generator=generator)]
            cut = int(math.floor(rows.numel() * VALIDATION_SEEN_FRACTION))
            held_out.append(rows[:cut])
            keep.append(rows[cut:])
        return _make_task(f"{self.name}/validation", self.features, self.labels, self.attributes,
                          torch.cat(keep).sort().values, torch.cat(held_out).sort().values, val_unseen,
                          train_classes, val_classes)


def _validate(data: GZSLData) -> None:
    name = data.name
    if data.features.dim() != 2:
        raise ValueError(f"{name}: features must be 2-D [N, X], got shape {list(data.features.shape)}")
    n = data.features.shape[0]
    if data.labels.shape != (n,):
        raise ValueError(f"{name}: labels must have one entry per feature row ({n}), got shape "
                         f"{list(data.labels.shape)}")
    if data.attributes.dim() != 2:
        raise ValueError(f"{name}: class embeddings must be 2-D [C, A], got shape {list(data.attributes.shape)}")
    num_classes = data.attributes.shape[0]
    if n and (int(data.labels.min()) < 0 or int(data.labels.max()) >= num_classes):
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}) (one class embedding per class), got "
                         f"values from {int(data.labels.min())} to {int(data.labels.max())}; the class embeddings "
                         f"hold {num_classes} classes")
    for key in ("trainval", "test_seen", "test_unseen", "train", "val"):
        idx = getattr(data, key)
        if idx is None:
            continue
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"{name}: split {key} must index rows in [0, {n}), got values from {int(idx.min())} "
                             f"to {int(idx.max())}")
        if key in ("trainval", "test_seen", "test_unseen") and idx.numel() == 0:
            raise ValueError(f"{name}: split {key} is empty")
    seen, unseen = data.seen_classes, data.unseen_classes
    both = unseen[torch.isin(unseen, seen)]
    if both.numel():
        raise ValueError(f"{name}: test_unseen holds classes that trainval also holds: {both.tolist()[:10]}")
    stray = data.labels[data.test_seen].unique()
    stray = stray[~torch.isin(stray, seen)]
    if stray.numel():
        raise ValueError(f"{name}: test_seen holds classes absent from trainval: {stray.tolist()[:10]}")


def _minmax(train: Tensor) -> Tuple[Tensor, Tensor]:
    """(min, 1/range) per column, as sklearn's MinMaxScaler: a constant column maps to 0."""
    lo, hi = train.min(dim=0).values, train.max(dim=0).values
    span = hi - lo
    return lo, torch.where(span > 0, 1.0 / span.clamp_min(torch.finfo(span.dtype).tiny), torch.ones_like(span))


def _make_task(name, features, labels, attributes, train_idx, seen_idx, unseen_idx, seen_classes,
               unseen_classes) -> GZSLTask:
    class_ids = torch.cat([seen_classes.sort().values, unseen_classes.sort().values])
    remap = torch.full((attributes.shape[0],), -1, dtype=torch.long)
    remap[class_ids] = torch.arange(class_ids.numel())
    features = features.float()
    lo, inv = _minmax(features[train_idx])
    scale = lambda idx: (features[idx] - lo) * inv  # noqa: E731
    return GZSLTask(
        name=name,
        train_features=scale(train_idx), train_labels=remap[labels[train_idx]],
        test_seen_features=scale(seen_idx), test_seen_labels=remap[labels[seen_idx]],
        test_unseen_features=scale(unseen_idx), test_unseen_labels=remap[labels[unseen_idx]],
        attributes=attributes[class_ids].float().contiguous(), num_seen=int(seen_classes.numel()),
        class_ids=class_ids,
    )


def _l2_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------------------- xlsa17

def _loadmat(path: Path) -> Dict[str, np.ndarray]:
    """A .mat file as {key: array}; MATLAB v7.3 files (HDF5) are read with h5py, transposed back to MATLAB order."""
    import scipy.io
    if not path.is_file():
        raise FileNotFoundError(f"xlsa17: no such file {path}")
    try:
        return {k: v for k, v in scipy.io.loadmat(str(path)).items() if not k.startswith("__")}
    except NotImplementedError:  # v7.3
        import h5py
        with h5py.File(path, "r") as f:
            return {k: np.asarray(f[k]).T for k in f.keys() if isinstance(f[k], h5py.Dataset)}


def _require(mat: Dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    if key not in mat:
        raise KeyError(f"xlsa17: {path} has no {key!r} (keys found: {sorted(mat)})")
    return mat[key]


def _locations(mat, key: str, path: Path, n: int, required: bool = True) -> Optional[Tensor]:
    """A 1-based ``*_loc`` array as 0-based int64 indices, with the errors a broken copy deserves."""
    if key not in mat and not required:
        return None
    loc = np.asarray(_require(mat, key, path)).reshape(-1).astype(np.int64)
    if loc.size and loc.min() == 0:
        raise ValueError(f"xlsa17: {path}: {key} must hold 1-based image indices in [1, {n}], found 0 "
                         f"(is this file 0-based?)")
    if loc.size and (loc.min() < 1 or loc.max() > n):
        raise ValueError(f"xlsa17: {path}: {key} must hold 1-based image indices in [1, {n}] ({n} images in the "
                         f"feature file), got values from {loc.min()} to {loc.max()}")
    return torch.from_numpy(loc - 1)


def dataset_dir(root: Union[str, Path], dataset: str) -> Path:
    """``root/xlsa17/<DATASET>``, ``root/<DATASET>`` or ``root`` itself, whichever holds ``att_splits.mat``."""
    root = Path(root)
    folder = XLSA17_DATASETS.get(dataset.lower(), dataset)
    for candidate in (root / "xlsa17" / folder, root / "xlsa17" / "data" / folder, root / folder, root):
        if (candidate / "att_splits.mat").is_file():
            return candidate
    raise FileNotFoundError(f"xlsa17: no att_splits.mat for {dataset!r} under {root} (looked in xlsa17/{folder}, "
                            f"xlsa17/data/{folder}, {folder} and the folder itself)")


def load_xlsa17(path: Union[str, Path], dataset: Optional[str] = None, *, class_embedding: str = "att",
                feature_file: str = "res101.mat") -> GZSLData:
    """Read an xlsa17 dataset folder (``path``), or ``path/xlsa17/<DATASET>`` when ``dataset`` is given.

    Args:
        class_embedding: ``"att"`` reads ``att_splits.mat``; ``"sent"`` reads the embeddings of ``sent_splits.mat``
            (CUB) and the splits of ``att_splits.mat``.
        feature_file: the feature file in the folder, ``features`` [d, N] and 1-based ``labels``; any d.
    """
    folder = dataset_dir(path, dataset) if dataset else Path(path)
    if class_embedding not in ("att", "sent"):
        raise ValueError(f"xlsa17: class_embedding must be 'att' or 'sent', got {class_embedding!r}")
    feature_path, split_path = folder / feature_file, folder / "att_splits.mat"
    feat_mat, split_mat = _loadmat(feature_path), _loadmat(split_path)
    features = np.asarray(_require(feat_mat, "features", feature_path))
    if features.ndim != 2:
        raise ValueError(f"xlsa17: {feature_path}: features must be 2-D [d, N], got shape {list(features.shape)}")
    n = features.shape[1]
    labels = np.asarray(_require(feat_mat, "labels", feature_path)).reshape(-1).astype(np.int64)
    if labels.size != n:
        raise ValueError(f"xlsa17: {feature_path}: labels must have one entry per feature column ({n}), got "
                         f"{labels.size}")
    emb_path = folder / "sent_splits.mat" if class_embedding == "sent" else split_path
    att = np.asarray(_require(_loadmat(emb_path) if class_embedding == "sent" else split_mat, "att", emb_path))
    if att.ndim != 2:
        raise ValueError(f"xlsa17: {emb_path}: att must be 2-D [A, C], got shape {list(att.shape)}")
    num_classes = att.shape[1]
    if labels.size and labels.min() < 1:
        raise ValueError(f"xlsa17: {feature_path}: labels must be 1-based class ids in [1, {num_classes}], found "
                         f"{labels.min()} (is this file 0-based?)")
    if labels.size and labels.max() > num_classes:
        raise ValueError(f"xlsa17: {feature_path}: labels go up to {labels.max()} but {emb_path} has class "
                         f"embeddings for {num_classes} classes (att is [A, C] = {list(att.shape)})")
    if "allclasses_names" in split_mat and len(split_mat["allclasses_names"]) != num_classes:
        raise ValueError(f"xlsa17: {emb_path}: att has {num_classes} class columns but {split_path} names "
                         f"{len(split_mat['allclasses_names'])} classes")
    locs = {k: _locations(split_mat, k, split_path, n) for k in SPLIT_KEYS}
    train = _locations(split_mat, "train_loc", split_path, n, required=False)
    val = _locations(split_mat, "val_loc", split_path, n, required=False)
    if (train is None) != (val is None):
        raise KeyError(f"xlsa17: {split_path} has only one of train_loc / val_loc")
    return GZSLData(
        name=dataset or folder.name,
        features=torch.from_numpy(np.ascontiguousarray(features.T, dtype=np.float32)),
        labels=torch.from_numpy(labels - 1),
        attributes=_l2_rows(torch.from_numpy(np.ascontiguousarray(att.T, dtype=np.float32))),
        trainval=locs["trainval_loc"], test_seen=locs["test_seen_loc"], test_unseen=locs["test_unseen_loc"],
        train=train, val=val,
    )


# ------------------------------------------------------------------------------------------------------------ HDF5

def load_hdf5(path: Union[str, Path]) -> GZSLData:
    """Read the generic HDF5 layout (module docstring). Class embeddings are L2-normalised per row."""
    import h5py
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_hdf5: no such file {path}")
    with h5py.File(path, "r") as f:
        for key in ("features", "labels", "class_embeddings", "splits/trainval", "splits/test_seen",
                    "splits/test_unseen"):
            if key not in f:
                raise KeyError(f"load_hdf5: {path} has no {key!r} (the layout is documented in pyzsl.data.xlsa17)")
        split = lambda key: torch.from_numpy(np.asarray(f[f"splits/{key}"]).reshape(-1).astype(np.int64)) \
            if f"splits/{key}" in f else None  # noqa: E731
        return GZSLData(
            name=str(f.attrs.get("name", path.stem)),
            features=torch.from_numpy(np.asarray(f["features"], dtype=np.float32)),
            labels=torch.from_numpy(np.asarray(f["labels"]).reshape(-1).astype(np.int64)),
            attributes=_l2_rows(torch.from_numpy(np.asarray(f["class_embeddings"], dtype=np.float32))),
            trainval=split("trainval"), test_seen=split("test_seen"), test_unseen=split("test_unseen"),
            train=split("train"), val=split("val"),
        )


def save_hdf5(data: GZSLData, path: Union[str, Path], class_names: Optional[Sequence[str]] = None) -> None:
    """Write ``data`` in the generic HDF5 layout (one chunk per feature row, so random reads stay cheap)."""
    import h5py
    with h5py.File(path, "w") as f:
        f.attrs["name"] = data.name
        f.create_dataset("features", data=data.features.numpy(), chunks=(1, data.features.shape[1]))
        f.create_dataset("labels", data=data.labels.numpy())
        f.create_dataset("class_embeddings", data=data.attributes.numpy())
        for key in ("trainval", "test_seen", "test_unseen", "train", "val"):
            if getattr(data, key) is not None:
                f.create_dataset(f"splits/{key}", data=getattr(data, key).numpy())
        if class_names is not None:
            f.create_dataset("class_names", data=np.array(list(class_names), dtype=h5py.string_dtype()))


# ------------------------------------------------------------------------------------------------- synthetic-gzsl

def make_synthetic_gzsl(num_seen: int = 48, num_unseen: int = 12, attribute_dim: int = 32, feature_dim: int = 128,
                        train_per_class: int = 60, test_per_class: int = 30, noise: float = 1.2,
                        seed: int = 0) -> GZSLData:
    """A seeded GZSL dataset in which unseen-class features are predictable from class attributes.

    Each class has binary attributes (each on with probability 0.3, at least three on), L2-normalised as xlsa17's
    ``att``. A fixed random two-layer map ``f`` (tanh hidden layer) sends the attribute vector to a class centre in
    ``feature_dim`` dimensions; an image's feature is ``relu(f(a_c) + noise * (e + L e'))``, with ``e`` isotropic
    Gaussian and ``L e'`` a low-rank (rank 8) Gaussian shared by all classes, so features are non-negative like
    pooled ResNet features and the within-class spread is not isotropic. Seen classes have ``train_per_class``
    trainval and ``test_per_class`` test_seen images; unseen classes ``test_per_class`` test_unseen images.
    ``train_loc``/``val_loc`` give a class-disjoint validation split: a third of the seen classes are val classes.
    The same arguments always give the same data (the generator is CPU-seeded).
    """
    g = torch.Generator().manual_seed(seed)
    num_classes = num_seen + num_unseen
    att = (torch.rand(num_classes, attribute_dim, generator=g) < 0.3).float()
    for c in range(num_classes):  # at least three attributes per class
        if att[c].sum() < 3:
            att[c, torch.randperm(attribute_dim, generator=g)[:3]] = 1.0
    att = _l2_rows(att)
    hidden = 4 * attribute_dim
    w1 = torch.randn(attribute_dim, hidden, generator=g) * (3.0 / math.sqrt(attribute_dim))
    w2 = torch.randn(hidden, feature_dim, generator=g) / math.sqrt(hidden)
    centres = 2.0 * torch.tanh(att @ w1) @ w2 + 0.5
    low_rank = torch.randn(8, feature_dim, generator=g) / math.sqrt(8)

    counts = [train_per_class + test_per_class] * num_seen + [test_per_class] * num_unseen
    labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
    n = labels.numel()
    spread = torch.randn(n, feature_dim, generator=g) + torch.randn(n, 8, generator=g) @ low_rank
    features = torch.relu(centres[labels] + noise * spread)

    trainval, test_seen, test_unseen = [], [], []
    start = 0
    for c, count in enumerate(counts):
        rows = torch.arange(start, start + count)
        if c < num_seen:
            rows = rows[torch.randperm(count, generator=g)]
            trainval.append(rows[:train_per_class])
            test_seen.append(rows[train_per_class:])
        else:
            test_unseen.append(rows)
        start += count
    trainval = torch.cat(trainval).sort().values
    num_val = max(1, num_seen // 3)
    val_classes = torch.randperm(num_seen, generator=g)[:num_val]
    is_val = torch.isin(labels[trainval], val_classes)
    return GZSLData(name="synthetic-gzsl", features=features, labels=labels, attributes=att, trainval=trainval,
                    test_seen=torch.cat(test_seen).sort().values, test_unseen=torch.cat(test_unseen).sort().values,
                    train=trainval[~is_val], val=trainval[is_val])


def load_dataset(dataset: str, data_root: Optional[Union[str, Path]] = None, *, class_embedding: str = "att",
                 feature_file: str = "res101.mat") -> GZSLData:
    """``synthetic-gzsl``, an xlsa17 name (cub, awa1, awa2, sun, flo, apy) under ``data_root`` (default
    ``$PYZSL_DATA``), or a path to an HDF5 file in the generic layout."""
    import os
    if dataset == "synthetic-gzsl":
        return make_synthetic_gzsl()
    if dataset.endswith((".h5", ".hdf5")):
        return load_hdf5(dataset)
    if dataset.lower() not in XLSA17_DATASETS:
        raise ValueError(f"dataset must be synthetic-gzsl, one of {sorted(XLSA17_DATASETS)} or an .h5 file, got "
                         f"{dataset!r}")
    root = data_root or os.environ.get("PYZSL_DATA")
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs --data-root (or $PYZSL_DATA) pointing at the xlsa17 data")
    return load_xlsa17(root, dataset.lower(), class_embedding=class_embedding, feature_file=feature_file)
