"""Multi-label ZSL datasets on the real NUS-WIDE and Open Images metadata, with small feature stores in tmp_path."""
import functools
import pickle
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from pyzsl.data import word_vectors as wv
from pyzsl.data.multilabel import (MultilabelZSLData, load_multilabel_dataset, load_open_images, nus_wide_labels,
                                   open_images_labels)
from pyzsl.data.store import write_store


def _unit(x):
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return x / x.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------ NUS-WIDE


def test_nus_wide_label_sets(data_root):
    seen, unseen, seen_vecs, unseen_vecs = nus_wide_labels(data_root)
    assert len(seen) == 925 and len(unseen) == 81 and len(set(seen) | set(unseen)) == 1006
    tags = (data_root / "nus_wide" / "TagList1k.txt").read_text().split()
    assert sorted(set(unseen) - set(tags)) == ["computer", "fire", "map", "swimmers", "tattoo", "whales"]
    assert seen == [t for t in tags if t not in set(unseen)]  # TagList1k order
    with open(data_root / "nus_wide" / "NUS_WIDE_pretrained_w2v_glove-wiki-gigaword-300", "rb") as f:
        vecs_1k, vecs_81 = pickle.load(f)
    assert seen_vecs.shape == (925, 300) and unseen_vecs.shape == (81, 300) and seen_vecs.dtype == torch.float32
    for name in ("nature", "blue", seen[-1]):
        torch.testing.assert_close(seen_vecs[seen.index(name)], _unit(vecs_1k[tags.index(name)]))
    torch.testing.assert_close(unseen_vecs, _unit(vecs_81))


