"""TF-VAEGAN feature synthesis of every unseen class at the published settings: pyzsl's feedback_synthesis (fp32 and
bf16 compute) against the per-class loop written as published and against the bare GEMMs of the same shapes.

Settings (reference/generative-gzsl-methods.md §1.3, §1.9): resSize 2048, ngh 4096, nz = attSize,
CUB 50 unseen x 300 (att 312), AWA2 10 x 1,800 (85), SUN 72 x 400 (102), FLO 20 x 1,200 (1,024).

Rows:
- loop (published): ``generate_syn_feature`` one class at a time with the published modules: G(z, a), the whole
  decoder Dec(fake) (its hidden layer and its L2-normalised attribute head), F(hidden), then G again with
  feedback, under no_grad;
- batched reference: pyzsl's pure-PyTorch reference, every row in one pass;
- bare GEMMs (floor): ``torch.matmul`` alone, fp32, for the six products of one pass over all rows (no bias, no
  activation, no chunking);
- pyzsl fp32 / pyzsl bf16: ``feedback_synthesis(backend="cpp")``, bf16 with ``compute_dtype=torch.bfloat16``
  (weights cast on every call, included in the time).
The noise is drawn once and shared (its generation is not timed). Correctness first: pyzsl fp32 and the batched
reference must equal the published loop to float32 rounding; bf16's error against fp32 is reported. Then each row
runs ``--repeats`` times, rows interleaved so that a change of machine load hits them alike, and the best time is
kept. GFLOP/s count the six GEMMs of one pass, 2 N ((nz + na) H + H X + X Hd + Hd Hf + Hf H + H X), for every row of
the table (the loop really does more work: G twice and the decoder's attribute head), so it reads as throughput.

After the table, ``benchmarks/bench_gan_step.py`` (the training-step benchmark), when it exists, runs with the
arguments this script does not know (``--no-step`` skips it).

    python benchmarks/bench_synthesis.py [--datasets cub awa2 sun flo] [--repeats 2] [--threads N] [--quick]
                                         [--chunk-size N] [--no-step] [arguments of bench_gan_step.py]
"""
import argparse
import csv
import datetime
import importlib.util
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pyzsl.ops import feedback_synthesis
from pyzsl.ops.synthesis import feedback_synthesis_reference, synthesis_flops

RES_SIZE, NGH = 2048, 4096
# name: (unseen classes, syn_num per class, attribute size, a2)
DATASETS = {"cub": (50, 300, 312, 1.0), "awa2": (10, 1800, 85, 0.01), "sun": (72, 400, 102, 0.01),
            "flo": (20, 1200, 1024, 0.5)}
ROWS = ("loop (published)", "batched reference", "bare GEMMs (floor)", "pyzsl fp32", "pyzsl bf16")
HERE = Path(__file__).resolve().parent


class Generator(nn.Module):
    """networks/TFVAEGAN_model.py Generator: cat(z, a) -> fc1 -> LReLU -> (+ a1 * feedback) -> fc3 -> sigmoid."""

    def __init__(self, att_size):
        super().__init__()
        self.fc1 = nn.Linear(2 * att_size, NGH)
        self.fc3 = nn.Linear(NGH, RES_SIZE)
        self.lrelu = nn.LeakyReLU(0.2, True)
        self.sigmoid = nn.Sigmoid()

    def forward(self, z, c=None, feedback_layers=None, a1=None):
        z = torch.cat((z, c), dim=-1)
        x1 = self.lrelu(self.fc1(z))
        if feedback_layers is None:
            return self.sigmoid(self.fc3(x1))
        return self.sigmoid(self.fc3(x1 + a1 * feedback_layers))


class AttDec(nn.Module):
    """The semantic decoder: fc1 -> LReLU (the hidden layer F reads, detached) -> fc3 -> row L2 normalisation."""

    def __init__(self, att_size):
        super().__init__()
        self.fc1 = nn.Linear(RES_SIZE, NGH)
        self.fc3 = nn.Linear(NGH, att_size)
        self.lrelu = nn.LeakyReLU(0.2, True)
        self.hidden = None

    def forward(self, feat):
        self.hidden = self.lrelu(self.fc1(feat))
        return F.normalize(self.fc3(self.hidden), dim=1)

    def getLayersOutDet(self):  # noqa: N802  (the published name)
        return self.hidden.detach()


