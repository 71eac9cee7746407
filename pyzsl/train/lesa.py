"""``python -m pyzsl.train lesa``: train and evaluate LESA (multi-label ZSL).

Each epoch trains on the training split (global batches, shuffled with ``seed + epoch``, split across torchrun ranks),
scores the validation split on the seen labels (F1 at the largest K, which drives LESA's adaptive LR and the
``--selection val`` model choice), logs a CSV row and writes an atomic checkpoint. At the end the selected model is
evaluated on the test split: ZSL over the unseen labels and GZSL over unseen + seen, mAP and P/R/F1 at every K.
"""
import argparse
import math
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.multilabel import MultilabelZSLData, load_multilabel_dataset
from ..metrics import MultilabelZSLEvaluator
from ..models.lesa import LESA, AdaptiveLR, LESALossWeights, TFRMSprop, lesa_loss
from .runner import Run, Selector, init_distributed, progress, resolve_config, rng_state, seed_everything, \
    set_rng_state

DATASETS = ("synthetic", "nus-wide", "openimages")

# Published settings (hbdat/cvpr20_LESA) unless noted; `synthetic` is sized to train in about a minute on 2 cores.
DEFAULTS = {
    "dataset": "synthetic", "epochs": 8, "batch_size": 32, "lr": 1e-3, "heads": 10, "hidden_dim": 512,
    "loss_weights": {"distribution": 0.1, "relevance": 1e-3, "diversity": 1e-2},
    "signal_strength": 0.3, "patience": 2, "ks": [3, 5], "protocol": "lesa", "eval_batch_size": 256,
    "drop_images_without_positive": False, "test_every_epoch": False, "dataset_options": {},
}
PRESETS = {
    # LESA's ZSL scripts: lr 1e-3, patience 5 (NUS), K = 3, 5; hidden 512 over VGG19 conv5_4 [196, 512].
    "nus-wide": {"patience": 5, "ks": [3, 5], "epochs": 80},
    # Open Images: 2 epochs, K = 10, 20, images without a positive label dropped from each training batch.
    "openimages": {"epochs": 2, "ks": [10, 20], "drop_images_without_positive": True},
    # Small enough for 2 CPU cores; the trainer's hidden width scales down with the 64-d features.
    "synthetic": {"hidden_dim": 64, "lr": 1e-2},
}


def add_arguments(parser: argparse.ArgumentParser, method: str) -> None:
    parser.set_defaults(dataset=None)
    parser.add_argument("--heads", type=int, help="number of shared attention heads M (default 10)")
    parser.add_argument("--hidden-dim", type=int, help="attention hidden width (default 512; 64 on synthetic)")
    parser.add_argument("--protocol", choices=("lesa", "biam", "sdl"), help="evaluation protocol (default lesa)")
    parser.add_argument("--ks", type=int, nargs="+", help="K of P/R/F1@K (default 3 5; 10 20 on openimages)")
    parser.add_argument("--patience", type=int, help="adaptive-LR patience in epochs (default 2; 5 on nus-wide)")
    parser.add_argument("--eval-batch-size", type=int, help="batch size for scoring (default 256)")
    parser.add_argument("--test-every-epoch", action="store_true", default=None,
                        help="also evaluate the test split every epoch (always on with --selection parity)")


def _config(args: argparse.Namespace) -> Dict:
    dataset = args.dataset or DEFAULTS["dataset"]
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS} for lesa, got {dataset!r}")
    return resolve_config(args, {**DEFAULTS, **PRESETS.get(dataset, {}), "dataset": dataset})


