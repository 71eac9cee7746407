"""The HDF5 feature store: round trips, resumable writing, lazy per-worker reading, and every bad-data error."""
import pickle
import re

import h5py
import numpy as np
import pytest
import torch

from pyzsl.data import store as store_module
from pyzsl.data.store import FeatureStore, FeatureStoreWriter, write_store


def make_data(n=13, shape=(5, 3), num_labels=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, *shape, generator=g).to(dtype)
    labels = torch.randint(-1, 2, (n, num_labels), generator=g, dtype=torch.int8)
    names = [f"label {j}" for j in range(num_labels)]
    ids = [f"img_{i:04d}.jpg" for i in range(n)]
    return features, labels, names, ids


def written(tmp_path, name="s.h5", **kwargs):
    features, labels, names, ids = make_data(**kwargs)
    path = write_store(tmp_path / name, features, labels, names, ids, backbone="vgg19", source="test")
    return path, features, labels, names, ids


@pytest.mark.parametrize("shape", [(5, 3), (7,)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_round_trip(tmp_path, shape, dtype):
    path, features, labels, names, ids = written(tmp_path, shape=shape, dtype=dtype)
    ds = FeatureStore(path)
    assert len(ds) == 13 and ds.feature_shape == shape and ds.label_names == names and ds.image_ids == ids
    assert ds.layout == ("regions" if len(shape) == 2 else "pooled")
    assert ds.attrs["backbone"] == "vgg19" and ds.attrs["source"] == "test" and ds.attrs["rows_written"] == 13
    with h5py.File(path) as f:
        assert f["features"].dtype == (np.float16 if dtype == torch.float16 else np.float32)
        assert f["features"].chunks[1:] == shape  # chunks of whole rows
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and y.dtype == torch.int8
        torch.testing.assert_close(x, features[i].float(), rtol=0, atol=0)
        assert torch.equal(y, labels[i])
    x, y = ds[-1]
    assert torch.equal(y, labels[-1])
    with pytest.raises(IndexError, match="index 13 out of range for 13 items"):
        ds[13]


def test_rows_and_label_columns(tmp_path):
    path, features, labels, names, ids = written(tmp_path)
    ds = FeatureStore(path, rows=[7, 2, 11], label_columns=["label 4", "label 0"])
    assert len(ds) == 3 and ds.label_names == ["label 4", "label 0"] and ds.image_ids == [ids[7], ids[2], ids[11]]
    x, y = ds[1]
    torch.testing.assert_close(x, features[2])
    assert torch.equal(y, labels[2, [4, 0]])
    by_index = FeatureStore(path, rows=range(3, 9), label_columns=[5, 1])
    assert len(by_index) == 6 and torch.equal(by_index[0][1], labels[3, [5, 1]])
    split = by_index.with_rows(slice(10, None))
    assert len(split) == 3 and torch.equal(split[2][1], labels[12, [5, 1]])
    assert len(by_index) == 6  # with_rows leaves the original alone


def test_dataloader_workers_open_their_own_handle(tmp_path):
    path, features, labels, *_ = written(tmp_path, n=37)
    ds = FeatureStore(path, rows=range(1, 37))
    ds[0]  # opens a handle in this process; it must not travel to the workers
    pickle.dumps(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, shuffle=False)
    xs, ys = zip(*loader)
    torch.testing.assert_close(torch.cat(xs), features[1:])
    assert torch.equal(torch.cat(ys), labels[1:])
    shuffled = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=True,
                                           generator=torch.Generator().manual_seed(3))
    assert sorted(torch.cat([x for x, _ in shuffled])[:, 0, 0].tolist()) == sorted(features[1:, 0, 0].tolist())


def test_no_labels(tmp_path):
    features = torch.randn(4, 8)
    path = write_store(tmp_path / "unlabelled.h5", features, None, [], ["a", "b", "c", "d"])
    ds = FeatureStore(path)
    x, y = ds[2]
    assert ds.layout == "pooled" and y.shape == (0,) and torch.equal(x, features[2])


def test_writer_appends_and_resumes(tmp_path):
    features, labels, names, ids = make_data(n=10)
    path = tmp_path / "resumable.h5"
    kwargs = dict(num_rows=10, feature_shape=(5, 3), label_names=names, dtype=torch.float32,
                  attrs={"backbone": "vgg19"})
    with FeatureStoreWriter(path, **kwargs) as w:
        w.write(features[:4], labels[:4], ids[:4])
        w.write(features[4:6].numpy(), labels[4:6].numpy(), ids[4:6])
        assert w.rows_written == 6
    with pytest.raises(ValueError, match=r"incomplete extraction, rows_written = 6 of 10 rows"):
        FeatureStore(path)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        FeatureStoreWriter(path, **kwargs)
    with FeatureStoreWriter(path, resume=True, **kwargs) as w:
        assert w.rows_written == 6
        with pytest.raises(ValueError, match=r"writing 5 rows would pass num_rows = 10 \(6 already written\)"):
            w.write(features[5:], labels[5:], ids[5:])
        bad = labels[6:].clone()
        bad[1, 5] = -2
        with pytest.raises(ValueError, match=r"found -2 at row 7, column 5"):  # rows counted from the file's start
            w.write(features[6:], bad, ids[6:])
        w.write(features[6:], labels[6:], ids[6:])
    ds = FeatureStore(path)
    torch.testing.assert_close(torch.stack([ds[i][0] for i in range(10)]), features)
    assert torch.equal(torch.stack([ds[i][1] for i in range(10)]), labels) and ds.image_ids == ids


def test_writer_resume_on_missing_file_creates_it(tmp_path):
    features, labels, names, ids = make_data(n=3)
    with FeatureStoreWriter(tmp_path / "new.h5", num_rows=3, feature_shape=(5, 3), label_names=names,
                            resume=True) as w:
        assert w.rows_written == 0
        w.write(features, labels, ids)
    assert len(FeatureStore(tmp_path / "new.h5")) == 3


@pytest.mark.parametrize("change, message", [
    (dict(num_rows=11), r"features have shape \[10, 5, 3\], this writer expects \[11, 5, 3\]"),
    (dict(feature_shape=(5, 4)), r"features have shape \[10, 5, 3\], this writer expects \[10, 5, 4\]"),
    (dict(dtype=torch.float16), "the file's features are float32, this writer writes float16"),
    (dict(label_names=[f"label {j}" for j in range(5)]), r"label_names differ \(6 names in the file, 5 given\)"),
    (dict(label_names=[f"label {j}" for j in range(5)] + ["other"]),
     r"label_names differ \(position 5: 'label 5' in the file, 'other' given\)"),
    (dict(attrs={"backbone": "resnet101"}), "attribute 'backbone' is 'vgg19' in the file, 'resnet101' given"),
])
def test_writer_resume_mismatch(tmp_path, change, message):
    _, _, names, _ = make_data(n=10)
    path = tmp_path / "r.h5"
    kwargs = dict(num_rows=10, feature_shape=(5, 3), label_names=names, dtype=torch.float32,
                  attrs={"backbone": "vgg19"})
    FeatureStoreWriter(path, **kwargs).close()
    with pytest.raises(ValueError, match=message):
        FeatureStoreWriter(path, resume=True, **{**kwargs, **change})


def test_writer_argument_errors(tmp_path):
    features, labels, names, ids = make_data(n=4)
    p = tmp_path / "w.h5"
    with pytest.raises(ValueError, match="num_rows must be an int >= 1, got 0"):
        FeatureStoreWriter(p, num_rows=0, feature_shape=(5, 3), label_names=names)
    with pytest.raises(ValueError, match=r"layout='pooled' disagrees with feature_shape \(5, 3\)"):
        FeatureStoreWriter(p, num_rows=4, feature_shape=(5, 3), label_names=names, layout="pooled")
    with pytest.raises(ValueError, match="feature_shape must be"):
        FeatureStoreWriter(p, num_rows=4, feature_shape=(2, 5, 3), label_names=names)
    with pytest.raises(ValueError, match="dtype must be torch.float16 or torch.float32"):
        FeatureStoreWriter(p, num_rows=4, feature_shape=(5, 3), label_names=names, dtype=torch.float64)
    with pytest.raises(ValueError, match="label_names must be distinct, 'a' appears at positions 0 and 2"):
        FeatureStoreWriter(p, num_rows=4, feature_shape=(5, 3), label_names=["a", "b", "a"])
    with pytest.raises(ValueError, match="reserved"):
        FeatureStoreWriter(p, num_rows=4, feature_shape=(5, 3), label_names=names, attrs={"rows_written": 4})
    assert not p.exists()
    with FeatureStoreWriter(p, num_rows=4, feature_shape=(5, 3), label_names=names) as w:
        with pytest.raises(ValueError, match=r"features must have shape \[n, 5, 3\], got \[4, 3, 5\]"):
            w.write(features.transpose(1, 2), labels, ids)
        with pytest.raises(ValueError, match=r"labels must have shape \[4, 6\].*got \[4, 5\]"):
            w.write(features, labels[:, :5], ids)
        bad = labels.clone()
        bad[2, 3] = 2
        with pytest.raises(ValueError, match=r"labels must take values in \{1, 0, -1\}, found 2 at row 2, column 3"):
            w.write(features, bad, ids)
        with pytest.raises(ValueError, match="labels must be an integer array.*float32"):
            w.write(features, labels.float(), ids)
        with pytest.raises(ValueError, match="labels is None but the store has 6 label columns"):
            w.write(features, None, ids)
        with pytest.raises(ValueError, match="image_ids must be 4 strings.*got 3 items"):
            w.write(features, labels, ids[:3])
        nan = features.clone()
        nan[1, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="features must be finite, row 1 has NaN/inf"):
            w.write(nan, labels, ids)
        assert w.rows_written == 0  # nothing was written by the failed calls
        w.write(features, labels, ids)


def _rewrite(path, key, data):
    with h5py.File(path, "r+") as f:
        del f[key]
        if data is not None:
            f.create_dataset(key, data=data)


@pytest.mark.parametrize("key", ["features", "labels", "label_names", "image_ids"])
def test_missing_key(tmp_path, key):
    path, *_ = written(tmp_path)
    _rewrite(path, key, None)
    with pytest.raises(KeyError, match=rf"{re.escape(str(path))}\): missing dataset '{key}'"):
        FeatureStore(path)


def test_missing_attribute_and_file(tmp_path):
    path, *_ = written(tmp_path)
    with h5py.File(path, "r+") as f:
        del f.attrs["rows_written"]
    with pytest.raises(KeyError, match="missing file attribute 'rows_written'"):
        FeatureStore(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        FeatureStore(tmp_path / "absent.h5")


def test_labels_not_int8(tmp_path):
    path, _, labels, *_ = written(tmp_path)
    _rewrite(path, "labels", labels.numpy().astype(np.int32))
    with pytest.raises(ValueError, match="labels must be int8 with values in {1, 0, -1}, got dtype int32"):
        FeatureStore(path)


def test_label_values_checked_in_blocks(tmp_path, monkeypatch):
    """A bad value far from the first block is found, with its row, column and value."""
    path, _, labels, *_ = written(tmp_path, n=50)
    bad = labels.numpy().copy()
    bad[41, 4] = -3
    bad[45, 0] = 7
    _rewrite(path, "labels", bad)
    monkeypatch.setattr(store_module, "_LABEL_SCAN_BYTES", 6 * 4)  # 4 rows per block
    with pytest.raises(ValueError, match=r"labels must take values in \{1, 0, -1\}, found -3 at row 41, column 4"):
        FeatureStore(path)


def test_label_names_length_and_duplicates(tmp_path):
    path, *_ = written(tmp_path)
    with h5py.File(path, "r+") as f:
        del f["label_names"]
        f.create_dataset("label_names", data=["a", "b", "c"], dtype=h5py.string_dtype())
    with pytest.raises(ValueError, match="label_names has 3 names but labels has 6 columns"):
        FeatureStore(path)
    with h5py.File(path, "r+") as f:
        del f["label_names"]
        f.create_dataset("label_names", data=list("abcdeb"), dtype=h5py.string_dtype())
    with pytest.raises(ValueError, match="label_names must be distinct, 'b' appears at positions 1 and 5"):
        FeatureStore(path)


@pytest.mark.parametrize("key, rows, message", [
    ("labels", 12, r"row counts disagree: features 13, labels 12, image_ids 13"),
    ("image_ids", 14, r"row counts disagree: features 13, labels 13, image_ids 14"),
])
def test_row_counts_disagree(tmp_path, key, rows, message):
    path, _, labels, _, ids = written(tmp_path)
    with h5py.File(path, "r+") as f:
        del f[key]
        if key == "labels":
            f.create_dataset(key, data=labels.numpy()[:rows])
        else:
            f.create_dataset(key, data=ids + ["extra"], dtype=h5py.string_dtype())
    with pytest.raises(ValueError, match=message):
        FeatureStore(path)


def test_layout_and_dtype_errors(tmp_path):
    path, features, *_ = written(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["layout"] = "pooled"
    with pytest.raises(ValueError, match=r"layout 'pooled' needs 2-D features, got shape \[13, 5, 3\]"):
        FeatureStore(path)
    with h5py.File(path, "r+") as f:
        f.attrs["layout"] = "regions"
    _rewrite(path, "features", features.double().numpy())
    with pytest.raises(ValueError, match="features must be float16 or float32, got float64"):
        FeatureStore(path)


def test_selection_errors(tmp_path):
    path, *_ = written(tmp_path)
    with pytest.raises(KeyError, match=r"2 of the 3 requested label names are not in the file's label_names "
                                       r"\(6 names\): 'cat', 'dog'"):
        FeatureStore(path, label_columns=["label 1", "cat", "dog"])
    with pytest.raises(ValueError, match=r"label_columns must lie in \[0, 6\)"):
        FeatureStore(path, label_columns=[0, 6])
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 13\), got values from 2 to 13"):
        FeatureStore(path, rows=[2, 13])
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 13\), got range\(5, 14\)"):
        FeatureStore(path, rows=range(5, 14))
