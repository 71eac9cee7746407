"""Benchmark of pyzsl's multi-label evaluation against its peers, on CPU.

What is measured, per data size (``time.perf_counter``; pyzsl cpp and the floor best of ``--repeats`` rounds that
call them in turn, after a warm-up):

* pyzsl cpp:       ``multilabel_evaluation(scores, targets, ks=(3, 5), protocol="lesa", backend="cpp")``, i.e. the mAP
                   and the micro P/R/F1 at K = 3 and 5, input validation included.
* pyzsl reference: the same call with ``backend="reference"`` (pure PyTorch). It is slow, so it runs once, after a
                   warm-up on a small slice, and that run is also the one the correctness check compares against.
                   Skipped at the Open-Images-like size (``--large``), where it is checked on subsets instead.
* torchmetrics:    ``multilabel_average_precision(..., average="macro", thresholds=None)``: the exact mAP only, with
                   targets mapped to its convention beforehand (1 -> 1, -1 -> 0, unannotated 0 -> ignore_index -1)
                   and both inputs copied column-major, which its per-label loop prefers; its input validation is
                   off (``validate_args=False``), while pyzsl's is timed.
* scikit-learn:    a loop of ``average_precision_score`` over labels (on column-contiguous copies made beforehand, the
                   unannotated rows of each label left out): the mAP only.
* floor:           ``scores.sum()``, one read of the scores; no evaluation can be faster than reading its input.
Slow peers (reference, torchmetrics, scikit-learn) run once, after a warm-up on a small slice (1,000 rows for the
reference, 8 labels for the others). Preparing each peer's input (above) is not timed.

Data (``make_data``, seeded by ``--seed``): targets int8 with 1 = positive, -1 = negative, 0 = unannotated. Each
label has its own positive rate, log-normal around the size's mean rate (NUS-WIDE-like: ~2.5 positives per image
among the 81 unseen labels, ~1% of the 1,006 GZSL labels, some images without positive); the Open-Images-like size
leaves 99.5% of the entries unannotated (~38 verified labels per image, about a quarter of them positive). Scores
are float32 in (0, 1): ``sigmoid(noise + 2 * positive - 1)`` with standard normal noise, and a random quarter of
them rounded to 1e-3 so that ties occur (in [0, 1], torchmetrics does not re-apply a sigmoid).

Correctness comes first, on every size, and the run aborts on a mismatch: pyzsl cpp against the reference (mAP to
1e-9, P/R/F1 exactly, per-label AP on a label subset to 1e-9), then per-label AP against scikit-learn and
torchmetrics on a subset of labels with at least one positive (to 1e-6); after timing, the mAP each peer returned
is compared with pyzsl's too.

    python benchmarks/bench_eval.py --quick      # small sizes, well under a minute
    python benchmarks/bench_eval.py              # NUS-WIDE ZSL and GZSL sizes (a few minutes on 2 cores)
    python benchmarks/bench_eval.py --large      # plus 125,000 x 7,586 with unannotated entries (peak ~20 GB of RAM)
"""
import argparse
import csv
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

import pyzsl
from pyzsl.info import report
from pyzsl.metrics.functional import multilabel_average_precision, multilabel_evaluation, multilabel_topk

KS = (3, 5)
PROTOCOL = "lesa"
SHIFT = 2.0            # logit shift of a positive entry
TIE_FRACTION = 0.25    # share of scores rounded to 1e-3
WARMUP_ROWS = 1000     # rows of the slice the reference warms up on
WARMUP_LABELS = 8      # labels of the slice torchmetrics and scikit-learn warm up on (all rows)
CHECK_LABELS = 48      # labels in the per-label checks
CHECK_ROWS = 5000      # rows of the top-K check where the full reference is skipped
TARGET_SPEEDUP = 50.0
TARGET_FLOOR_MULTIPLE = 10.0


@dataclass(frozen=True)
class Size:
    name: str
    rows: int
    labels: int
    positive_rate: float          # mean over labels of P(positive | annotated)
    annotated_fraction: float = 1.0
    gzsl: bool = False            # the size the targets are checked at
    run_reference: bool = True


