"""Image loading for feature extraction: image sets, per-paper preprocessing, and two loaders with the same output.

**Image sets** (:func:`image_set`):

- a folder tree: every image under ``root`` is one item, its id the path relative to ``root`` (``/``-separated); the
  first-level sub-folder is its class (one label column per sub-folder, as torchvision's ``ImageFolder``), so labels
  are 1 for the image's folder and -1 for the others. Images directly in ``root`` have no class: with no sub-folders
  at all the set has no label columns, a mix of both is an error.
- a list file: one image per line, ``path label1 label2 ...`` (whitespace-separated; a line holding a tab is split on
  tabs instead, so paths may contain spaces). Relative paths are taken from the list file's folder and become the
  image id as written. A label ``name`` marks a positive, ``-name`` an explicit negative; a label a line does not
  name is -1 (negative, fully annotated data such as NUS-WIDE) or 0 with ``unlisted="unannotated"`` (Open Images).
  Empty lines and lines starting with ``#`` are skipped.

Label columns are sorted by name unless ``label_names`` gives their order (e.g. xlsa17's ``allclasses.txt``).

**Preprocessing** (:data:`PRESETS`): resize (the short side to a length keeping the aspect ratio, or both sides to a
fixed size), a centre crop, and per-channel ``(x - mean) / std`` on the 0..255 scale, float32 CHW. The resized size
and the crop position are computed once in Python (:meth:`Preprocess.plan`) and given to both loaders, so DALI and
PIL differ only in their decoders and resamplers (both linear with antialiasing), never in geometry.

**Loaders** (:func:`load_batches`): ``"dali"``, an NVIDIA DALI pipeline (CPU operators with no GPU; ``mixed``
decoding and GPU resizing on a CUDA device), and ``"pil"``, a DataLoader over PIL/torchvision for users without
DALI. Both yield ``(images float32 [B, 3, H, W], positions)``.

**Unreadable images.** :func:`probe_images` reads each file's header (format, size, EXIF orientation) and its last
1 KiB (a JPEG must end with its end-of-image marker, a PNG with its IEND chunk), which finds files that are not
images, empty, or cut short by an interrupted download (the common failures), without decoding. Files that pass the
probe but still fail to decode are caught per batch: DALI stops its whole pipeline on one bad sample, so the loader
rebuilds it and decodes that batch's samples one at a time to name the bad file; the PIL loader catches errors per
image. Either way the file is skipped with a :class:`CorruptImageWarning` naming it, and reported to ``on_skip``.
"""
from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Formats both decoders read (PIL's format names).
_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
# EXIF orientations 5..8 rotate by 90 degrees, so the decoded image has width and height swapped.
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_TAIL_BYTES = 1024


class CorruptImageWarning(UserWarning):
    """An image was skipped because it cannot be read or decoded."""


# ------------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocess:
    """One paper's preprocessing.

    Args:
        name: the preset's name.
        resize_shorter: resize so the short side has this length, keeping the aspect ratio; or
        resize_to: resize to exactly (height, width) (the aspect ratio is not kept).
        crop: the centre crop (height, width) after resizing; ``None`` keeps the resized image.
        mean, std: per-channel (R, G, B) on the 0..255 pixel scale; the output is ``(x - mean) / std``.
    """

    name: str
    resize_shorter: Optional[int] = None
    resize_to: Optional[tuple[int, int]] = None
    crop: Optional[tuple[int, int]] = None
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if (self.resize_shorter is None) == (self.resize_to is None):
            raise ValueError(f"Preprocess {self.name!r}: give exactly one of resize_shorter and resize_to")
        if self.resize_to is None and self.crop is None:
            raise ValueError(f"Preprocess {self.name!r}: resize_shorter needs a crop, or images would differ in size")

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resize_to

    def plan(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(resized height, resized width, crop top, crop left) for an image of ``height`` x ``width``.

        The short side rounds as TF-slim's ``_aspect_preserving_resize`` (``rint``, half to even, as Python's
        ``round``) and the crop offset floors as its ``_central_crop``, so the LESA preset reproduces vgg_preprocessing.
        """
        if self.resize_to is not None:
            rh, rw = self.resize_to
        else:
            scale = self.resize_shorter / min(height, width)
            rh, rw = max(1, round(height * scale)), max(1, round(width * scale))
        ch, cw = self.output_size
        if ch > rh or cw > rw:
            raise ValueError(f"Preprocess {self.name!r}: crop {ch}x{cw} is larger than the resized image {rh}x{rw}")
        return rh, rw, (rh - ch) // 2, (rw - cw) // 2


_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

PRESETS: dict[str, Preprocess] = {
    # LESA: TF-slim vgg_preprocessing, eval mode (short side 256, central crop 224, RGB mean subtraction, no scaling).
    "vgg": Preprocess("vgg", resize_shorter=256, crop=(224, 224), mean=(123.68, 116.78, 103.94)),
    # xlsa17 / ResNet-101: the standard ImageNet evaluation transform (short side 256, centre crop 224, ImageNet
    # mean and std), which is what the timm/torchvision ResNet-101 weights were trained and evaluated with; xlsa17
    # itself only states 224 x 224 inputs.
    "resnet": Preprocess("resnet", resize_shorter=256, crop=(224, 224), mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
    # Region maps at 448 (14 x 14 ResNet-101 regions, as SC-EGG / TransZero / DAZLE): short side 512, crop 448.
    "resnet448": Preprocess("resnet448", resize_shorter=512, crop=(448, 448), mean=_IMAGENET_MEAN, std=_IMAGENET_STD),
    # SDL / TResNet: a square resize with no crop and pixels scaled to [0, 1], no mean (TResNet's timm config has
    # mean 0, std 1; SDL's infer.py resizes to input_size x input_size and divides by 255).
    "tresnet": Preprocess("tresnet", resize_to=(224, 224), std=(255.0, 255.0, 255.0)),
    "tresnet448": Preprocess("tresnet448", resize_to=(448, 448), std=(255.0, 255.0, 255.0)),
    # EfficientNet-Lite (TF weights): the TF lite builder's mean 127, std 128; short side 256, crop 224.
    "efficientnet_lite": Preprocess("efficientnet_lite", resize_shorter=256, crop=(224, 224), mean=(127.0,) * 3,
                                    std=(128.0,) * 3),
}


def get_preset(preset: Union[str, Preprocess]) -> Preprocess:
    if isinstance(preset, Preprocess):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or a Preprocess, got {preset!r}")
    return PRESETS[preset]


# ---------------------------------------------------------------------------------------------------- image sets
@dataclass
class ImageSet:
    """Images with their ids and labels: ``labels`` [N, L] int8 in {1, 0, -1}, columns named by ``label_names``."""

    paths: list[Path]
    image_ids: list[str]
    labels: Tensor
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _order_labels(found: set[str], label_names: Optional[Sequence[str]], where: str) -> list[str]:
    if label_names is None:
        return sorted(found)
    names = list(label_names)
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: label_names has duplicates")
    missing = sorted(found - set(names))
    if missing:
        raise ValueError(f"{where}: {len(missing)} label(s) are not in label_names, e.g. {missing[:5]}")
    return names


def scan_folder(root: PathLike, label_names: Optional[Sequence[str]] = None) -> ImageSet:
    """The images under ``root`` (recursively, sorted), labelled by their first-level sub-folder (module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"scan_folder: root {root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"scan_folder: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    rel = [p.relative_to(root) for p in paths]
    classes = [r.parts[0] if len(r.parts) > 1 else None for r in rel]
    at_root = [str(r) for r, c in zip(rel, classes) if c is None]
    if at_root and len(at_root) < len(rel):
        raise ValueError(f"scan_folder: {root} mixes images in sub-folders (the classes) with {len(at_root)} image(s) "
                         f"directly in it, e.g. {at_root[0]!r}; move them into a class folder")
    names = _order_labels({c for c in classes if c is not None}, label_names, f"scan_folder({root})")
    labels = torch.full((len(paths), len(names)), -1, dtype=torch.int8)
    column = {n: j for j, n in enumerate(names)}
    for i, c in enumerate(classes):
        if c is not None:
            labels[i, column[c]] = 1
    if not names:
        labels = torch.zeros((len(paths), 0), dtype=torch.int8)
    return ImageSet(paths, [r.as_posix() for r in rel], labels, names)


def read_image_list(path: PathLike, *, unlisted: str = "negative",
                    label_names: Optional[Sequence[str]] = None) -> ImageSet:
    """Reads a list file, ``path label1 -label2 ...`` per line (module docstring)."""
    path = Path(path)
    if unlisted not in ("negative", "unannotated"):
        raise ValueError(f"read_image_list: unlisted must be 'negative' or 'unannotated', got {unlisted!r}")
    entries: list[tuple[str, list[str]]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f for f in (line.split("\t") if "\t" in line else line.split())]
        fields = [f.strip() for f in fields if f.strip()]
        bad = [f for f in fields[1:] if f in ("-", "")]
        if bad:
            raise ValueError(f"read_image_list: {path}:{lineno}: empty label name")
        entries.append((fields[0], fields[1:]))
    if not entries:
        raise ValueError(f"read_image_list: {path} lists no images")
    ids = [e[0] for e in entries]
    seen: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        if image_id in seen:
            raise ValueError(f"read_image_list: {path} lists {image_id!r} twice (entries {seen[image_id]} and {i})")
        seen[image_id] = i
    found = {t.lstrip("-") if t.startswith("-") else t for _, tokens in entries for t in tokens}
    names = _order_labels(found, label_names, f"read_image_list({path})")
    column = {n: j for j, n in enumerate(names)}
    labels = torch.full((len(entries), len(names)), -1 if unlisted == "negative" else 0, dtype=torch.int8)
    for i, (_, tokens) in enumerate(entries):
        for t in tokens:
            labels[i, column[t[1:] if t.startswith("-") else t]] = -1 if t.startswith("-") else 1
    base = path.parent
    paths = [Path(p) if Path(p).is_absolute() else base / p for p in ids]
    return ImageSet(paths, ids, labels, names)


def image_set(source: PathLike, *, unlisted: str = "negative",
              label_names: Optional[Sequence[str]] = None) -> ImageSet:
    """A folder tree or a list file (module docstring)."""
    source = Path(source)
    if source.is_dir():
        return scan_folder(source, label_names)
    if source.is_file():
        return read_image_list(source, unlisted=unlisted, label_names=label_names)
    raise FileNotFoundError(f"image_set: source {source} is neither a folder nor a list file")


# ------------------------------------------------------------------------------------------------------- probing
@dataclass(frozen=True)
class Probe:
    """What :func:`probe_images` found: the decoded (EXIF-oriented) size, or why the file is unreadable."""

    height: int = 0
    width: int = 0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def probe_image(path: PathLike) -> Probe:
    """Header and tail check of one file, without decoding it (module docstring)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except OSError as e:
        return Probe(error=f"cannot read: {e.strerror or e}")
    if empty:
        return Probe(error="empty file")
    try:
        with Image.open(path) as im:  # lazy: reads the header (and, for PNG, the chunk list), decodes nothing
            fmt, (w, h) = im.format, im.size
            orientation = im.getexif().get(0x0112, 1)
    except UnidentifiedImageError:
        return Probe(error="not an image PIL can identify")
    except Exception as e:  # a header cut short, a malformed EXIF block, ...
        return Probe(error=f"unreadable header: {type(e).__name__}: {e}")
    if fmt not in _FORMATS:
        return Probe(error=f"format {fmt} is not one of {_FORMATS}")
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return Probe(error="truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in tail:
        return Probe(error="truncated PNG (no IEND chunk)")
    if w < 1 or h < 1:
        return Probe(error=f"empty image {w}x{h}")
    if orientation in _TRANSPOSED_ORIENTATIONS:
        w, h = h, w
    return Probe(h, w)


def probe_images(paths: Sequence[PathLike], threads: int = 4, progress: bool = False) -> list[Probe]:
    """:func:`probe_image` over many files on ``threads`` threads (file reads release the GIL)."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(tqdm(pool.map(probe_image, paths, chunksize=64), total=len(paths), desc="probing images",
                         unit="img", disable=not progress, leave=False))


