"""LESA rank loss, forward + backward: pyzsl's sort-and-prefix-sum kernel against the published pairwise form.

Shapes follow LESA training: B = 32 images, L = 925 (NUS-WIDE seen labels) and 7,186 (Open Images seen labels).
Targets: ~1% positives at L = 7,186 and ~3% at 925, a fifth unannotated, the rest negative; scores ~ N(0, 1).

The pairwise form builds [B, L, L] tensors (6.6 GB per float32 tensor at L = 7,186, several of them alive at once), so
it runs on chunks of images whose pair tensors hold at most 2^27 entries; each chunk is the published computation.
Correctness first (loss and gradient against the pairwise form), then the best of --repeats runs (one run for a
method slower than 5 s); peak memory is each method's growth of the peak resident set, in a fresh child process.

    python benchmarks/bench_rank_loss.py [--repeats 3] [--threads N]
"""
import argparse
import multiprocessing as mp
import time

import torch

from pyzsl.ops import _reference, lesa_rank_loss

B = 32
SIZES = ((925, 0.03), (7186, 0.01))
CHUNK_PAIRS = 1 << 27


def make_inputs(L, p_positive, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, L, generator=g)
    u = torch.rand(B, L, generator=g)
    targets = torch.full((B, L), -1, dtype=torch.int8)
    targets[u < p_positive] = 1
    targets[(u >= p_positive) & (u < p_positive + 0.2)] = 0
    return scores, targets


def pairwise(scores, targets):
    """The published form over chunks of images (the mean of per-image losses is chunk-additive)."""
    chunk = max(1, CHUNK_PAIRS // (scores.shape[1] ** 2))
    total = 0
    for i in range(0, scores.shape[0], chunk):
        part = _reference.lesa_rank_loss(scores[i : i + chunk], targets[i : i + chunk])
        total = total + part * scores[i : i + chunk].shape[0]
    return total / scores.shape[0]


METHODS = {"pyzsl cpp": lambda s, t: lesa_rank_loss(s, t, backend="cpp"), "pairwise (published form)": pairwise}


def forward_backward(method, scores, targets):
    x = scores.clone().requires_grad_(True)
    loss = METHODS[method](x, targets)
    loss.backward()
    return loss.detach(), x.grad


def best_time(fn, repeats):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > 5:  # a slow method: its first run is timing enough
        return first
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _high_water_mib():
    """This address space's peak resident set (VmHWM). Unlike ru_maxrss it starts afresh in a spawned child, which
    otherwise inherits the parent's peak through fork + exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_child(method, L, p_positive, queue):
    scores, targets = make_inputs(L, p_positive)
    forward_backward(method, scores[:1], targets[:1])  # load kernels and allocator pools before the baseline
    before = _high_water_mib()
    forward_backward(method, scores, targets)
    queue.put(_high_water_mib() - before)


def peak_mib(method, L, p_positive):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_peak_child, args=(method, L, p_positive, queue))
    child.start()
    child.join()
    return queue.get()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}, B = {B}")
    for L, p_positive in SIZES:
        scores, targets = make_inputs(L, p_positive)
        ours_loss, ours_grad = forward_backward("pyzsl cpp", scores, targets)
        ref_loss, ref_grad = forward_backward("pairwise (published form)", scores, targets)
        torch.testing.assert_close(ours_loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-7)
        print(f"\n### L = {L:,}: loss {float(ours_loss):.6f} (pairwise {float(ref_loss):.6f}), gradients agree\n")
        print("| method | forward + backward (s) | time / pyzsl | peak memory growth (MiB) |")
        print("|---|---:|---:|---:|")
        times = {m: best_time(lambda m=m: forward_backward(m, scores, targets), args.repeats) for m in METHODS}
        for method, seconds in times.items():
            print(f"| {method} | {seconds:.4f} | {seconds / times['pyzsl cpp']:.1f}× | "
                  f"{peak_mib(method, L, p_positive):,.0f} |")


if __name__ == "__main__":
    main()
