"""Images to features: ``python -m pyzsl.extract --images DIR|LIST --backbone NAME --layout regions|pooled --out F.h5``.

Writes the pyzsl HDF5 feature store (:mod:`pyzsl.data.store`): ``features`` [N, R, D] or [N, D], ``labels`` [N, L],
``label_names``, ``image_ids``, and the attributes ``backbone``, ``preset`` and ``source``. Images come from a
folder tree (one label per first-level sub-folder) or a list file (``path label1 -label2 ...``; see
:mod:`pyzsl.data.images`). Row i holds the i-th readable image in the listing order.

**Unreadable images** are skipped with a warning naming each file and counted in the summary. Files that fail the
probe (not an image, empty, truncated) are known before the store is created. A file that passes the probe but fails
to decode is recorded in ``OUT.skipped`` (position, id, reason) before any later row is written; the store's last
rows are then left over, and once every image is done the store is rewritten without them.

**Resume.** Every batch of rows is flushed with ``rows_written`` advanced after it. ``--resume`` reopens the file,
re-probes the images (deterministic), drops the ones recorded in ``OUT.skipped`` and continues after the last
written row with the same batches as the first run, so a killed run finishes into the same file.

``--mat-out FILE.mat`` also writes the xlsa17 ``res101.mat`` schema (pooled layout, one positive label per image):
``features`` [D, N] float32, ``labels`` [N, 1] 1-based class ids (the position of the image's label among the label
columns, so pass ``--label-names allclasses.txt`` to follow a dataset's class order) and ``image_files`` [N, 1].
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .backbones import BACKBONES, DEFAULT_BACKBONE, build_backbone
from .data import images as img
from .data.store import FeatureStore, FeatureStoreWriter

PathLike = Union[str, os.PathLike]


@dataclass
class ExtractSummary:
    out: Path
    found: int = 0
    rows: int = 0
    written_now: int = 0
    resumed_from: int = 0
    skipped_probe: list[tuple[str, str]] = field(default_factory=list)
    skipped_decode: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.written_now / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        lines = [f"extracted {self.written_now} images in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)"
                 + (f", resumed after {self.resumed_from} rows" if self.resumed_from else ""),
                 f"{self.out}: {self.rows} rows of {self.found} images listed; skipped {len(self.skipped_probe)} "
                 f"unreadable at the probe and {len(self.skipped_decode)} that failed to decode"]
        for image_id, reason in (self.skipped_probe + self.skipped_decode)[:20]:
            lines.append(f"  skipped {image_id}: {reason}")
        extra = len(self.skipped_probe) + len(self.skipped_decode) - 20
        if extra > 0:
            lines.append(f"  ... and {extra} more")
        return "\n".join(lines)


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".skipped")


def _read_sidecar(path: Path) -> dict[int, str]:
    late: dict[int, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                position, _, reason = line.split("\t", 2)
                late[int(position)] = reason
    return late


def _complete(out: Path) -> Optional[FeatureStore]:
    """The finished store at ``out``, or None while it is still being written."""
    try:
        return FeatureStore(out)
    except ValueError as e:
        if "incomplete extraction" in str(e):
            return None
        raise


def _compact(out: Path, rows: int, dtype: torch.dtype, attrs: dict, block: int = 256) -> None:
    """Rewrites ``out`` keeping its first ``rows`` rows (the rows left over by images that failed to decode)."""
    import h5py

    tmp = out.with_name(out.name + ".compact")
    if tmp.exists():
        tmp.unlink()
    with h5py.File(out, "r") as src:
        names = list(src["label_names"].asstr()[()])
        with FeatureStoreWriter(tmp, num_rows=rows, feature_shape=src["features"].shape[1:], label_names=names,
                                dtype=dtype, attrs=attrs) as dst:
            for start in range(0, rows, block):
                stop = min(rows, start + block)
                dst.write(src["features"][start:stop], src["labels"][start:stop] if names else None,
                          list(src["image_ids"].asstr()[start:stop]))
    os.replace(tmp, out)


def extract(images: PathLike, out: PathLike, *, backbone: str = DEFAULT_BACKBONE, weights: Optional[PathLike] = None,
            layout: str = "regions", preset: Union[str, img.Preprocess, None] = None,
            dtype: torch.dtype = torch.float16,
            batch_size: int = 32, threads: int = 2, loader: str = "auto", device: Optional[str] = None,
            resume: bool = False, mat_out: Optional[PathLike] = None, unlisted: str = "negative",
            label_names: Optional[Sequence[str]] = None, random_init: bool = False,
            progress: bool = True) -> ExtractSummary:
    """Extracts features of every readable image of ``images`` into the store ``out`` (module docstring).

    Args:
        backbone, weights, layout: see :func:`pyzsl.backbones.build_backbone`.
        preset: the preprocessing (:data:`pyzsl.data.images.PRESETS`); the backbone's own by default.
        loader: ``"dali"``, ``"pil"``, or ``"auto"`` (DALI when installed).
        threads: decoding threads (DALI) or worker processes (PIL).
        device: ``"cpu"`` or ``"cuda"``; CUDA when available by default.
        label_names: the label columns in order (e.g. a dataset's class list); sorted names by default.
    """
    started = time.perf_counter()
    out = Path(out)
    if loader == "auto":
        loader = "dali" if img.dali_available() else "pil"
    if batch_size < 1:
        raise ValueError(f"extract: batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if mat_out is not None and layout != "pooled":
        raise ValueError(f"extract: mat_out writes xlsa17's [D, N] features and needs layout='pooled', got {layout!r}")
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"extract: dtype must be torch.float16 or torch.float32, got {dtype}")
    if out.exists() and not resume:
        raise FileExistsError(f"extract: {out} already exists; pass resume=True (--resume) to continue it, or remove "
                              f"it to start over")
    net = build_backbone(backbone, weights=weights, layout=layout, random_init=random_init).to(dev)
    prep = img.get_preset(preset or net.spec.preset)
    listing = img.image_set(images, unlisted=unlisted, label_names=label_names)
    summary = ExtractSummary(out=out, found=len(listing))
    attrs = {"backbone": backbone, "preset": prep.name, "source": str(Path(images).resolve())}

    sidecar = _sidecar(out)
    if not resume and sidecar.exists() and not out.exists():
        sidecar.unlink()  # left by a run whose store was deleted since
    finished = _complete(out) if resume and out.exists() else None
    if finished is not None:
        for key, value in attrs.items():
            if finished.attrs.get(key) != value:
                raise ValueError(f"extract(resume=True): {out} is a finished extraction with {key} = "
                                 f"{finished.attrs.get(key)!r}, this run asks for {value!r}")
        summary.rows = summary.resumed_from = len(finished)
        summary.seconds = time.perf_counter() - started
        if mat_out is not None:
            write_xlsa17_mat(out, mat_out)
        return summary

    probes = img.probe_images(listing.paths, threads=max(1, threads), progress=progress)
    for path, image_id, p in zip(listing.paths, listing.image_ids, probes):
        if not p.ok:
            warnings.warn(f"skipping {path}: {p.error}", img.CorruptImageWarning, stacklevel=2)
            summary.skipped_probe.append((image_id, p.error))
    good = [i for i, p in enumerate(probes) if p.ok]
    if not good:
        raise ValueError(f"extract: none of the {len(listing)} images in {images} is readable")
    feature_shape = net.feature_shape(prep.output_size)
    writer = FeatureStoreWriter(out, num_rows=len(good), feature_shape=feature_shape,
                                label_names=listing.label_names, dtype=dtype, layout=layout, attrs=attrs,
                                resume=resume)
    late = _read_sidecar(sidecar) if resume else {}
    for position, reason in late.items():
        summary.skipped_decode.append((listing.image_ids[position], reason))
    done = summary.resumed_from = writer.rows_written
    kept = [i for i in good if i not in late]
    todo = kept[done:]
    items = img.make_items(listing.paths, probes, prep, positions=todo)

    skips_seen = [0]  # images skipped since the progress bar last moved

    def on_skip(item: img.LoadItem, reason: str) -> None:
        skips_seen[0] += 1
        summary.skipped_decode.append((listing.image_ids[item.position], reason))
        with open(sidecar, "a", encoding="utf-8") as f:  # before any later row is written
            f.write(f"{item.position}\t{listing.image_ids[item.position]}\t{reason}\n")

    from tqdm import tqdm

    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), tqdm(total=len(items), unit="img", desc=f"{backbone} {layout}",
                                          disable=not progress, dynamic_ncols=True) as bar:
            for batch, batch_items in img.load_batches(items, prep, loader=loader, batch_size=batch_size,
                                                       threads=threads, device=dev, on_skip=on_skip):
                if batch_items:
                    feats = net(batch).to("cpu", dtype)
                    positions = [it.position for it in batch_items]
                    writer.write(feats, listing.labels[positions] if listing.label_names else None,
                                 [listing.image_ids[i] for i in positions])
                bar.update(len(batch_items) + skips_seen[0])
                skips_seen[0] = 0
        summary.written_now = writer.rows_written - done
    finally:
        writer.close()
    summary.seconds = time.perf_counter() - t0

    rows = len(good) - len(_read_sidecar(sidecar)) if sidecar.exists() else len(good)
    if rows < len(good):
        if rows == 0:
            raise ValueError(f"extract: none of the {len(listing)} images in {images} could be decoded")
        _compact(out, rows, dtype, attrs)
    if sidecar.exists():
        sidecar.unlink()
    summary.rows = rows
    if mat_out is not None:
        write_xlsa17_mat(out, mat_out)
    return summary


def write_xlsa17_mat(store: PathLike, mat_out: PathLike, block: int = 4096) -> Path:
    """Writes a pooled feature store as an xlsa17 ``res101.mat`` (module docstring)."""
    import scipy.io

    import h5py

    ds = FeatureStore(store)  # validates the file; the blocks are then read with h5py in the documented layout
    where = f"write_xlsa17_mat({store})"
    if ds.layout != "pooled":
        raise ValueError(f"{where}: xlsa17 features are pooled [D, N]; the store's layout is {ds.layout!r}")
    n, d = ds.num_rows, ds.feature_shape[0]
    image_ids = ds.image_ids
    ds.close()
    features = np.empty((d, n), dtype=np.float32)
    classes = np.empty(n, dtype=np.int64)
    with h5py.File(store, "r") as f:
        for start in range(0, n, block):
            stop = min(n, start + block)
            features[:, start:stop] = f["features"][start:stop].astype(np.float32).T
            labels = f["labels"][start:stop]
            positives = (labels == 1).sum(1)
            bad = np.flatnonzero(positives != 1)
            if bad.size:
                r = start + int(bad[0])
                raise ValueError(f"{where}: xlsa17 needs exactly one positive label per image; row {r} "
                                 f"({image_ids[r]!r}) has {int(positives[bad[0]])}")
            classes[start:stop] = labels.argmax(1) + 1
    ids = np.empty((n, 1), dtype=object)
    ids[:, 0] = image_ids
    mat_out = Path(mat_out)
    scipy.io.savemat(str(mat_out), {"features": features, "labels": classes.reshape(n, 1), "image_files": ids})
    return mat_out


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pyzsl.extract", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="a folder tree (one label per sub-folder) or a list file "
                   "('path label1 -label2 ...' per line)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES))
    p.add_argument("--weights", help="checkpoint file (default: the packaged weights of efficientnet_lite0)")
    p.add_argument("--layout", choices=("regions", "pooled"), required=True)
    p.add_argument("--out", required=True, help="the feature store to write (.h5)")
    p.add_argument("--preset", choices=sorted(img.PRESETS), help="preprocessing (default: the backbone's)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="decoding threads (DALI) or worker processes (PIL)")
    p.add_argument("--loader", choices=("auto", "dali", "pil"), default="auto")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--resume", action="store_true", help="continue an interrupted run writing --out")
    p.add_argument("--mat-out", help="also write the xlsa17 res101.mat schema here (needs --layout pooled)")
    p.add_argument("--unlisted", choices=("negative", "unannotated"), default="negative",
                   help="list files: the value of labels a line does not name (-1 or 0)")
    p.add_argument("--label-names", help="a file with the label columns in order, one per line")
    p.add_argument("--random-init", action="store_true", help="random weights (timing only)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    names = None
    if args.label_names:
        names = [ln.strip() for ln in Path(args.label_names).read_text(encoding="utf-8").splitlines() if ln.strip()]
    warnings.simplefilter("always", img.CorruptImageWarning)
    warnings.formatwarning = lambda message, category, *a, **k: f"{category.__name__}: {message}\n"
    summary = extract(args.images, args.out, backbone=args.backbone, weights=args.weights, layout=args.layout,
                      preset=args.preset, dtype=getattr(torch, args.dtype), batch_size=args.batch_size,
                      threads=args.threads, loader=args.loader, device=args.device, resume=args.resume,
                      mat_out=args.mat_out, unlisted=args.unlisted, label_names=names,
                      random_init=args.random_init)
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