def sizes(quick: bool, large: bool) -> List[Size]:
    rows = 10_000 if quick else 107_859
    out = [Size("NUS-WIDE ZSL", rows, 81, 2.5 / 81), Size("NUS-WIDE GZSL", rows, 1006, 0.01, gzsl=True)]
    if large:
        out.append(Size("Open-Images-like", 10_000 if quick else 125_000, 7586, 1 / 3, annotated_fraction=0.005,
                        run_reference=False))
    return [replace(s, name=f"quick {s.name}") for s in out] if quick else out


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- data

def make_data(size: Size, seed: int, chunk_elements: int = 1 << 24) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded scores float32 [N, L] in (0, 1) and targets int8 [N, L] (1 / -1 / 0), generated in row chunks."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.randn(size.labels, generator=g))
    rate = (weights / weights.mean() * size.positive_rate).clamp(max=0.5)
    scores = torch.empty(size.rows, size.labels, dtype=torch.float32)
    targets = torch.empty(size.rows, size.labels, dtype=torch.int8)
    step = max(1, chunk_elements // size.labels)
    for r0 in range(0, size.rows, step):
        shape = (min(step, size.rows - r0), size.labels)
        annotated = torch.rand(shape, generator=g) < size.annotated_fraction
        positive = (torch.rand(shape, generator=g) < rate) & annotated
        targets[r0:r0 + shape[0]] = torch.where(positive, 1, torch.where(annotated, -1, 0))
        s = torch.sigmoid(torch.randn(shape, generator=g) + SHIFT * positive - 1.0)
        tied = torch.rand(shape, generator=g) < TIE_FRACTION
        scores[r0:r0 + shape[0]] = torch.where(tied, torch.round(s, decimals=3), s)
    return scores, targets


# --------------------------------------------------------------------------------------------------------- peers

@dataclass
class Peer:
    module: object = None   # torchmetrics.functional.classification or sklearn.metrics; None when not run
    version: str = ""
    missing: str = ""       # why it is not run


def import_peers(skip: bool) -> Dict[str, Peer]:
    if skip:
        return {name: Peer(missing="skipped (--skip-peers)") for name in ("torchmetrics", "scikit-learn")}
    peers = {}
    try:
        import torchmetrics
        import torchmetrics.functional.classification as tmc
        peers["torchmetrics"] = Peer(tmc, torchmetrics.__version__)
    except ImportError:
        peers["torchmetrics"] = Peer(missing="not installed")
    try:
        import sklearn
        import sklearn.metrics as skm
        peers["scikit-learn"] = Peer(skm, sklearn.__version__)
    except ImportError:
        peers["scikit-learn"] = Peer(missing="not installed")
    return peers


def torchmetrics_targets(targets: torch.Tensor) -> torch.Tensor:
    """pyzsl targets in torchmetrics' convention: 1 -> 1, -1 -> 0, unannotated 0 -> -1 (its ignore_index)."""
    out = (targets == 1).to(torch.int8)
    return out.masked_fill_(targets == 0, -1)


def torchmetrics_map(tmc, scores, tm_targets, ignore_index: Optional[int], average="macro") -> torch.Tensor:
    """Its input validation is off (``validate_args=False``): faster, and at the Open-Images-like size it would need
    ~15 bytes per entry. pyzsl's own validation is timed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # labels without positive warn
        return tmc.multilabel_average_precision(scores, tm_targets, num_labels=scores.shape[1], average=average,
                                                thresholds=None, ignore_index=ignore_index, validate_args=False)


def column_major(x: torch.Tensor) -> torch.Tensor:
    """The same [N, L] matrix with contiguous columns."""
    return x.T.contiguous().T


def sklearn_columns(scores, targets):
    """Column-contiguous numpy copies: scores [L, N], positives [L, N] and annotated [L, N] (None if all are)."""
    annotated = (targets.T != 0).contiguous().numpy() if bool((targets == 0).any()) else None
    return scores.T.contiguous().numpy(), (targets.T == 1).contiguous().numpy(), annotated


def sklearn_ap(skm, columns, labels=None) -> List[float]:
    s, positive, annotated = columns
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # labels without positive warn (AP 0, as under protocol lesa)
        for j in range(s.shape[0]) if labels is None else labels:
            if annotated is None:
                out.append(skm.average_precision_score(positive[j], s[j]))
            else:
                m = annotated[j]
                out.append(skm.average_precision_score(positive[j][m], s[j][m]))
    return out


# --------------------------------------------------------------------------------------------------- correctness

class Mismatch(RuntimeError):
    pass


def expect_close(what: str, ours: float, theirs: float, tol: float) -> None:
    if not abs(ours - theirs) <= tol:
        raise Mismatch(f"{what}: pyzsl {ours!r} vs {theirs!r} (|diff| {abs(ours - theirs):.3g} > {tol:g})")


def check_label_subset(scores, targets, peers, labels_with_positive) -> None:
    """Per-label AP of pyzsl cpp against the reference, scikit-learn and torchmetrics on a few labels."""
    L = scores.shape[1]
    cols = torch.linspace(0, L - 1, min(CHECK_LABELS, L)).round().long().unique()
    sub_s, sub_t = scores[:, cols].contiguous(), targets[:, cols].contiguous()
    ours = multilabel_average_precision(sub_s, sub_t, average="none", protocol=PROTOCOL, backend="cpp")
    ref = multilabel_average_precision(sub_s, sub_t, average="none", protocol=PROTOCOL, backend="reference")
    for i, j in enumerate(cols.tolist()):
        expect_close(f"AP of label {j}, cpp vs reference", float(ours[i]), float(ref[i]), 1e-9)
    keep = labels_with_positive[cols]
    cols, sub_s, sub_t, ours = cols[keep], sub_s[:, keep].contiguous(), sub_t[:, keep].contiguous(), ours[keep]
    skm, tmc = peers["scikit-learn"].module, peers["torchmetrics"].module
    if skm is not None:
        for j, ap_ours, ap_sk in zip(cols.tolist(), ours.tolist(), sklearn_ap(skm, sklearn_columns(sub_s, sub_t))):
            expect_close(f"AP of label {j} vs scikit-learn", ap_ours, ap_sk, 1e-6)
    if tmc is not None:
        ignore = -1 if bool((sub_t == 0).any()) else None
        tm = torchmetrics_map(tmc, sub_s, torchmetrics_targets(sub_t), ignore, average="none")
        for j, ap_ours, ap_tm in zip(cols.tolist(), ours.tolist(), tm.tolist()):
            expect_close(f"AP of label {j} vs torchmetrics", ap_ours, ap_tm, 1e-6)


def expect_same_evaluation(what: str, ours: Dict[str, float], ref: Dict[str, float]) -> None:
    expect_close(f"mAP, {what}", ours["mAP"], ref["mAP"], 1e-9)
    for key in ours:
        if key != "mAP" and ours[key] != ref[key]:
            raise Mismatch(f"{key}, {what}: cpp {ours[key]!r} vs reference {ref[key]!r} (must be equal)")


def check_topk_rows(scores, targets) -> None:
    """Top-K of cpp against the reference on the first CHECK_ROWS images (all labels)."""
    s, t = scores[:CHECK_ROWS], targets[:CHECK_ROWS]
    for k in KS:
        ours = multilabel_topk(s, t, k, protocol=PROTOCOL, backend="cpp")
        ref = multilabel_topk(s, t, k, protocol=PROTOCOL, backend="reference")
        if tuple(map(float, ours)) != tuple(map(float, ref)):
            raise Mismatch(f"P/R/F1@{k} on the first {CHECK_ROWS} rows: cpp {ours} vs reference {ref}")


# -------------------------------------------------------------------------------------------------------- timing

def timed_once(fn: Callable, warmup: Optional[Callable] = None):
    """(seconds, result) of one run of ``fn``, after one warm-up call (``warmup`` or ``fn``)."""
    (warmup or fn)()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_times_interleaved(fns: Dict[str, Callable], repeats: int) -> Dict[str, float]:
    """Best seconds of each function over ``repeats`` rounds that call them in turn, after one warm-up call each:
    on a machine whose speed drifts, each ratio between them then comes from the same stretch of time."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def evaluation(backend: str, scores, targets) -> Callable[[], Dict[str, float]]:
    return lambda: multilabel_evaluation(scores, targets, ks=KS, protocol=PROTOCOL, backend=backend)


@dataclass
class Row:
    method: str
    computes: str
    seconds: Optional[float] = None   # None: not run, see note
    runs: int = 0
    note: str = ""


def bench_size(size: Size, args, peers) -> List[Row]:
    progress(f"{size.name}: generating {size.rows:,} x {size.labels:,}")
    scores, targets = make_data(size, args.seed)
    labels_with_positive = (targets == 1).any(0)

    progress(f"{size.name}: correctness checks")
    check_label_subset(scores, targets, peers, labels_with_positive)
    ours = evaluation("cpp", scores, targets)()
    rows = [Row("pyzsl cpp", f"mAP + P/R/F1@{'/'.join(map(str, KS))}")]
    ref_row = Row("pyzsl reference", "same, pure PyTorch")
    if size.run_reference:
        progress(f"{size.name}: pyzsl reference (one run, also the check)")
        ref_row.seconds, ref = timed_once(evaluation("reference", scores, targets),
                                          warmup=evaluation("reference", scores[:WARMUP_ROWS], targets[:WARMUP_ROWS]))
        ref_row.runs = 1
        expect_same_evaluation("cpp vs reference", ours, ref)
    else:
        check_topk_rows(scores, targets)
        ref_row.note = "skipped: too slow at this size (checked on label and row subsets)"

    progress(f"{size.name}: timing pyzsl cpp and the floor, in turn")
    best = best_times_interleaved({"cpp": evaluation("cpp", scores, targets), "floor": lambda: scores.sum()},
                                  args.repeats)
    rows[0].seconds, rows[0].runs = best["cpp"], args.repeats
    rows.append(ref_row)
    rows += time_peers(size, scores, targets, peers, ours["mAP"], labels_with_positive)
    rows.append(Row("floor", "scores.sum(), one read", best["floor"], args.repeats))
    return rows


def time_peers(size, scores, targets, peers, our_map: float, labels_with_positive) -> List[Row]:
    """One timed run of each installed peer, after a small warm-up; the mAP it returns must match ours."""
    tm, sk = peers["torchmetrics"], peers["scikit-learn"]
    rows = [Row(f"torchmetrics {tm.version}".strip(), "mAP only (macro, exact)", note=tm.missing),
            Row(f"scikit-learn {sk.version}".strip(), "mAP only (loop over labels)", note=sk.missing)]
    if tm.module is not None:
        progress(f"{size.name}: torchmetrics (one run)")
        rows[0].seconds, tm_map = time_torchmetrics(tm.module, scores, targets)
        rows[0].runs = 1
        # This torchmetrics gives AP 0 to a label without positive (as lesa does); some versions give NaN and leave
        # the label out of the macro mean: accept either.
        ours_positive = float(multilabel_average_precision(scores, targets, average="none", backend="cpp")
                              [labels_with_positive].mean())
        if abs(tm_map - ours_positive) > 1e-6:
            expect_close("mAP vs torchmetrics", our_map, tm_map, 1e-6)
    if sk.module is not None:
        progress(f"{size.name}: scikit-learn (one run, {size.labels:,} labels)")
        rows[1].seconds, sk_map = time_sklearn(sk.module, scores, targets)
        rows[1].runs = 1
        expect_close("mAP vs scikit-learn", our_map, sk_map, 1e-6)
    return rows


def time_torchmetrics(tmc, scores, targets) -> Tuple[float, float]:
    # Column-major copies (still [N, L]): torchmetrics loops over label columns, which is faster when they are
    # contiguous. The conversion and the copies are not timed.
    ignore = -1 if bool((targets == 0).any()) else None
    scores, tm_targets = column_major(scores), torchmetrics_targets(column_major(targets))
    small_s, small_t = scores[:, :WARMUP_LABELS].contiguous(), tm_targets[:, :WARMUP_LABELS].contiguous()
    seconds, result = timed_once(lambda: torchmetrics_map(tmc, scores, tm_targets, ignore),
                                 warmup=lambda: torchmetrics_map(tmc, small_s, small_t, ignore))
    return seconds, float(result)


def time_sklearn(skm, scores, targets) -> Tuple[float, float]:
    columns = sklearn_columns(scores, targets)  # the column-contiguous copies are not timed
    seconds, aps = timed_once(lambda: sklearn_ap(skm, columns),
                              warmup=lambda: sklearn_ap(skm, columns, range(min(WARMUP_LABELS, scores.shape[1]))))
    return seconds, sum(aps) / len(aps)


# -------------------------------------------------------------------------------------------------------- output

def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def fmt_ratio(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:,.2f}×" if x < 10 else f"{x:,.0f}×"


def print_table(size: Size, rows: List[Row]) -> None:
    ours, floor = rows[0].seconds, rows[-1].seconds
    unannotated = "" if size.annotated_fraction == 1 else f", {1 - size.annotated_fraction:.1%} unannotated"
    print(f"\n### {size.name}: {size.rows:,} × {size.labels:,}{unannotated}, protocol {PROTOCOL}\n")
    print("| method | what it computes | seconds | vs pyzsl cpp (time / ours) | vs floor (time / floor) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        seconds = r.note if r.seconds is None else f"{r.seconds:.4g}" + (" (1 run)" if r.runs == 1 else "")
        print(f"| {r.method} | {r.computes} | {seconds} | {fmt_ratio(ratio(r.seconds, ours))} | "
              f"{fmt_ratio(ratio(r.seconds, floor))} |")


def print_targets(size: Size, rows: List[Row], quick: bool) -> None:
    ours, floor = rows[0].seconds, rows[-1].seconds
    print(f"\nTargets at {size.name} ({size.rows:,} × {size.labels:,})"
          + (", quick size: indicative only" if quick else "")
          + " (pyzsl cpp also computes top-K, the peers only the mAP):")
    for r in rows:
        if r.method.startswith(("torchmetrics", "scikit-learn")):
            if r.seconds is None:
                print(f"  speed-up vs {r.method}: {r.note}")
                continue
            x = r.seconds / ours
            print(f"  speed-up vs {r.method}: {x:,.1f}× (target ≥ {TARGET_SPEEDUP:.0f}×): "
                  f"{'MET' if x >= TARGET_SPEEDUP else 'NOT MET'}")
    x = ours / floor
    print(f"  pyzsl cpp as a multiple of the floor: {x:,.1f}× (target ≤ {TARGET_FLOOR_MULTIPLE:.0f}×): "
          f"{'MET' if x <= TARGET_FLOOR_MULTIPLE else 'NOT MET'}")


def write_csv(path: str, results: List[Tuple[Size, List[Row]]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["size", "rows", "labels", "annotated_fraction", "method", "computes", "seconds", "runs",
                    "vs_pyzsl_cpp", "vs_floor", "note", "threads", "torch", "pyzsl"])
        for size, rows in results:
            ours, floor = rows[0].seconds, rows[-1].seconds
            for r in rows:
                w.writerow([size.name, size.rows, size.labels, size.annotated_fraction, r.method, r.computes,
                            r.seconds, r.runs, ratio(r.seconds, ours), ratio(r.seconds, floor), r.note,
                            torch.get_num_threads(), torch.__version__, pyzsl.__version__])


# ---------------------------------------------------------------------------------------------------------- main

def others_busy(interval: float = 0.5) -> Optional[float]:
    """Share of the CPU time other processes used during ``interval`` while this one slept (Linux); None elsewhere."""
    def sample():
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, total
    first = sample()
    time.sleep(interval)
    second = sample()
    if first is None or second is None or second[1] == first[1]:
        return None
    return 1 - (second[0] - first[0]) / (second[1] - first[1])


def warn_if_busy(when: str) -> None:
    """Other processes on the cores distort the timings, the peers' many small ops most (their threads wait)."""
    busy = others_busy()
    if busy is not None and busy > 0.2:
        print(f"WARNING ({when}): other processes used {busy:.0%} of the CPU: the timings are unreliable.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (10,000 rows), well under a minute")
    p.add_argument("--large", action="store_true", help="add an Open-Images-like size, 125,000 x 7,586")
    p.add_argument("--repeats", type=int, default=15,
                   help="timed rounds of the fast methods, pyzsl cpp and the floor called in turn (best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "bench_eval.csv"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-peers", action="store_true", help="leave out torchmetrics and scikit-learn")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(report())
    warn_if_busy("before the benchmark")
    peers = import_peers(args.skip_peers)
    results = []
    try:
        for size in sizes(args.quick, args.large):
            rows = bench_size(size, args, peers)
            results.append((size, rows))
            print_table(size, rows)
    except Mismatch as error:
        print(f"\nCORRECTNESS CHECK FAILED, aborting: {error}", file=sys.stderr)
        return 1
    warn_if_busy("after the benchmark")
    for size, rows in results:
        if size.gzsl:
            print_targets(size, rows, args.quick)
    write_csv(args.csv, results)
    print(f"\nCSV: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