class GlobalBatchSampler:
    """Yields this rank's share of each global batch: a permutation seeded with ``seed + epoch``, cut into batches
    of ``batch_size`` rows, each batch cut into ``world`` contiguous shards. One process with batch B therefore sees
    exactly the rows N processes see together."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size < world:
            raise ValueError(f"--batch-size ({batch_size}) must be at least the number of processes ({world})")
        self.num_rows, self.batch_size, self.seed, self.rank, self.world = num_rows, batch_size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for batch in order.split(self.batch_size):
            bounds = [len(batch) * r // self.world for r in range(self.world + 1)]
            yield batch[bounds[self.rank]: bounds[self.rank + 1]].tolist()


def _shard_rows(num_rows: int, rank: int, world: int) -> range:
    return range(num_rows * rank // world, num_rows * (rank + 1) // world)


def chance_scores(rows: Tensor, num_labels: int) -> Tensor:
    """Uniform pseudo-random scores that depend only on (row, label), so every process count sees the same ones."""
    columns = torch.arange(num_labels, dtype=torch.int64)
    mixed = (rows.to(torch.int64)[:, None] * 1_000_003 + columns * 998_244_353) * 2_654_435_761
    mixed = (mixed ^ (mixed >> 29)) & 0xFFFFFF
    return mixed.to(torch.float32) / float(1 << 24)


@torch.no_grad()
def _score(model: LESA, dataset: Dataset, label_set: str, evaluator: MultilabelZSLEvaluator, config: Dict,
           rank: int, world: int, description: str, chance: Optional[MultilabelZSLEvaluator] = None
           ) -> Dict[str, float]:
    """Scores this rank's shard of ``dataset`` into ``evaluator`` (and chance-level scores into ``chance``)."""
    model.eval()
    rows = _shard_rows(len(dataset), rank, world)
    loader = DataLoader(Subset(dataset, rows), batch_size=config["eval_batch_size"],
                        num_workers=config["num_workers"])
    start = rows.start
    for features, targets in progress(loader, disable=config["no_progress"], desc=description, leave=False):
        scores = model(features.to(config["device"]), label_set).scores
        evaluator.update(scores, targets.to(config["device"]))
        if chance is not None:
            row_ids = torch.arange(start, start + len(targets))
            chance.update(chance_scores(row_ids, scores.shape[1]).to(scores), targets.to(config["device"]))
        start += len(targets)
    model.train()
    return evaluator.compute()


def validate(model: LESA, data: MultilabelZSLData, config: Dict, rank: int, world: int) -> Dict[str, float]:
    """mAP and P/R/F1@K on the validation split over the seen labels (keys ``val/...``)."""
    evaluator = MultilabelZSLEvaluator(unseen=range(len(data.seen_names)), ks=config["ks"],
                                       protocol=config["protocol"], backend=config["backend"])
    results = _score(model, data.val, "seen", evaluator, config, rank, world, "validation")
    return {key.replace("zsl/", "val/"): value for key, value in results.items()}


def test(model: LESA, data: MultilabelZSLData, config: Dict, rank: int, world: int,
         with_chance: bool = False) -> Dict[str, float]:
    """ZSL (unseen labels) and GZSL (unseen then seen) metrics on the test split (keys ``zsl/...``, ``gzsl/...``).

    ``with_chance`` adds ``chance/zsl/...`` and ``chance/gzsl/...``: the same metrics for pseudo-random scores, the
    chance level the model's numbers should be read against.
    """
    unseen = len(data.unseen_names)

    def evaluator():
        return MultilabelZSLEvaluator(unseen=range(unseen), seen=range(unseen, unseen + len(data.seen_names)),
                                      ks=config["ks"], protocol=config["protocol"], backend=config["backend"])

    chance = evaluator() if with_chance else None
    results = _score(model, data.test, "all", evaluator(), config, rank, world, "test", chance)
    if chance is not None:
        results.update({f"chance/{key}": value for key, value in chance.compute().items()})
    return results


def build_model(data: MultilabelZSLData, config: Dict) -> LESA:
    regions, feature_dim = data.feature_shape
    side = math.isqrt(regions)
    if side * side != regions:
        raise ValueError(f"LESA needs a square region grid; the dataset has R = {regions} regions")
    return LESA(data.seen_vectors, data.unseen_vectors, feature_dim=feature_dim, grid=(side, side),
                hidden_dim=config["hidden_dim"], heads=config["heads"], backend=config["backend"])


def train_epoch(model, loader, optimizer, weights: LESALossWeights, config: Dict, epoch: int) -> Dict[str, float]:
    totals: Dict[str, float] = {}
    steps = 0
    bar = progress(loader, disable=config["no_progress"], desc=f"epoch {epoch}/{config['epochs']}", leave=False)
    for features, targets in bar:
        features, targets = features.to(config["device"]), targets.to(config["device"])
        if config["drop_images_without_positive"]:
            keep = (targets > 0).any(1)
            features, targets = features[keep], targets[keep]
        output = model(features, "seen")
        losses = lesa_loss(output, targets, weights, backend=config["backend"])
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        for name, value in losses.items():
            if name != "total":
                totals[name] = totals.get(name, 0.0) + float(value.detach())
        steps += 1
        bar.set_postfix(rank_loss=f"{float(losses['rank'].detach()):.3f}")
    names = sorted(totals)
    means = torch.tensor([totals[name] / max(steps, 1) for name in names], dtype=torch.float64,
                         device=config["device"])  # nccl reduces device tensors only
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(means)  # the ranks' shard contributions add up to the global-batch values
    return {f"loss/{name}": float(value) for name, value in zip(names, means)}


