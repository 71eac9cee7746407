"""pyzsl.data.xlsa17: the real att_splits.mat files with small res101.mat files written in the same schema, malformed
files, the generic HDF5 layout and synthetic-gzsl."""
import numpy as np
import pytest
import scipy.io
import torch

from pyzsl.data.xlsa17 import (GZSLData, load_dataset, load_hdf5, load_xlsa17, make_synthetic_gzsl, save_hdf5)


def write_features(folder, splits: dict, num_classes: int, dim: int = 7, seed: int = 0, **overrides):
    """res101.mat in the xlsa17 schema (features [d, N], 1-based labels [N, 1]) consistent with ``splits``: the
    first classes are seen (trainval, test_seen; the first two thirds of them train classes, the rest val classes),
    the last fifth unseen (test_unseen)."""
    rng = np.random.default_rng(seed)
    unseen_rows = splits["test_unseen_loc"].ravel() - 1
    n = int(max(splits[k].max() for k in ("trainval_loc", "test_seen_loc", "test_unseen_loc")))
    num_unseen = max(1, num_classes // 5)
    labels = rng.integers(0, num_classes - num_unseen, n)
    for key in ("trainval_loc", "test_seen_loc"):  # every seen class in both seen splits
        rows = splits[key].ravel() - 1
        labels[rows] = np.arange(rows.size) % (num_classes - num_unseen)
    if "train_loc" in splits and "val_loc" in splits:  # class-disjoint train and val parts of the seen classes
        num_train = 2 * (num_classes - num_unseen) // 3
        parts = (("train_loc", 0, num_train), ("val_loc", num_train, num_classes - num_unseen - num_train))
        for key, first, count in parts:
            rows = splits[key].ravel() - 1
            labels[rows] = first + np.arange(rows.size) % count
    labels[unseen_rows] = num_classes - num_unseen + np.arange(unseen_rows.size) % num_unseen
    mat = {"features": rng.gamma(2.0, 1.0, (dim, n)).astype(np.float32), "labels": (labels + 1)[:, None]}
    mat.update(overrides)
    scipy.io.savemat(str(folder / "res101.mat"), mat)
    return labels


def link_splits(src, dst, names=("att_splits.mat",)):
    for name in names:
        (dst / name).symlink_to(src / name)


def test_awa2_real_splits(data_root, tmp_path):
    src = data_root / "xlsa17" / "AWA2"
    splits = scipy.io.loadmat(str(src / "att_splits.mat"))
    link_splits(src, tmp_path)
    labels = write_features(tmp_path, splits, num_classes=50, dim=11)
    data = load_xlsa17(tmp_path)
    assert data.features.shape == (37322, 11) and data.attributes.shape == (50, 85)
    assert torch.equal(data.labels, torch.from_numpy(labels))
    assert torch.allclose(data.attributes.norm(dim=1), torch.ones(50))
    assert (data.trainval.numel(), data.test_seen.numel(), data.test_unseen.numel()) == (23527, 5882, 7913)
    assert torch.equal(data.trainval, torch.from_numpy(splits["trainval_loc"].ravel().astype(np.int64) - 1))
    task = data.test_task()
    assert (task.num_seen, task.num_unseen) == (40, 10)
    # MinMax fit on trainval: every trainval column spans exactly [0, 1]; test features use the same statistics.
    assert torch.allclose(task.train_features.min(0).values, torch.zeros(11))
    assert torch.allclose(task.train_features.max(0).values, torch.ones(11))
    raw = data.features[data.test_seen]
    lo, hi = data.features[data.trainval].min(0).values, data.features[data.trainval].max(0).values
    assert torch.allclose(task.test_seen_features, (raw - lo) / (hi - lo), atol=1e-6)
    assert int(task.test_unseen_labels.min()) == 40 and int(task.train_labels.max()) == 39
    # attribute rows follow the renumbering
    assert torch.equal(task.attributes[task.test_unseen_labels[0]], data.attributes[data.labels[data.test_unseen[0]]])


def test_awa2_validation_task_uses_train_val_locations(data_root, tmp_path):
    src = data_root / "xlsa17" / "AWA2"
    splits = scipy.io.loadmat(str(src / "att_splits.mat"))
    link_splits(src, tmp_path)
    write_features(tmp_path, splits, num_classes=50)
    data = load_xlsa17(tmp_path)
    task = data.validation_task()
    train_classes = data.labels[data.train[torch.isin(data.train, data.trainval)]].unique()
    val_classes = data.labels[data.val[torch.isin(data.val, data.trainval)]].unique()
    assert torch.equal(task.class_ids[:task.num_seen], train_classes)
    assert torch.equal(task.class_ids[task.num_seen:], val_classes)
    assert not torch.isin(task.class_ids, data.unseen_classes).any()  # the test-unseen classes never appear
    # no test image enters the validation task (xlsa17's train_loc/val_loc also hold test_seen images)
    rows = task.train_features.shape[0] + task.test_seen_features.shape[0] + task.test_unseen_features.shape[0]
    assert rows == data.trainval.numel()


def test_cub_without_train_val_falls_back_with_a_warning(data_root, tmp_path):
    src = data_root / "xlsa17" / "CUB"
    splits = scipy.io.loadmat(str(src / "att_splits.mat"))
    assert "train_loc" not in splits  # the shared CUB copy lacks them
    link_splits(src, tmp_path, ("att_splits.mat", "sent_splits.mat"))
    write_features(tmp_path, splits, num_classes=200)
    data = load_xlsa17(tmp_path)
    with pytest.warns(UserWarning, match="no train_loc/val_loc"):
        task = data.validation_task(split_seed=3)
    assert (task.num_seen, task.num_unseen) == (120, 40)  # as many val classes as unseen classes (40 of 160 seen)
    assert torch.isin(task.class_ids, data.seen_classes).all()
    with pytest.warns(UserWarning):
        again = data.validation_task(split_seed=3)
    assert torch.equal(again.class_ids, task.class_ids)
    sent = load_xlsa17(tmp_path, class_embedding="sent")
    assert sent.attributes.shape == (200, 1024)
    assert torch.allclose(sent.attributes.norm(dim=1), torch.ones(200))  # sent columns are not unit norm on disk


def test_dataset_name_under_root(data_root, tmp_path):
    (tmp_path / "xlsa17" / "SUN").mkdir(parents=True)
    folder = tmp_path / "xlsa17" / "SUN"
    splits = scipy.io.loadmat(str(data_root / "xlsa17" / "SUN" / "att_splits.mat"))
    link_splits(data_root / "xlsa17" / "SUN", folder)
    write_features(folder, splits, num_classes=717, dim=3)
    data = load_dataset("sun", tmp_path)
    assert data.attributes.shape == (717, 102) and data.features.shape[1] == 3


# -------------------------------------------------------------------------------------------------- malformed

def small_splits(n=40):
    loc = lambda a: np.array(a)[:, None]  # noqa: E731
    return {"trainval_loc": loc(range(1, 21)), "test_seen_loc": loc(range(21, 31)),
            "test_unseen_loc": loc(range(31, n + 1)), "att": np.abs(np.random.default_rng(0).normal(size=(6, 5)))}


def write_small(tmp_path, splits=None, features_kw=None, drop=()):
    splits = splits or small_splits()
    scipy.io.savemat(str(tmp_path / "att_splits.mat"), {k: v for k, v in splits.items() if k not in drop})
    write_features(tmp_path, splits, num_classes=5, **(features_kw or {}))
    return tmp_path


@pytest.mark.parametrize("key", ["att", "trainval_loc", "test_unseen_loc"])
def test_missing_split_key(tmp_path, key):
    write_small(tmp_path, drop=(key,))
    with pytest.raises(KeyError, match=f"has no '{key}'"):
        load_xlsa17(tmp_path)


def test_missing_features_key(tmp_path):
    splits = small_splits()
    scipy.io.savemat(str(tmp_path / "att_splits.mat"), splits)
    scipy.io.savemat(str(tmp_path / "res101.mat"), {"labels": np.ones((40, 1))})
    with pytest.raises(KeyError, match="has no 'features'"):
        load_xlsa17(tmp_path)


def test_zero_based_locations(tmp_path):
    splits = small_splits()
    splits["test_seen_loc"] = splits["test_seen_loc"] - 21  # 0..9
    scipy.io.savemat(str(tmp_path / "att_splits.mat"), splits)
    write_features(tmp_path, small_splits(), num_classes=5)
    with pytest.raises(ValueError, match="test_seen_loc must hold 1-based .* found 0"):
        load_xlsa17(tmp_path)


def test_out_of_range_locations(tmp_path):
    splits = small_splits()
    write_small(tmp_path, splits)
    splits["trainval_loc"] = splits["trainval_loc"] + 100
    scipy.io.savemat(str(tmp_path / "att_splits.mat"), splits)
    with pytest.raises(ValueError, match=r"trainval_loc must hold 1-based image indices in \[1, 40\].*101 to 120"):
        load_xlsa17(tmp_path)


def test_attribute_count_differs_from_class_count(tmp_path):
    splits = small_splits()
    splits["att"] = splits["att"][:, :4]  # 4 class columns, labels go up to 5
    write_small(tmp_path, splits)
    with pytest.raises(ValueError, match="labels go up to 5 but .* class embeddings for 4 classes"):
        load_xlsa17(tmp_path)


def test_class_names_count_differs_from_attribute_columns(tmp_path):
    splits = small_splits()
    splits["allclasses_names"] = np.array([["a"], ["b"], ["c"]], dtype=object)
    write_small(tmp_path, splits)
    with pytest.raises(ValueError, match="att has 5 class columns but .* names 3 classes"):
        load_xlsa17(tmp_path)


def test_zero_based_labels(tmp_path):
    write_small(tmp_path)
    mat = scipy.io.loadmat(str(tmp_path / "res101.mat"))
    scipy.io.savemat(str(tmp_path / "res101.mat"), {"features": mat["features"], "labels": mat["labels"] - 1})
    with pytest.raises(ValueError, match="labels must be 1-based .* found 0"):
        load_xlsa17(tmp_path)


def test_label_count_differs_from_feature_count(tmp_path):
    write_small(tmp_path)
    mat = scipy.io.loadmat(str(tmp_path / "res101.mat"))
    scipy.io.savemat(str(tmp_path / "res101.mat"), {"features": mat["features"], "labels": mat["labels"][:-3]})
    with pytest.raises(ValueError, match=r"labels must have one entry per feature column \(40\), got 37"):
        load_xlsa17(tmp_path)


def test_unseen_class_in_trainval(tmp_path):
    write_small(tmp_path)
    mat = scipy.io.loadmat(str(tmp_path / "res101.mat"))
    labels = mat["labels"].copy()
    labels[0] = labels[-1]  # a trainval image of an unseen class
    scipy.io.savemat(str(tmp_path / "res101.mat"), {"features": mat["features"], "labels": labels})
    with pytest.raises(ValueError, match="test_unseen holds classes that trainval also holds"):
        load_xlsa17(tmp_path)


def test_only_one_of_train_val(tmp_path):
    splits = small_splits()
    splits["train_loc"] = splits["trainval_loc"][:10]
    write_small(tmp_path, splits)
    with pytest.raises(KeyError, match="only one of train_loc / val_loc"):
        load_xlsa17(tmp_path)


def test_missing_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="no att_splits.mat for 'cub'"):
        load_dataset("cub", tmp_path)