def _nus_copy(data_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(data_root / "nus_wide", root / "nus_wide")
    return root


def test_nus_wide_bad_files(data_root, tmp_path):
    root = _nus_copy(data_root, tmp_path)
    vec_file = root / "nus_wide" / "NUS_WIDE_pretrained_w2v_glove-wiki-gigaword-300"
    with open(vec_file, "rb") as f:
        vecs_1k, vecs_81 = pickle.load(f)
    vec_file.chmod(0o644)
    with open(vec_file, "wb") as f:
        pickle.dump([vecs_1k, vecs_81[:80]], f)
    with pytest.raises(ValueError, match=r"81 concepts in Concepts81.txt but vecs_81 has shape \[80, 300\]"):
        nus_wide_labels(root)
    with open(vec_file, "wb") as f:
        pickle.dump([vecs_1k, np.zeros_like(vecs_81)], f)
    with pytest.raises(ValueError, match="the vector of 'airport' \\(row 0\\) is zero"):
        nus_wide_labels(root)
    tag_file = root / "nus_wide" / "TagList1k.txt"
    tag_file.chmod(0o644)
    tag_file.write_text(tag_file.read_text() + "blue\n")
    with pytest.raises(ValueError, match="TagList1k.txt tags must be distinct, 'blue' appears"):
        nus_wide_labels(root)
    (root / "nus_wide" / "Concepts81.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Concepts81.txt"):
        nus_wide_labels(root)


def _permuted_store(path, true_labels, names, n_extra=1, seed=0, shape=(4, 3)):
    """A store whose columns are ``names`` shuffled plus ``n_extra`` unrelated columns; returns its features."""
    g = torch.Generator().manual_seed(seed)
    n, L = true_labels.shape
    perm = torch.randperm(L, generator=g)
    labels = torch.cat([true_labels[:, perm], torch.ones(n, n_extra, dtype=torch.int8)], dim=1)
    store_names = [names[i] for i in perm] + [f"unrelated {j}" for j in range(n_extra)]
    features = torch.randn(n, *shape, generator=g)
    write_store(path, features, labels, store_names, [f"{path.stem}_{i}" for i in range(n)])
    return features


def _random_targets(n, L, seed):
    return torch.randint(-1, 2, (n, L), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_nus_wide_dataset_maps_columns_by_name(data_root, tmp_path):
    seen, unseen, seen_vecs, unseen_vecs = nus_wide_labels(data_root)
    train_targets, test_targets = _random_targets(9, 925, 1), _random_targets(5, 1006, 2)
    train_x = _permuted_store(tmp_path / "train.h5", train_targets, seen, seed=3)
    test_x = _permuted_store(tmp_path / "test.h5", test_targets, unseen + seen, seed=4)
    data = load_multilabel_dataset("nus-wide", data_root, features_dir=tmp_path, val_rows=3)
    assert isinstance(data, MultilabelZSLData) and data.name == "nus-wide" and data.feature_shape == (4, 3)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 5)
    assert data.seen_names == seen and data.unseen_names == unseen and data.gzsl_names == unseen + seen
    torch.testing.assert_close(data.gzsl_vectors, torch.cat([unseen_vecs, seen_vecs]))
    for i in range(3):
        x, y = data.val[i]
        torch.testing.assert_close(x, train_x[i])
        assert torch.equal(y, train_targets[i])
    for i in range(6):
        x, y = data.train[i]
        torch.testing.assert_close(x, train_x[3 + i])
        assert torch.equal(y, train_targets[3 + i])
    for i in range(5):
        x, y = data.test[i]
        torch.testing.assert_close(x, test_x[i])
        assert y.shape == (1006,) and torch.equal(y, test_targets[i])
    # the splits share one file; each DataLoader worker opens its own handle
    loader = torch.utils.data.DataLoader(data.train, batch_size=4, num_workers=2)
    xs, ys = zip(*loader)
    torch.testing.assert_close(torch.cat(xs), train_x[3:])
    assert torch.equal(torch.cat(ys), train_targets[3:])


def test_nus_wide_dataset_errors(data_root, tmp_path, monkeypatch):
    seen, unseen, *_ = nus_wide_labels(data_root)
    with pytest.raises(FileNotFoundError, match=r"expected the feature store .*train.h5 .*python -m pyzsl.extract"):
        load_multilabel_dataset("nus-wide", data_root, features_dir=tmp_path)
    _permuted_store(tmp_path / "train.h5", _random_targets(4, 925, 1), seen)
    with pytest.raises(ValueError, match=r"val_rows must be an int in \[1, 4\).*got 4"):
        load_multilabel_dataset("nus-wide", data_root, features_dir=tmp_path, val_rows=4)
    # a test store without the concept 'whales' (one of the 6 concepts that are not tags)
    keep = [n for n in unseen + seen if n != "whales"]
    _permuted_store(tmp_path / "test.h5", _random_targets(3, 1005, 2), keep)
    with pytest.raises(KeyError, match=r"1 of the 1006 requested label names are not in the file's label_names "
                                       r"\(1006 names\): 'whales'"):
        load_multilabel_dataset("nus-wide", data_root, features_dir=tmp_path, val_rows=2)
    _permuted_store(tmp_path / "test2.h5", _random_targets(3, 1006, 2), unseen + seen, shape=(4, 5))
    (tmp_path / "test2.h5").replace(tmp_path / "test.h5")
    with pytest.raises(ValueError, match=r"feature stores disagree on the feature shape: "
                                         r"\{'train.h5': \(4, 3\), 'test.h5': \(4, 5\)\}"):
        load_multilabel_dataset("nus-wide", data_root, features_dir=tmp_path, val_rows=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'val_row'"):
        load_multilabel_dataset("nus-wide", data_root, features_dir=tmp_path, val_row=2)


# --------------------------------------------------------------------------------------------- Open Images


@pytest.fixture(scope="module")
def oi_glove(data_root):
    with pytest.warns(UserWarning) as record:
        labels = open_images_labels(data_root)
    return labels, [str(w.message) for w in record]


def test_open_images_label_sets(data_root, oi_glove):
    (seen_ids, unseen_ids, seen_names, unseen_names, seen_vecs, unseen_vecs), messages = oi_glove
    d = data_root / "openimages"
    assert len(seen_ids) == 7186 and len(unseen_ids) == 400 and not set(seen_ids) & set(unseen_ids)
    assert seen_ids == (d / "classes-trainable.txt").read_text().split()
    with open(d / "unseen_labels.pkl", "rb") as f:
        all_unseen = pickle.load(f)
    assert len(all_unseen) == 2594
    top = [int(x) for x in (d / "top_400_unseen.csv").read_text(encoding="utf-8-sig").split()]
    assert unseen_ids == [all_unseen[i] for i in top] and unseen_ids[0] == all_unseen[991]
    assert len(seen_names) == 7186 and len(unseen_names) == 400 and all(seen_names) and all(unseen_names)
    assert unseen_names[:3] == ["Fauna", "Flora", "Exercise"]  # /m/... of indices 991, 1039, 120
    assert seen_vecs.shape == (7186, 50) and unseen_vecs.shape == (400, 50)
    torch.testing.assert_close(torch.cat([seen_vecs, unseen_vecs]).norm(dim=1), torch.ones(7586))
    assert any("out-of-vocabulary word(s)" in m and "'beaglier'" in m for m in messages)
    assert any("label names have no word in the vocabulary and get a seeded random unit vector" in m
               and "'Beaglier'" in m for m in messages)


@functools.lru_cache(maxsize=1)
def _glove_files():
    import pyarrow.parquet as pq
    vectors_path, vocab_path = wv.glove_6b_50d_files()
    return pq.read_table(vocab_path).column("index").to_pylist(), np.load(vectors_path, mmap_mode="r")


def _glove_by_hand(word):
    """A word's GloVe 6B 50-d vector read straight from the package files."""
    words, vectors = _glove_files()
    return np.asarray(vectors[words.index(word)], dtype=np.float64)


@pytest.mark.parametrize("name, words", [
    ("Kobe beef", ["kobe", "beef"]),
    ("Dirt track racing", ["dirt", "track", "racing"]),
    ("Ducks, geese and swans", ["ducks", "geese", "and", "swans"]),
    ("Dame’s rocket", ["dame", "rocket"]),
])
def test_open_images_glove_average_by_hand(oi_glove, name, words):
    (_, _, seen_names, unseen_names, seen_vecs, unseen_vecs), _ = oi_glove
    names, vecs = seen_names + unseen_names, torch.cat([seen_vecs, unseen_vecs])
    hand = np.mean([_glove_by_hand(w) for w in words], axis=0)
    torch.testing.assert_close(vecs[names.index(name)], _unit(hand))


def test_open_images_name_without_known_word(oi_glove):
    (_, _, seen_names, unseen_names, seen_vecs, unseen_vecs), _ = oi_glove
    i = unseen_names.index("Bullmastiff")  # not in GloVe 6B
    with pytest.warns(UserWarning) as record:
        again = wv.average_word_vectors(["Bullmastiff"], no_known_word="random")  # deterministic stand-in
    assert [str(w.message).split(":")[1].strip() for w in record] == [
        "1 out-of-vocabulary word(s) left out of their names' means",
        "1 of 1 label names have no word in the vocabulary and get a seeded random unit vector (zero-shot scores for "
        "them are at chance)"]
    torch.testing.assert_close(unseen_vecs[i], _unit(again[0]))


def _oi_copy(data_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(data_root / "openimages", root / "openimages")
    for f in (root / "openimages").iterdir():
        f.chmod(0o644)
    return root


def test_open_images_vector_pickle(data_root, tmp_path):
    g = np.random.default_rng(0)
    seen_v, unseen_v = g.standard_normal((7186, 300)), g.standard_normal((2594, 300))
    path = tmp_path / "vecs.pkl"
    with open(path, "wb") as f:
        pickle.dump((seen_v, unseen_v), f)
    seen_ids, unseen_ids, *_, seen_vecs, unseen_vecs = open_images_labels(data_root, word_vectors=path)
    top = [int(x) for x in (data_root / "openimages" / "top_400_unseen.csv").read_text(encoding="utf-8-sig").split()]
    torch.testing.assert_close(seen_vecs, _unit(seen_v))
    torch.testing.assert_close(unseen_vecs, _unit(unseen_v[top]))
    with open(path, "wb") as f:
        pickle.dump((seen_v[:7000], unseen_v), f)
    with pytest.raises(ValueError, match=r"seen_vecs has shape \[7000, 300\], expected one row per seen label "
                                         r"\(7186\)"):
        open_images_labels(data_root, word_vectors=path)
    with open(path, "wb") as f:
        pickle.dump((seen_v, unseen_v[:400]), f)
    with pytest.raises(ValueError, match=r"unseen_vecs has shape \[400, 300\], expected one row per MID of "
                                         r"unseen_labels.pkl \(2594\)"):
        open_images_labels(data_root, word_vectors=path)


def test_open_images_bad_files(data_root, tmp_path):
    root = _oi_copy(data_root, tmp_path)
    d = root / "openimages"
    top = d / "top_400_unseen.csv"
    original = top.read_text(encoding="utf-8-sig").rstrip() + "\n"  # the published file has no final newline
    top.write_text(original + "2594\n")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 2594\).*got \[2594\]"):
        open_images_labels(root)
    top.write_text(original + "991\n")
    with pytest.raises(ValueError, match="top_400_unseen.csv indices must be distinct, '991' appears"):
        open_images_labels(root)
    top.write_text(original)
    trainable = d / "classes-trainable.txt"
    first = trainable.read_text().split()[0]
    trainable.write_text(trainable.read_text() + first + "\n")
    with pytest.raises(ValueError, match=f"classes-trainable.txt MIDs must be distinct, '{first}' appears"):
        open_images_labels(root)


def test_open_images_dataset(data_root, tmp_path):
    g = np.random.default_rng(0)
    vec_path = tmp_path / "vecs.pkl"
    with open(vec_path, "wb") as f:
        pickle.dump((g.standard_normal((7186, 20)), g.standard_normal((2594, 20))), f)
    seen_ids, unseen_ids, seen_names, unseen_names, *_ = open_images_labels(data_root, word_vectors=vec_path)
    targets = {"train": _random_targets(4, 7186, 1), "val": _random_targets(2, 7186, 2),
               "test": _random_targets(3, 7586, 3)}
    feats = {split: _permuted_store(tmp_path / f"{split}.h5", t, unseen_ids + seen_ids if split == "test"
                                    else seen_ids, seed=i, shape=(6,))
             for i, (split, t) in enumerate(targets.items())}
    data = load_multilabel_dataset("openimages", data_root, features_dir=tmp_path, word_vectors=vec_path)
    assert data.feature_shape == (6,) and data.seen_ids == seen_ids and data.unseen_ids == unseen_ids
    assert data.seen_names == seen_names and data.unseen_names == unseen_names
    assert data.seen_vectors.shape == (7186, 20) and data.unseen_vectors.shape == (400, 20)
    for split in ("train", "val", "test"):
        ds = getattr(data, split)
        assert len(ds) == len(targets[split])
        for i in range(len(ds)):
            x, y = ds[i]
            torch.testing.assert_close(x, feats[split][i])
            assert torch.equal(y, targets[split][i])
    with pytest.raises(FileNotFoundError, match="val.h5"):
        (tmp_path / "val.h5").unlink()
        load_open_images(data_root, features_dir=tmp_path, word_vectors=vec_path)


# --------------------------------------------------------------------------------------- GloVe word vectors


def _tiny_vocabulary():
    words = ["t-shirt", "red", "shirt", "in", "line", "hockey", "dame", "rocket", "s", "18"]
    vectors = np.arange(len(words) * 3, dtype=np.float32).reshape(len(words), 3) + 1
    return wv.WordVectors(words, vectors)


def test_tokenize_rules():
    vocab = _tiny_vocabulary()
    assert wv.tokenize("Red T-shirt", vocab) == ["red", "t-shirt"]  # a known token stays whole
    assert wv.tokenize("Roller in-line hockey", vocab) == ["roller", "in", "line", "hockey"]
    assert wv.tokenize("Dame's rocket (plant)", vocab) == ["dame", "rocket", "plant"]  # one-letter fragment dropped
    assert wv.tokenize("F/A-18 hornet", vocab) == ["18", "hornet"]


def test_average_word_vectors_policies():
    vocab = _tiny_vocabulary()
    with pytest.warns(UserWarning) as record:
        out = wv.average_word_vectors(["Roller in-line hockey", "Red shirt", "Zzyzx"], vocab)
    assert [str(w.message) for w in record] == [
        "average_word_vectors: 2 out-of-vocabulary word(s) left out of their names' means: 'roller', 'zzyzx'",
        "average_word_vectors: 1 of 3 label names have no word in the vocabulary and get a seeded random unit vector "
        "(zero-shot scores for them are at chance): 'Zzyzx'"]
    np.testing.assert_allclose(out[0], vocab.vectors[[3, 4, 5]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(out[1], vocab.vectors[[1, 2]].mean(axis=0), rtol=1e-6)
    assert abs(np.linalg.norm(out[2]) - 1) < 1e-6  # the stand-in is a unit vector, never zero
    with pytest.warns(UserWarning):
        again = wv.average_word_vectors(["Zzyzx", "Qwxv"], vocab)
    np.testing.assert_array_equal(again[0], out[2])  # seeded by the name: the same in every run
    assert not np.allclose(again[0], again[1])
    with pytest.raises(ValueError, match="1 of 2 label names have no word in the vocabulary: 'Zzyzx'"):
        wv.average_word_vectors(["Red shirt", "Zzyzx"], vocab, no_known_word="error")
    with pytest.raises(ValueError, match="no_known_word must be 'random' or 'error'"):
        wv.average_word_vectors(["Red shirt"], vocab, no_known_word="zero")


def test_glove_loaded_once():
    first = wv.load_glove_6b_50d()
    assert first is wv.load_glove_6b_50d() and first.dim == 50 and len(first.words) == 400_000
    assert first.words[:3] == ["the", ",", "."]


# ------------------------------------------------------------------------------------- dispatch and checks


def test_unknown_dataset_and_data_root(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'coco'; known: synthetic, nus-wide, openimages"):
        load_multilabel_dataset("coco", tmp_path)
    monkeypatch.delenv("PYZSL_DATA", raising=False)
    with pytest.raises(ValueError, match="pass data_root .* or set PYZSL_DATA"):
        load_multilabel_dataset("nus-wide", None)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_multilabel_dataset("nus-wide", tmp_path / "absent")


def test_synthetic_dispatch(monkeypatch):
    fake = types.ModuleType("pyzsl.data.synthetic")
    fake.load_synthetic = lambda **options: ("synthetic", options)
    monkeypatch.setitem(sys.modules, "pyzsl.data.synthetic", fake)
    assert load_multilabel_dataset("synthetic", None, seed=3) == ("synthetic", {"seed": 3})


def test_dataclass_checks():
    seen, unseen = _unit(torch.randn(3, 4)), _unit(torch.randn(2, 4))
    ds = torch.utils.data.TensorDataset(torch.zeros(1, 2, 4))
    base = dict(name="t", train=ds, val=ds, test=ds, seen_names=["a", "b", "c"], unseen_names=["d", "e"],
                seen_vectors=seen, unseen_vectors=unseen, feature_shape=(2, 4))
    MultilabelZSLData(**base)
    with pytest.raises(ValueError, match="2 seen label vectors for 3 seen labels"):
        MultilabelZSLData(**{**base, "seen_vectors": seen[:2]})
    with pytest.raises(ValueError, match=r"unseen_vectors rows must be L2-normalised, row 1 \('e'\) has norm 2"):
        MultilabelZSLData(**{**base, "unseen_vectors": unseen * torch.tensor([[1.0], [2.0]])})
    with pytest.raises(ValueError, match="seen vectors are 4-d, unseen vectors 3-d"):
        MultilabelZSLData(**{**base, "unseen_vectors": _unit(torch.randn(2, 3))})
    with pytest.raises(ValueError, match="the unseen and seen labels must be distinct, 'a' appears at positions 0 "
                                         "and 2"):
        MultilabelZSLData(**{**base, "unseen_names": ["a", "e"]})
    with pytest.raises(ValueError, match="seen_vectors must be a float32 tensor"):
        MultilabelZSLData(**{**base, "seen_vectors": seen.double()})
    # repeated display names are fine when the ids differ (Open Images)
    MultilabelZSLData(**{**base, "seen_names": ["a", "a", "c"], "seen_ids": ["/m/1", "/m/2", "/m/3"],
                         "unseen_ids": ["/m/4", "/m/5"]})
