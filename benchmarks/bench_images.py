"""Image pipeline throughput: DALI against the PIL DataLoader path, and extraction against the network alone.

Table 1, loading: decode + resize + crop + normalise of real JPEGs (the shared NUS-WIDE photos and CUB crops and
scikit-learn's two samples, repeated to --images items) with the DALI CPU pipeline (``threads`` DALI threads) and
the PIL path (``threads`` DataLoader worker processes), same items, same batches. Correctness first: both outputs
must agree within 1 pixel level (the decoded pixels are the same; only the resamplers' rounding differs).

Table 2, extraction: ``pyzsl.extract.extract`` images/s (its loading + forward + store-writing loop, after probing
and model loading; the probe is timed on its own) against the backbone's forward-only images/s on tensors already in
memory, same batch size. Target: extraction >= 0.9x forward-only, i.e. loading hidden behind compute.

Every figure is the best of --repeats runs. The machine is shared: the load average is printed with the tables.

    python benchmarks/bench_images.py [--images 256] [--threads 1 2] [--batch-size 32] [--repeats 3]
        [--backbones efficientnet_lite0 vgg19]
"""
import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pyzsl.backbones import build_backbone
from pyzsl.data import images as I
from pyzsl.extract import extract


def source_images() -> list[Path]:
    root = Path(os.environ.get("PYZSL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    paths = sorted((root / "images").rglob("*.jpg"))
    spec = importlib.util.find_spec("sklearn")
    if spec is not None:
        paths += sorted((Path(spec.origin).parent / "datasets" / "images").glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no JPEGs under {root / 'images'} (set PYZSL_DATA)")
    return paths


def make_folder(n: int) -> Path:
    """n symlinks to the real JPEGs in a temporary folder (a flat folder: no labels)."""
    src = source_images()
    folder = Path(tempfile.mkdtemp(prefix="bench_images_"))
    for k in range(n):
        (folder / f"{k:05d}.jpg").symlink_to(src[k % len(src)])
    return folder


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def load_all(items, preset, loader, threads, batch_size):
    return [b for b, _ in I.load_batches(items, preset, loader=loader, batch_size=batch_size, threads=threads)]


def loading_table(folder, threads_list, batch_size, repeats):
    paths = sorted(folder.iterdir())
    preset = I.PRESETS["vgg"]
    items = I.make_items(paths, I.probe_images(paths), preset)
    dali = torch.cat(load_all(items, preset, "dali", 2, batch_size))
    pil = torch.cat(load_all(items, preset, "pil", 2, batch_size))
    levels = float(((dali - pil).abs() * torch.tensor(preset.std).view(1, 3, 1, 1)).max())
    if levels > 1.0 + 1e-3:
        raise SystemExit(f"DALI and PIL disagree by {levels:.2f} pixel levels; not timing")
    print(f"\nloading, preset 'vgg' (short side 256, crop 224), {len(items)} JPEGs, batch {batch_size}; "
          f"DALI and PIL agree within {levels:.0f} level")
    print(f"{'threads':>7} | {'DALI img/s':>10} | {'PIL img/s':>9} | DALI / PIL")
    for t in threads_list:
        td = best(lambda: load_all(items, preset, "dali", t, batch_size), repeats)
        tp = best(lambda: load_all(items, preset, "pil", t, batch_size), repeats)
        print(f"{t:>7} | {len(items) / td:>10.1f} | {len(items) / tp:>9.1f} | {tp / td:.2f}x")


def extraction_table(folder, backbones, threads, batch_size, repeats):
    n = len(list(folder.iterdir()))
    print(f"\nextraction, {n} JPEGs, batch {batch_size}, {threads} loader threads, torch threads "
          f"{torch.get_num_threads()}, layout regions, float16")
    print(f"{'backbone':>18} | {'forward img/s':>13} | {'loader':>6} | {'extract img/s':>13} | ratio | probe s")
    for name in backbones:
        net = build_backbone(name, layout="regions", random_init=name != "efficientnet_lite0")
        x = torch.randn(batch_size, 3, *net.preset.output_size)
        batches = -(-n // batch_size)

        def forward():
            with torch.inference_mode():
                for _ in range(batches):
                    net(x)

        forward()  # warm-up (oneDNN primitive caches)
        t_fwd = best(forward, repeats)
        rate_fwd = batches * batch_size / t_fwd
        for loader in ("dali", "pil"):
            rates, probes = [], []
            for _ in range(repeats):
                out = Path(tempfile.mkdtemp(prefix="bench_extract_")) / "f.h5"
                t = time.perf_counter()
                s = extract(folder, out, backbone=name, layout="regions", batch_size=batch_size, threads=threads,
                            loader=loader, random_init=name != "efficientnet_lite0", progress=False)
                probes.append(time.perf_counter() - t - s.seconds)
                rates.append(s.images_per_s)
                shutil.rmtree(out.parent)
            rate = max(rates)
            print(f"{name:>18} | {rate_fwd:>13.1f} | {loader:>6} | {rate:>13.1f} | {rate / rate_fwd:.2f}x | "
                  f"{min(probes):.1f} (incl. model load)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    parser.add_argument("--skip-loading", action="store_true")
    parser.add_argument("--skip-extraction", action="store_true")
    args = parser.parse_args()
    folder = make_folder(args.images)
    print(f"load average before: {open('/proc/loadavg').read().strip()}  ({os.cpu_count()} CPUs)")
    try:
        if not args.skip_loading:
            loading_table(folder, args.threads, args.batch_size, args.repeats)
        if not args.skip_extraction:
            extraction_table(folder, args.backbones, max(args.threads), args.batch_size, args.repeats)
    finally:
        shutil.rmtree(folder)
    print(f"\nload average after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