def _print_results(results: Dict[str, float], data: MultilabelZSLData, config: Dict, selection: str) -> None:
    ks = config["ks"]
    header = f"{'':>14} {'mAP':>6} " + " ".join(f"{m + '@' + str(k):>6}" for k in ks for m in ("P", "R", "F1"))
    print(f"\nLESA on {config['dataset']}: {selection}")
    print(header)
    for task, count in (("zsl", len(data.unseen_names)), ("gzsl", len(data.unseen_names) + len(data.seen_names))):
        values = [results[f"{task}/mAP"]] + [results[f"{task}/{m}@{k}"] for k in ks for m in ("P", "R", "F1")]
        print(f"{task.upper() + f' ({count})':>14} " + " ".join(f"{100 * v:6.2f}" for v in values))
    print(f"chance (random scores): ZSL mAP {100 * results['chance/zsl/mAP']:.2f}, "
          f"GZSL mAP {100 * results['chance/gzsl/mAP']:.2f}")


def main(args: argparse.Namespace, method: str = "lesa") -> Dict[str, float]:
    config = _config(args)
    rank, world = init_distributed(config["device"])
    run = Run(config, method, resume=args.resume, cli_overrides=vars(args))
    config = run.config
    seed_everything(config["seed"])
    data = load_multilabel_dataset(config["dataset"], config["data_root"], **config["dataset_options"])
    model = build_model(data, config).to(config["device"])
    trained = DistributedDataParallel(model) if world > 1 else model
    optimizer = TFRMSprop(model.parameters(), lr=config["lr"])
    schedule = AdaptiveLR(optimizer, config["lr"], config["signal_strength"], config["patience"])
    selection = config["selection"]
    selector = Selector(selection)
    weights = LESALossWeights(**config["loss_weights"])
    sampler = GlobalBatchSampler(len(data.train), config["batch_size"], config["seed"], rank, world)
    loader = DataLoader(data.train, batch_sampler=sampler, num_workers=config["num_workers"])

    start = 0
    state = run.load_checkpoint() if args.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        selector.load_state_dict(state["selector"])
        set_rng_state(state["rng"])
        start = state["epoch"]
        run.truncate_log(start)
        if run.is_main:
            print(f"resuming {run.dir} after epoch {start}")
    elif run.is_main:
        print(f"run folder: {run.dir}")

    for epoch in range(start + 1, config["epochs"] + 1):
        sampler.set_epoch(epoch)
        row = {"epoch": epoch, "lr": schedule.lr, **train_epoch(trained, loader, optimizer, weights, config, epoch)}
        row.update(validate(model, data, config, rank, world))
        test_now = selection == "parity" or config["test_every_epoch"]
        if test_now:
            row.update(test(model, data, config, rank, world))
        val_score = row[f"val/F1@{max(config['ks'])}"]
        is_best = selector.update(epoch, val_score, row.get("gzsl/mAP"))
        schedule.step(val_score)
        run.log(row)
        run.save_checkpoint({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "selector": selector.state_dict(),
                             "rng": rng_state(), "config": config}, best=is_best)
        if run.is_main:
            summary = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith(("loss/rank", "val/mAP", "val/F1")))
            print(f"epoch {epoch}: {summary} lr={row['lr']:.2e}", flush=True)
    if world > 1:
        dist.barrier()  # rank 0's best.pt is complete before anyone reads it

    best = run.load_checkpoint("best") or run.load_checkpoint("last")
    if best is None:
        raise RuntimeError(f"{run.dir} has no checkpoint: was --epochs 0?")
    model.load_state_dict(best["model"])
    results = test(model, data, config, rank, world, with_chance=True)
    if run.is_main:
        _print_results(results, data, config, selector.describe())
        run.save_results({"selected_epoch": best["epoch"], "selection": selector.describe(), **results})
        print(f"log: {run.log_path}; results: {run.dir / 'results.json'}; checkpoints: {run.dir}")
    run.close()
    return results
