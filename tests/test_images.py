"""pyzsl.data.images: image sets, probing, preprocessing geometry, DALI vs PIL agreement, determinism, bad files."""
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyzsl.data import images as I

pytest.importorskip("nvidia.dali")


def sklearn_images() -> list[Path]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn (test extra) is not installed; its sample images are used here")
    return sorted((Path(spec.origin).parent / "datasets" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def real_images(data_root) -> list[Path]:
    """The NUS-WIDE photos and CUB crops of the shared data, plus scikit-learn's china.jpg and flower.jpg."""
    paths = sorted((data_root / "images").rglob("*.jpg")) + sklearn_images()
    assert len(paths) >= 20
    return paths


def _items(paths, preset):
    return I.make_items(paths, I.probe_images(paths), preset)


def _load(items, preset, loader, **kw):
    out = list(I.load_batches(items, preset, loader=loader, **kw))
    return torch.cat([b for b, _ in out]), [it.position for _, kept in out for it in kept]


def _bad_jpeg_bytes(good: bytes) -> bytes:
    """A whole JPEG whose scan header names an undefined Huffman table: the probe passes, no decoder can decode it.

    (A JPEG cut in half with its end marker glued back on is no good here: libjpeg fills the rest with grey and
    only warns, in DALI and PIL alike.)"""
    sos = good.index(b"\xff\xda")
    return good[: sos + 6] + b"\x77" + good[sos + 7:]


# ---------------------------------------------------------------------------------------------------- image sets
def test_scan_folder_labels_by_first_level_folder(data_root):
    s = I.scan_folder(data_root / "images" / "cub")
    species = sorted(p.name for p in (data_root / "images" / "cub").iterdir())
    assert s.label_names == species and len(s) == 20
    assert s.labels.dtype == torch.int8 and s.labels.shape == (20, len(species))
    assert ((s.labels == 1).sum(1) == 1).all() and ((s.labels == -1).sum(1) == len(species) - 1).all()
    for image_id, row in zip(s.image_ids, s.labels):
        assert species[int(row.argmax())] == image_id.split("/")[0]
    flat = I.scan_folder(data_root / "images" / "nus_wide")
    assert flat.label_names == [] and flat.labels.shape == (3, 0)
    ordered = I.scan_folder(data_root / "images" / "cub", label_names=species[::-1])
    assert ordered.label_names == species[::-1] and torch.equal(ordered.labels, s.labels.flip(1))
    with pytest.raises(ValueError, match="not in label_names"):
        I.scan_folder(data_root / "images" / "cub", label_names=species[:2])


def test_scan_folder_rejects_a_mix_of_class_folders_and_loose_images(tmp_path, real_images):
    (tmp_path / "a").mkdir()
    shutil.copy(real_images[0], tmp_path / "a" / "x.jpg")
    shutil.copy(real_images[1], tmp_path / "loose.jpg")
    with pytest.raises(ValueError, match="loose.jpg"):
        I.scan_folder(tmp_path)


def test_read_image_list(tmp_path, real_images):
    (tmp_path / "with space").mkdir()
    shutil.copy(real_images[0], tmp_path / "with space" / "a.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{real_images[1]} sky -water\n\nwith space/a.jpg\twater\tperson\n{real_images[2]}\n")
    s = I.read_image_list(lst)
    assert s.label_names == ["person", "sky", "water"]
    assert s.labels.tolist() == [[-1, 1, -1], [1, -1, 1], [-1, -1, -1]]
    assert s.paths[1] == tmp_path / "with space" / "a.jpg" and s.image_ids[1] == "with space/a.jpg"
    u = I.read_image_list(lst, unlisted="unannotated")
    assert u.labels.tolist() == [[0, 1, -1], [1, 0, 1], [0, 0, 0]]
    lst.write_text(f"{real_images[1]} a\n{real_images[1]} b\n")
    with pytest.raises(ValueError, match="twice"):
        I.read_image_list(lst)
    with pytest.raises(ValueError, match="unlisted"):
        I.read_image_list(lst, unlisted="zero")


# ------------------------------------------------------------------------------------------------------- probing
def test_probe_reads_sizes_without_decoding(real_images):
    for path, probe in zip(real_images, I.probe_images(real_images)):
        with Image.open(path) as im:
            assert probe.ok and (probe.height, probe.width) == (im.height, im.width)


def test_probe_names_what_is_wrong(tmp_path, real_images):
    good = real_images[0].read_bytes()
    png = tmp_path / "ok.png"
    Image.open(real_images[0]).save(png)
    cases = {
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"hello world " * 20, "not an image"),
        "cut.jpg": (good[: len(good) // 2], "truncated JPEG"),
        "cut.png": (png.read_bytes()[:-40], "truncated"),  # cut inside the head PIL parses, or at IEND
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        probe = I.probe_image(tmp_path / name)
        assert not probe.ok and reason in probe.error, (name, probe)
    assert I.probe_image(png).ok
    assert "cannot read" in I.probe_image(tmp_path / "missing.jpg").error


def test_probe_swaps_sides_for_rotating_exif(tmp_path, real_images):
    im = Image.open(real_images[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    im.save(tmp_path / "r.jpg", exif=exif)
    probe = I.probe_image(tmp_path / "r.jpg")
    assert (probe.height, probe.width) == (im.width, im.height)
    items = I.make_items([tmp_path / "r.jpg"], [probe], "tresnet")
    dali, _ = _load(items, "tresnet", "dali")
    pil, _ = _load(items, "tresnet", "pil", threads=0)
    upright = torch.from_numpy(np.array(im.transpose(Image.Transpose.ROTATE_270).resize((224, 224)))).float()
    assert (dali[0] * 255 - upright.permute(2, 0, 1)).abs().mean() < 2  # the orientation was applied
    assert (dali - pil).abs().mul(255)[..., 1:-1, 1:-1].max() <= 1.0 + 1e-3


# ------------------------------------------------------------------------------------------------- preprocessing
def test_plan_follows_tf_slim_geometry():
    vgg = I.PRESETS["vgg"]
    assert vgg.plan(375, 500) == (256, 341, 16, 58)  # 500 * 256 / 375 = 341.33; offsets floor (256-224)/2 ...
    assert vgg.plan(500, 375) == (341, 256, 58, 16)
    assert vgg.plan(300, 450) == (256, 384, 16, 80)  # 384 exactly
    assert vgg.plan(224, 225) == (256, 257, 16, 16)  # 225 * 256 / 224 = 257.14, offset floor(33 / 2) = 16
    assert I.PRESETS["tresnet"].plan(375, 500) == (224, 224, 0, 0)
    with pytest.raises(ValueError, match="one of"):
        I.get_preset("nope")
    with pytest.raises(ValueError, match="exactly one"):
        I.Preprocess("bad", resize_shorter=256, resize_to=(224, 224))


@pytest.mark.parametrize("preset", sorted(I.PRESETS))
def test_dali_and_pil_agree(real_images, preset):
    """Both paths decode with libjpeg-turbo and resample linearly with antialiasing, on the same geometry.

    Measured: with a centre crop every value agrees within 1 pixel level (the two resamplers round differently;
    the decoded pixels are identical). Without a crop (TResNet's square resize) the outermost row and column differ
    by up to ~12 levels, because at the image edge PIL renormalises its truncated filter while DALI clamps to the
    edge pixel; the interior still agrees within 1 level. The asserted tolerance is exactly that, in pixel levels.
    """
    p = I.get_preset(preset)
    items = _items(real_images, p)
    dali, dali_pos = _load(items, p, "dali", batch_size=8, threads=2)
    pil, pil_pos = _load(items, p, "pil", batch_size=8, threads=0)
    assert dali.dtype == pil.dtype == torch.float32 and dali.shape == (len(real_images), 3, *p.output_size)
    assert dali_pos == pil_pos == list(range(len(real_images)))
    levels = (dali - pil).abs() * torch.tensor(p.std).view(1, 3, 1, 1)
    assert levels[..., 1:-1, 1:-1].max() <= 1.0 + 1e-3
    if p.crop is not None:
        assert levels.max() <= 1.0 + 1e-3
    assert levels.mean() < 0.2  # most pixels agree exactly
    # the normalisation itself: back on the 0..255 scale every value is a whole pixel level
    pixels = dali * torch.tensor(p.std).view(1, 3, 1, 1) + torch.tensor(p.mean).view(1, 3, 1, 1)
    assert (pixels - pixels.round()).abs().max() < 1e-3 and pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


@pytest.mark.parametrize("loader", ["dali", "pil"])
def test_deterministic_and_independent_of_batching(real_images, loader):
    items = _items(real_images, "vgg")
    a, _ = _load(items, "vgg", loader, batch_size=8, threads=2 if loader == "dali" else 0)
    b, _ = _load(items, "vgg", loader, batch_size=8, threads=2 if loader == "dali" else 0)
    c, _ = _load(items, "vgg", loader, batch_size=3, threads=1)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("loader", ["dali", "pil"])
def test_an_image_that_fails_to_decode_is_skipped_and_named(tmp_path, real_images, loader):
    paths = list(real_images[:7])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(_bad_jpeg_bytes(real_images[3].read_bytes()))
    assert I.probe_image(bad).ok  # only decoding finds it
    paths.insert(4, bad)
    items = _items(paths, "vgg")
    skipped = []
    with pytest.warns(I.CorruptImageWarning, match="bad.jpg"):
        got, positions = _load(items, "vgg", loader, batch_size=3, threads=1,
                               on_skip=lambda item, reason: skipped.append((item.path, reason)))
    assert [Path(p) for p, _ in skipped] == [bad] and skipped[0][1]
    assert positions == [0, 1, 2, 3, 5, 6, 7]
    clean, _ = _load(_items(real_images[:7], "vgg"), "vgg", loader, batch_size=3, threads=1)
    assert torch.equal(got, clean)


def test_batches_follow_positions(real_images):
    """Batches hold the items whose position // batch_size agree, whatever subset is loaded (resume relies on it)."""
    items = _items(real_images[:10], "tresnet")
    sizes = [len(kept) for _, kept in I.load_batches(items[3:], "tresnet", batch_size=4, threads=1)]
    assert sizes == [1, 4, 2]
    with pytest.raises(ValueError, match="increasing"):
        list(I.load_batches(items[::-1], "tresnet"))
    with pytest.raises(ValueError, match="loader"):
        list(I.load_batches(items, "tresnet", loader="cv2"))


@pytest.mark.needs_cuda
def test_dali_gpu_decoding_matches_cpu(real_images):
    """nvJPEG (``mixed``) and libjpeg-turbo use different IDCT and chroma upsampling, so pixels may differ by a few
    levels; the images must still agree on average to a fraction of a level."""
    p = I.get_preset("vgg")
    items = _items(real_images, p)
    cpu, _ = _load(items, p, "dali", batch_size=8, threads=2)
    gpu, _ = _load(items, p, "dali", batch_size=8, threads=2, device="cuda")
    assert gpu.is_cuda and gpu.shape == cpu.shape
    assert (gpu.cpu() - cpu).abs().mean() < 1.0
