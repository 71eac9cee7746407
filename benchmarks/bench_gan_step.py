"""One TF-VAEGAN generator step (``critic_iter`` = 5 critic steps + 1 generator step, batch 64, CUB sizes: 2048-d
features, 312-d attributes, 4096-wide layers): pyzsl's ``GANTrainer`` against a straightforward PyTorch
implementation of the published loop (``PublishedLoop``: module forwards, autograd double backward for the gradient
penalty, ``torch.optim.Adam``).

Correctness first: from the same weights and the same seed both run the same steps (a pass without and a pass with
feedback); the losses and the final weights are compared in float64 (where the closed-form critic gradient must
agree with autograd to rounding) and in float32 (the timed precision). Then each path is timed on ``--repeats``
steps after a warm-up step; the table gives the median time, the ratio and GFLOP/s of the published step's matrix
products (``gan_step_flops``; the same work figure for both paths).

    python benchmarks/bench_gan_step.py [--repeats 3] [--threads N] [--batch 64] [--loops 0 1]
"""
import argparse
import copy
import csv
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from pyzsl.models.tfvaegan import GANConfig, GANTrainer, PublishedLoop, TFVAEGAN, gan_step_flops

CUB = dict(feature_dim=2048, attribute_dim=312, num_images=7057, num_classes=150)


def make_problem(batch: int, dtype=torch.float32, seed: int = 0, small: bool = False):
    """A model, CUB-shaped seen features in [0, 1] and L2-normalised class attributes."""
    sizes = dict(CUB)
    hidden = 4096
    if small:  # the float64 check: same code, smaller layers
        sizes.update(feature_dim=96, attribute_dim=24, num_images=300, num_classes=12)
        hidden = 64
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(sizes["num_images"], sizes["feature_dim"], generator=g, dtype=dtype)
    labels = torch.randint(sizes["num_classes"], (sizes["num_images"],), generator=g)
    attributes = torch.nn.functional.normalize(torch.rand(sizes["num_classes"], sizes["attribute_dim"], generator=g,
                                                          dtype=dtype), dim=1)
    config = GANConfig(sizes["feature_dim"], sizes["attribute_dim"], hidden=hidden, critic_hidden=hidden,
                       encoder_hidden=hidden, batch_size=batch, lr=1e-4, feed_lr=1e-5, dec_lr=1e-4, a1=1.0,
                       gamma_d=10.0, gamma_g=10.0, recons_weight=0.01)
    torch.manual_seed(seed)
    model = TFVAEGAN(config).to(dtype)

    def sample():
        idx = torch.randperm(features.shape[0])[:batch]
        return features[idx], attributes[labels[idx]], labels[idx]
    return model, sample


def make_step(path: str, model):
    return GANTrainer(model) if path == "pyzsl" else PublishedLoop(model)