# ------------------------------------------------------------------------------------------- HDF5, synthetic

def test_hdf5_round_trip(tmp_path):
    data = make_synthetic_gzsl(num_seen=6, num_unseen=3, train_per_class=5, test_per_class=4)
    save_hdf5(data, tmp_path / "d.h5", class_names=[f"c{i}" for i in range(9)])
    back = load_hdf5(tmp_path / "d.h5")
    for key in ("features", "labels", "trainval", "test_seen", "test_unseen", "train", "val"):
        assert torch.equal(getattr(back, key), getattr(data, key)), key
    assert torch.allclose(back.attributes, data.attributes)
    assert torch.allclose(back.test_task().train_features, data.test_task().train_features)
    assert isinstance(load_dataset(str(tmp_path / "d.h5")), GZSLData)


def test_hdf5_missing_key(tmp_path):
    import h5py
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["features"] = np.zeros((3, 2))
        f["labels"] = np.zeros(3)
    with pytest.raises(KeyError, match="has no 'class_embeddings'"):
        load_hdf5(tmp_path / "bad.h5")


def test_synthetic_is_seeded_and_well_formed():
    a, b, c = make_synthetic_gzsl(seed=1), make_synthetic_gzsl(seed=1), make_synthetic_gzsl(seed=2)
    assert torch.equal(a.features, b.features) and torch.equal(a.attributes, b.attributes)
    assert not torch.equal(a.features, c.features)
    assert (a.seen_classes.numel(), a.unseen_classes.numel()) == (48, 12)
    assert (a.features >= 0).all()
    task = a.validation_task()
    assert task.num_seen + task.num_unseen == 48
    assert not torch.isin(task.class_ids, a.unseen_classes).any()


def test_synthetic_any_feature_dim():
    data = make_synthetic_gzsl(num_seen=5, num_unseen=2, attribute_dim=9, feature_dim=13, train_per_class=4)
    task = data.test_task()
    assert task.feature_dim == 13 and task.attribute_dim == 9 and task.num_classes == 7