# ------------------------------------------------------------------------------------------------------- loaders
@dataclass(frozen=True)
class LoadItem:
    """One image to load: its position in the caller's list, its path, and its :meth:`Preprocess.plan`."""

    position: int
    path: str
    plan: tuple[int, int, int, int]


def make_items(paths: Sequence[PathLike], probes: Sequence[Probe], preset: Union[str, Preprocess],
               positions: Optional[Sequence[int]] = None) -> list[LoadItem]:
    """Load items for the images whose probe passed (``positions`` selects a subset of ``paths``)."""
    p = get_preset(preset)
    idx = range(len(paths)) if positions is None else positions
    return [LoadItem(i, str(paths[i]), p.plan(probes[i].height, probes[i].width)) for i in idx if probes[i].ok]


SkipCallback = Callable[[LoadItem, str], None]


def _report_skip(item: LoadItem, reason: str, on_skip: Optional[SkipCallback]) -> None:
    warnings.warn(f"skipping {item.path}: {reason}", CorruptImageWarning, stacklevel=3)
    if on_skip is not None:
        on_skip(item, reason)


def decode_pil(path: str, plan: tuple[int, int, int, int], preset: Preprocess) -> Tensor:
    """One image through PIL: decode, EXIF orientation, RGB, linear antialiased resize, crop, normalise."""
    from PIL import Image, ImageOps

    rh, rw, top, left = plan
    ch, cw = preset.output_size
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im = im.resize((rw, rh), Image.BILINEAR, reducing_gap=None)
        im = im.crop((left, top, left + cw, top + ch))
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return _normalize(x.permute(2, 0, 1).float(), preset)