def run_steps(path: str, model, sample, loops, seed: int):
    """The losses of one generator step per loop value, from ``seed``; also returns the trained model."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    step = make_step(path, model)
    losses = []
    for loop in loops:
        out = step.generator_step(sample, loop)
        losses.append([out.d_cost, out.wasserstein, out.g_cost, out.vae, out.recons, out.lambda1])
    return losses, model


def max_rel_diff(a, b) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def weight_diff(m1, m2, relative: bool):
    """(largest difference, parameter name): relative to the parameter's largest entry, or absolute."""
    s1, s2 = m1.state_dict(), m2.state_dict()
    diffs = {k: float((s1[k] - s2[k]).abs().max() / (s2[k].abs().max().clamp_min(1e-30) if relative else 1))
             for k in s1}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def check(batch: int) -> dict:
    """Losses and weights after one no-feedback and one feedback step, pyzsl vs published, float64 and float32."""
    out = {}
    for name, dtype, small in (("float64", torch.float64, True), ("float32", torch.float32, False)):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model, sample = make_problem(batch if not small else 16, dtype, small=small)
            mine, m1 = run_steps("pyzsl", model, sample, (0, 1), seed=1)
            ref, m2 = run_steps("published", model, sample, (0, 1), seed=1)
        finally:
            torch.set_default_dtype(default)
        out[name] = (max_rel_diff(mine, ref), weight_diff(m1, m2, relative=small))
        print(f"check {name}: losses (D cost, Wasserstein, G cost, VAE, reconstruction, lambda1) of 2 steps: "
              f"max relative difference {out[name][0]:.2e}; weights: max "
              f"{'relative' if small else 'absolute'} difference {out[name][1][0]:.2e} ({out[name][1][1]})")
    if out["float64"][0] > 1e-9 or out["float64"][1][0] > 1e-9:
        raise AssertionError(f"pyzsl's step differs from the published loop in float64: {out['float64']}")
    if out["float32"][0] > 1e-4:
        raise AssertionError(f"pyzsl's losses differ from the published loop in float32: {out['float32']}")
    print("  (float32 weights: Adam's first steps move a weight by about lr = 1e-4 whatever the gradient's size, so "
          "an entry whose gradient is zero up to rounding can differ by up to 2 lr per optimizer step; the critic "
          "takes 5 steps per generator step)")
    return out


def time_path(path: str, loop: int, batch: int, repeats: int) -> list:
    model, sample = make_problem(batch)
    torch.manual_seed(0)
    step = make_step(path, model)
    step.generator_step(sample, loop)  # warm-up: optimizer state, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step.generator_step(sample, loop)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 0],
                        help="1: the pass with feedback, 0: the pass without")
    parser.add_argument("--skip-check", action="store_true", help="time only (the check runs by default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{open('/proc/loadavg').read().split()[:3] if os.path.exists('/proc/loadavg') else 'n/a'}")
    if not args.skip_check:
        check(args.batch)
    model, _ = make_problem(args.batch)
    results = {}
    print(f"\n{'step (CUB, batch %d)' % args.batch:<28} {'published s':>12} {'pyzsl s':>9} {'ratio':>6} "
          f"{'pub GFLOP/s':>12} {'pyzsl GFLOP/s':>14}")
    for loop in args.loops:
        flops = gan_step_flops(model.config, args.batch, loop)
        ref = statistics.median(time_path("published", loop, args.batch, args.repeats))
        mine = statistics.median(time_path("pyzsl", loop, args.batch, args.repeats))
        name = "with feedback (loop 1)" if loop == 1 else "without feedback (loop 0)"
        results[name] = {"published_s": ref, "pyzsl_s": mine, "ratio": ref / mine, "gflop": flops / 1e9,
                         "published_gflops": flops / ref / 1e9, "pyzsl_gflops": flops / mine / 1e9}
        r = results[name]
        print(f"{name:<28} {ref:12.3f} {mine:9.3f} {r['ratio']:5.2f}x {r['published_gflops']:12.1f} "
              f"{r['pyzsl_gflops']:14.1f}", flush=True)
    print("(GFLOP per step: " + ", ".join(f"{k}: {v['gflop']:.1f}" for k, v in results.items()) +
          f"; load average after: {open('/proc/loadavg').read().split()[:3]})")
    _append_csv(results, args)
    return results


def _append_csv(results: dict, args) -> None:
    path = Path(__file__).resolve().parent / "results" / "bench_gan_step.csv"
    path.parent.mkdir(exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["timestamp", "torch", "threads", "batch", "row", "published_s", "pyzsl_s", "ratio",
                             "published_gflops", "pyzsl_gflops"])
        for row, r in results.items():
            writer.writerow([datetime.datetime.now().isoformat(timespec="seconds"), torch.__version__,
                             torch.get_num_threads(), args.batch, row, f"{r['published_s']:.4f}",
                             f"{r['pyzsl_s']:.4f}", f"{r['ratio']:.3f}", f"{r['published_gflops']:.1f}",
                             f"{r['pyzsl_gflops']:.1f}"])


if __name__ == "__main__":
    main()