class Feedback(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(NGH, NGH)
        self.fc2 = nn.Linear(NGH, NGH)
        self.lrelu = nn.LeakyReLU(0.2, False)

    def forward(self, x):
        return self.lrelu(self.fc2(self.lrelu(self.fc1(x))))


def make_models(att_size, seed=0):
    """The three modules with the published init (Linear weights N(0, 0.02), biases 0), then trained-like biases."""
    torch.manual_seed(seed)
    models = Generator(att_size), AttDec(att_size), Feedback()
    for model in models:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.normal_(module.bias, 0.0, 0.1)  # nonzero, so the bias epilogues are exercised
    return models


def loop_published(models, class_attributes, noise, syn_num, a2):
    """generate_syn_feature (train_images.py), with the noise drawn beforehand and no .cuda()."""
    netG, netDec, netF = models
    out = torch.empty(len(noise), RES_SIZE)
    with torch.no_grad():
        for i in range(len(class_attributes)):
            syn_att = class_attributes[i].repeat(syn_num, 1)
            syn_noise = noise[i * syn_num:(i + 1) * syn_num]
            fake = netG(syn_noise, c=syn_att)
            netDec(fake)
            feedback_out = netF(netDec.getLayersOutDet())
            out[i * syn_num:(i + 1) * syn_num] = netG(syn_noise, a1=a2, c=syn_att, feedback_layers=feedback_out)
    return out


def op_arguments(models, class_attributes, noise, syn_num):
    netG, netDec, netF = models
    attributes = class_attributes.repeat_interleave(syn_num, dim=0)
    weights = [p.detach() for p in (netG.fc1.weight, netG.fc1.bias, netG.fc3.weight, netG.fc3.bias,
                                     netDec.fc1.weight, netDec.fc1.bias, netF.fc1.weight, netF.fc1.bias,
                                     netF.fc2.weight, netF.fc2.bias)]
    return [noise, attributes] + weights


def bare_gemms(args):
    """The six products of one pass, torch.matmul alone: the floor."""
    noise, attributes, w1, _, w3, _, wd, _, wf1, _, wf2, _ = args
    x1 = torch.matmul(torch.cat([noise, attributes], dim=1), w1.T)
    x0 = torch.matmul(x1, w3.T)
    h = torch.matmul(x0, wd.T)
    f1 = torch.matmul(h, wf1.T)
    fb = torch.matmul(f1, wf2.T)
    return torch.matmul(fb, w3.T)


def runners(models, class_attributes, noise, syn_num, a2, chunk_size):
    args = op_arguments(models, class_attributes, noise, syn_num)
    return {
        "loop (published)": lambda: loop_published(models, class_attributes, noise, syn_num, a2),
        "batched reference": lambda: feedback_synthesis_reference(*args, a2),
        "bare GEMMs (floor)": lambda: bare_gemms(args),
        "pyzsl fp32": lambda: feedback_synthesis(*args, a2, chunk_size=chunk_size, backend="cpp"),
        "pyzsl bf16": lambda: feedback_synthesis(*args, a2, chunk_size=chunk_size, compute_dtype=torch.bfloat16,
                                                 backend="cpp"),
    }


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_dataset(name, repeats, chunk_size, progress, quick):
    classes, syn_num, att_size, a2 = DATASETS[name]
    syn_num = syn_num // 10 if quick else syn_num
    models = make_models(att_size)
    g = torch.Generator().manual_seed(1)
    class_attributes = F.normalize(torch.rand(classes, att_size, generator=g), dim=1)  # xlsa17 att: L2-normalised
    noise = torch.randn(classes * syn_num, att_size, generator=g)
    fns = runners(models, class_attributes, noise, syn_num, a2, chunk_size)
    best = {}
    outputs = {}
    with torch.inference_mode():
        # First round: the outputs for the correctness check (and a warm-up of every path).
        for row in ROWS:
            best[row], outputs[row] = timed(fns[row])
            progress.update()
        expected = outputs["loop (published)"]
        errors = {}
        for row in ("batched reference", "pyzsl fp32"):
            errors[row] = (outputs[row] - expected).abs().max().item()
            # float32 rounding of sigmoid outputs in (0, 1) after K = 4096 sums
            assert errors[row] < 1e-4, f"{name}: {row} differs from the published loop by {errors[row]:.2e}"
        bf16 = outputs["pyzsl bf16"]
        errors["pyzsl bf16"] = (bf16 - outputs["pyzsl fp32"]).abs().max().item()
        bf16_mean_error = (bf16 - outputs["pyzsl fp32"]).abs().mean().item()
        del outputs
        for _ in range(repeats - 1):
            for row in ROWS:
                best[row] = min(best[row], timed(fns[row])[0])
                progress.update()
    flops = synthesis_flops(classes * syn_num, att_size, att_size, NGH, RES_SIZE, NGH, NGH)
    return best, flops, errors, bf16_mean_error, syn_num


def run_step_benchmark(argv):
    path = HERE / "bench_gan_step.py"
    if not path.exists():
        print(f"\n({path.name} not found: no training-step table)")
        return
    spec = importlib.util.spec_from_file_location("bench_gan_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print()
    module.main(argv)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row (the first also checks)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=None, help="pyzsl's chunk_size (default: the op's)")
    parser.add_argument("--quick", action="store_true", help="a tenth of syn_num per class (a smoke run)")
    parser.add_argument("--no-step", action="store_true", help="skip bench_gan_step.py")
    parser.add_argument("--csv", default=str(HERE / "results" / "bench_synthesis.csv"))
    args, step_argv = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"threads: {torch.get_num_threads()}; load average before: {load_before[0]:.2f} (1 min) on "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}")
    results = {}
    with tqdm(total=len(args.datasets) * len(ROWS) * args.repeats, desc="synthesis", unit="run") as progress:
        for name in args.datasets:
            results[name] = run_dataset(name, args.repeats, args.chunk_size, progress, args.quick)
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} (1 min), {load_after[1]:.2f} (5 min)\n")
    print("| dataset | rows x att | row | time (s) | / bare GEMMs | speed-up vs loop | GFLOP/s | max abs error |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    csv_rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for name, (best, flops, errors, bf16_mean, syn_num) in results.items():
        classes, _, att_size, _ = DATASETS[name]
        floor, loop = best["bare GEMMs (floor)"], best["loop (published)"]
        for row in ROWS:
            error = {"pyzsl bf16": f"{errors['pyzsl bf16']:.1e} vs fp32 (mean {bf16_mean:.1e})"}.get(
                row, f"{errors[row]:.1e} vs loop" if row in errors else "")
            print(f"| {name.upper()} | {classes} x {syn_num} = {classes * syn_num:,} x {att_size} | {row} | "
                  f"{best[row]:.2f} | {best[row] / floor:.3f} | {loop / best[row]:.2f}x | "
                  f"{flops / best[row] / 1e9:.0f} | {error} |")
            csv_rows.append([stamp, name, row, f"{best[row]:.4f}", f"{flops / best[row] / 1e9:.1f}",
                             torch.get_num_threads(), f"{load_before[0]:.2f}", f"{load_after[0]:.2f}"])
    print("\nTargets (issue 4):")
    for name, (best, *_) in results.items():
        fp32_ratio = best["pyzsl fp32"] / best["bare GEMMs (floor)"]
        bf16_speedup = best["pyzsl fp32"] / best["pyzsl bf16"]
        print(f"- {name.upper()}: fp32 within 1.1x of the bare GEMMs: {fp32_ratio:.3f}x -> "
              f"{'MET' if fp32_ratio <= 1.1 else 'NOT MET'}; bf16 >= 1.6x faster than fp32: {bf16_speedup:.2f}x -> "
              f"{'MET' if bf16_speedup >= 1.6 else 'NOT MET'}")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["utc", "dataset", "row", "seconds", "gflops", "threads", "load_before", "load_after"])
            writer.writerows(csv_rows)
    if not args.no_step:
        run_step_benchmark(step_argv)


if __name__ == "__main__":
    main()