def _normalize(x: Tensor, preset: Preprocess) -> Tensor:
    mean = torch.tensor(preset.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(preset.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


class _PILDataset(torch.utils.data.Dataset):
    """Chunks of items; each item is decoded in a worker and a failure comes back as its message."""

    def __init__(self, chunks: list[list[LoadItem]], preset: Preprocess):
        self.chunks, self.preset = chunks, preset

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        images, kept, failed = [], [], []
        for item in self.chunks[i]:
            try:
                images.append(decode_pil(item.path, item.plan, self.preset))
                kept.append(item)
            except Exception as e:  # any decoder error skips the image, never the dataset
                failed.append((item, f"{type(e).__name__}: {e}"))
        ch, cw = self.preset.output_size
        batch = torch.stack(images) if images else torch.empty((0, 3, ch, cw))
        return batch, kept, failed


def _chunks(items: Sequence[LoadItem], batch_size: int) -> list[list[LoadItem]]:
    chunks: list[list[LoadItem]] = []
    for item in items:
        if chunks and chunks[-1][0].position // batch_size == item.position // batch_size:
            chunks[-1].append(item)
        else:
            chunks.append([item])
    return chunks


def _load_pil(chunks, preset, threads, on_skip) -> Iterator[tuple[Tensor, list[LoadItem]]]:
    loader = torch.utils.data.DataLoader(_PILDataset(chunks, preset), batch_size=None, shuffle=False,
                                         num_workers=threads, prefetch_factor=4 if threads else None,
                                         persistent_workers=False)
    for batch, kept, failed in loader:
        for item, reason in failed:
            _report_skip(item, reason, on_skip)
        yield batch, kept


class _DaliRunner:
    """A DALI pipeline fed chunk by chunk from Python (bytes plus each image's resize size and crop anchor).

    Chunks handed to the pipeline but not yet returned are kept in ``in_flight`` so that, when a decode error
    invalidates the pipeline (DALI cannot continue after one), they can be fed again to a fresh one.
    """

    def __init__(self, preset: Preprocess, batch_size: int, threads: int, device: torch.device, prefetch: int):
        self.preset, self.batch_size, self.threads, self.device = preset, batch_size, threads, device
        self.prefetch = prefetch
        self.pending: deque[list[LoadItem]] = deque()
        self.in_flight: deque[list[LoadItem]] = deque()
        self.pipe = None

    def _source(self):
        if not self.pending:
            raise StopIteration
        chunk = self.pending.popleft()
        self.in_flight.append(chunk)
        data = [np.fromfile(item.path, dtype=np.uint8) for item in chunk]
        sizes = [np.array(item.plan[:2], dtype=np.float32) for item in chunk]
        anchors = [np.array(item.plan[2:], dtype=np.int32) for item in chunk]
        return data, sizes, anchors

    def build(self) -> None:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        gpu = self.device.type == "cuda"
        preset = self.preset
        ch, cw = preset.output_size

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.threads),
                      device_id=(self.device.index or 0) if gpu else None, prefetch_queue_depth=self.prefetch,
                      exec_async=True, exec_pipelined=True)
        def pipe():
            encoded, sizes, anchors = fn.external_source(source=self._source, num_outputs=3, batch=True,
                                                         dtype=[types.UINT8, types.FLOAT, types.INT32])
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            images = fn.resize(images, size=sizes, interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.slice(images, start=anchors, shape=np.array([ch, cw], dtype=np.int32), axis_names="HW")
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=list(preset.mean),
                                            std=list(preset.std))

        self.pipe = pipe()
        self.pipe.build()

    def run(self) -> Tensor:
        (out,) = self.pipe.run()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = out.as_tensor()
            batch = torch.empty(out.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(out, batch, cuda_stream=torch.cuda.current_stream(self.device))
            return batch
        return torch.from_numpy(np.array(out.as_tensor()))  # copy: DALI reuses its output buffers

    def close(self) -> None:
        self.pipe = None  # DALI frees the pipeline's threads and buffers when it is collected


def _load_dali(chunks, preset, batch_size, threads, device, on_skip) -> Iterator[tuple[Tensor, list[LoadItem]]]:
    runner = _DaliRunner(preset, batch_size, threads, device, prefetch=2)
    runner.pending.extend(chunks)
    runner.build()
    try:
        while True:
            try:
                batch = runner.run()
            except StopIteration:
                return
            except RuntimeError as e:
                if not _is_decode_error(e):
                    raise
                # The pipeline is dead; every chunk it held is decoded again, the bad one item by item.
                redo = list(runner.in_flight)
                runner.in_flight.clear()
                yield from _isolate(redo, preset, threads, device, on_skip)
                runner.build()
                continue
            yield batch, runner.in_flight.popleft()
    finally:
        runner.close()


def _isolate(chunks, preset, threads, device, on_skip) -> Iterator[tuple[Tensor, list[LoadItem]]]:
    """Decodes chunks in a fresh pipeline each; a chunk that fails again is decoded one image at a time."""
    for chunk in chunks:
        try:
            yield _run_once([chunk], preset, len(chunk), threads, device), chunk
            continue
        except RuntimeError:
            pass
        images, kept = [], []
        for item in chunk:
            try:
                images.append(_run_once([[item]], preset, 1, threads, device))
                kept.append(item)
            except RuntimeError as e:
                if not _is_decode_error(e):
                    raise
                _report_skip(item, _dali_reason(e), on_skip)
        ch, cw = preset.output_size
        yield (torch.cat(images) if images else torch.empty((0, 3, ch, cw), device=device)), kept


def _run_once(chunks, preset, batch_size, threads, device) -> Tensor:
    runner = _DaliRunner(preset, batch_size, threads, device, prefetch=1)
    runner.pending.extend(chunks)
    runner.build()
    try:
        return runner.run()
    finally:
        runner.close()


def _is_decode_error(error: Exception) -> bool:
    """Whether DALI's error came from its image decoder (a bad file), not from a bug elsewhere in the pipeline."""
    return "decoders.image" in str(error)


def _dali_reason(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln.startswith("encountered")]
    detail = after[0] if after else (lines[-1] if lines else "")
    return f"DALI could not decode it ({detail[:200]})"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def load_batches(items: Sequence[LoadItem], preset: Union[str, Preprocess], *, loader: str = "dali",
                 batch_size: int = 32, threads: int = 2, device: Union[str, torch.device] = "cpu",
                 on_skip: Optional[SkipCallback] = None) -> Iterator[tuple[Tensor, list[LoadItem]]]:
    """Decodes and preprocesses ``items`` in order, yielding ``(images float32 [B, 3, H, W], items kept)``.

    Args:
        loader: ``"dali"`` or ``"pil"``.
        batch_size: images per batch. A batch holds the items whose ``position // batch_size`` agree, so it is
            smaller where images were skipped, and a resumed run forms exactly the batches of the first one (the
            network then sees the same batches, which keeps its output bit for bit the same).
        threads: DALI's CPU threads, or the PIL DataLoader's worker processes (0 decodes in this process).
        device: ``cuda`` decodes on the GPU with DALI (``mixed``) and yields GPU tensors.
        on_skip: called with ``(item, reason)`` for each image that fails to decode (a warning is issued as well).
    """
    preset = get_preset(preset)
    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"load_batches: batch_size must be >= 1, got {batch_size}")
    if threads < 0:
        raise ValueError(f"load_batches: threads must be >= 0, got {threads}")
    if any(a.position >= b.position for a, b in zip(items, items[1:])):
        raise ValueError("load_batches: items must be in increasing position order")
    chunks = _chunks(items, batch_size)
    if loader == "dali":
        if not dali_available():
            raise ImportError("load_batches: loader='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130); "
                              "use loader='pil' without it")
        yield from _load_dali(chunks, preset, batch_size, threads, device, on_skip)
    elif loader == "pil":
        for batch, kept in _load_pil(chunks, preset, threads, on_skip):
            yield batch.to(device, non_blocking=True), kept
    else:
        raise ValueError(f"load_batches: loader must be 'dali' or 'pil', got {loader!r}")
