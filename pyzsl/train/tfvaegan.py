"""``python -m pyzsl.train tfvaegan|clswgan``: train a feature generator and evaluate generalized ZSL.

Each epoch runs the published loop (``feedback_loop`` passes of ceil(n_train / batch) generator steps, each with
``critic_iter`` critic steps; :class:`pyzsl.models.tfvaegan.GANTrainer`), then evaluates: ``syn_num`` features are
synthesised per unseen class in one batched call, a softmax classifier is trained on the discriminative features
``[x, Dec(x), Dec hidden]`` of real seen + synthetic unseen features (GZSL, all classes) and of synthetic unseen
features only (ZSL), and ZSL T1 and GZSL S / U / H are computed with :mod:`pyzsl.metrics.functional`.

Model selection (``--selection``):

- ``val`` (default): the whole run is first done on the validation task (train classes as seen, class-disjoint val
  classes as unseen, see :mod:`pyzsl.data.xlsa17`), the epoch with the best validation H is chosen, then a model is
  trained on trainval for that many epochs with the same seed and evaluated once on the test splits. Every
  classifier reports its last epoch.
- ``last``: train on trainval and report the last epoch.
- ``parity``: as published: evaluate on the test splits every epoch, keep the best test H (and, separately, the best
  test ZSL accuracy), each classifier reporting its best epoch on the test set. The output says so.

Evaluation draws its randomness (synthesis noise, classifier initialisation and shuffling) from a generator seeded
with (seed, epoch), so how often a run evaluates never changes its training trajectory, and a resumed run repeats
the uninterrupted one exactly (CPU). ``--seeds N`` runs seeds seed, seed+1, ... and prints mean ± sample std.
"""
import argparse
import math
import os
import statistics
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.xlsa17 import GZSLTask, load_dataset
from ..metrics.functional import gzsl_accuracy, zsl_accuracy
from ..models.tfvaegan import GANConfig, GANTrainer, TFVAEGAN
from .presets.gzsl import preset
from .runner import Run, Selector, progress, resolve_config, rng_state, seed_everything, set_rng_state

DATASETS = ("synthetic-gzsl", "cub", "awa2", "sun", "flo")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
METRICS = ("T1", "S", "U", "H", "synthesis_s")  # log.csv columns of an evaluation (empty when not evaluated)


def add_arguments(parser: argparse.ArgumentParser, method: str) -> None:
    g = parser.add_argument_group(f"{method} options (defaults: the dataset's published preset)")
    g.add_argument("--seeds", type=int, help="number of seeds (seed, seed+1, ...); prints mean ± std (default 1)")
    g.add_argument("--syn-num", type=int, help="synthetic features per unseen class")
    g.add_argument("--classifier-lr", type=float, help="final softmax classifier learning rate")
    g.add_argument("--classifier-epochs", type=int, help="final classifier epochs (published 25)")
    g.add_argument("--classifier-batch-size", type=int, help="final classifier batch size (published: syn_num)")
    g.add_argument("--critic-iter", type=int, help="critic steps per generator step (published 5)")
    g.add_argument("--hidden", type=int, help="generator / decoder / feedback width (published 4096)")
    g.add_argument("--critic-hidden", type=int, help="critic width (published 4096)")
    g.add_argument("--gamma-d", type=float, help="critic loss weight")
    g.add_argument("--gamma-g", type=float, help="generator adversarial loss weight")
    g.add_argument("--recons-weight", type=float, help="semantic reconstruction (cycle) loss weight")
    g.add_argument("--cls-weight", type=float, help="f-CLSWGAN classification loss weight")
    g.add_argument("--a1", type=float, help="feedback weight in training")
    g.add_argument("--a2", type=float, help="feedback weight in synthesis")
    g.add_argument("--feed-lr", type=float, help="feedback module learning rate")
    g.add_argument("--dec-lr", type=float, help="semantic decoder learning rate")
    g.add_argument("--encoded-noise", action=argparse.BooleanOptionalAction, default=None,
                   help="generator-phase fakes from the encoder posterior (published: on except FLO)")
    g.add_argument("--freeze-dec", action=argparse.BooleanOptionalAction, default=None,
                   help="freeze the decoder in the generator phase (published: AWA2)")
    g.add_argument("--calibration", type=float,
                   help="calibrated stacking: subtract this from seen-class scores in GZSL (default 0)")
    g.add_argument("--synthesis-dtype", choices=sorted(DTYPES),
                   help="compute dtype of evaluation-time synthesis (bf16 needs the op's bf16 path)")
    g.add_argument("--class-embedding", choices=("att", "sent"), help="xlsa17 class embedding (sent: CUB only)")
    g.add_argument("--threads", type=int, help="torch CPU threads (synthetic-gzsl preset: 1, its 256-wide layers gain "
                   "nothing from a second thread; otherwise torch's default)")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs with --selection last (default 1)")


def _config(args: argparse.Namespace, method: str) -> Dict:
    dataset = args.dataset or "synthetic-gzsl"
    if dataset not in DATASETS and not dataset.endswith((".h5", ".hdf5")):
        raise ValueError(f"--dataset must be one of {DATASETS} or an .h5 file in the generic layout, got {dataset!r}")
    config = resolve_config(args, preset(method, dataset))
    for key in ("seeds", "syn_num", "classifier_epochs", "critic_iter", "epochs", "batch_size", "eval_every"):
        if config[key] is not None and int(config[key]) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    return config


def gan_config(method: str, task: GZSLTask, config: Dict) -> GANConfig:
    tf = method == "tfvaegan"
    return GANConfig(
        feature_dim=task.feature_dim, attribute_dim=task.attribute_dim, hidden=config["hidden"],
        critic_hidden=config["critic_hidden"], encoder_hidden=config["encoder_hidden"], use_encoder=tf,
        use_feedback=tf, use_decoder=tf, generator_output="sigmoid" if tf else "relu", a1=config["a1"],
        a2=config["a2"], gamma_d=config["gamma_d"], gamma_g=config["gamma_g"], lambda1=config["lambda1"],
        adaptive_lambda=config["adaptive_lambda"], recons_weight=config["recons_weight"] if tf else 0.0,
        critic_iter=config["critic_iter"], feedback_loop=config["feedback_loop"] if tf else 1,
        encoded_noise=config["encoded_noise"] and tf, freeze_dec=config["freeze_dec"],
        cls_weight=0.0 if tf else config["cls_weight"], lr=config["lr"], feed_lr=config["feed_lr"],
        dec_lr=config["dec_lr"], batch_size=config["batch_size"])


# ------------------------------------------------------------------------------------------- final classifier

def _linear(in_dim: int, out_dim: int, generator: torch.Generator, device) -> nn.Linear:
    """nn.Linear with the published N(0, 0.02) initialisation drawn from ``generator`` only (skip_init: the default
    initialisation would draw from the global generator and make training depend on how often it evaluates)."""
    layer = torch.nn.utils.skip_init(nn.Linear, in_dim, out_dim, device=device)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_dim, in_dim, generator=generator) * 0.02)
        layer.bias.zero_()
    return layer


def fit_softmax(x: Tensor, y: Tensor, num_classes: int, *, lr: float, epochs: int, batch_size: int,
                generator: torch.Generator, evaluate=None, beta1: float = 0.5):
    """Linear + log-softmax classifier trained with NLL and Adam(lr, (beta1, 0.999)) on shuffled batches.

    ``evaluate(model) -> (score, metrics)`` runs after every epoch when given, and the best-scoring epoch's metrics
    are returned (the published test-set choice); without it the trained model is returned.
    """
    device = x.device
    model = _linear(x.shape[1], num_classes, generator, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(beta1, 0.999))
    best = None
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=generator).to(device)
        for start in range(0, x.shape[0], batch_size):
            idx = perm[start:start + batch_size]
            loss = F.nll_loss(F.log_softmax(model(x[idx]), 1), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if evaluate is not None:
            score, metrics = evaluate(model)
            if best is None or score > best[0]:
                best = (score, metrics)
    return best[1] if evaluate is not None else model


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch: int = 8192) -> Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, x.shape[0], batch)]) if x.shape[0] else \
        x.new_zeros(0, model.out_features)


def evaluate(model: TFVAEGAN, task: GZSLTask, config: Dict, generator: torch.Generator,
             best_on_test: bool) -> Dict[str, float]:
    """ZSL T1 and GZSL S/U/H of classifiers trained on synthetic unseen (+ real seen) features."""
    model.eval()
    device = next(model.parameters()).device
    seen, unseen = task.seen_classes.tolist(), task.unseen_classes.tolist()
    g_cpu = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    t0 = time.perf_counter()
    syn_x, syn_y = model.synthesize(task.attributes[task.num_seen:], config["syn_num"], generator=noise_gen,
                                    compute_dtype=DTYPES[config["synthesis_dtype"]])
    synthesis_s = time.perf_counter() - t0
    syn_y = syn_y.to(device) + task.num_seen
    feats = lambda x: model.discriminative_features(x.to(device))  # noqa: E731
    syn_f, seen_f = feats(syn_x), feats(task.train_features)
    test_seen_f, test_unseen_f = feats(task.test_seen_features), feats(task.test_unseen_features)
    test_f = torch.cat([test_seen_f, test_unseen_f])
    test_y = torch.cat([task.test_seen_labels, task.test_unseen_labels])
    batch = config["classifier_batch_size"] or config["syn_num"]
    common = dict(lr=config["classifier_lr"], epochs=config["classifier_epochs"], batch_size=batch,
                  generator=g_cpu)

    def gzsl_metrics(clf):
        logits = _logits(clf, test_f)
        if config["calibration"]:
            logits[:, :task.num_seen] -= config["calibration"]
        acc = gzsl_accuracy(logits.cpu(), test_y, seen_classes=seen, unseen_classes=unseen)
        return float(acc.h), {"S": float(acc.seen), "U": float(acc.unseen), "H": float(acc.h)}

    def zsl_metrics(clf):
        acc = float(zsl_accuracy(_logits(clf, test_unseen_f).cpu(), task.test_unseen_labels - task.num_seen,
                                 unseen_classes=list(range(task.num_unseen))))
        return acc, {"T1": acc}

    x = torch.cat([seen_f, syn_f])
    y = torch.cat([task.train_labels.to(device), syn_y])
    if best_on_test:
        out = fit_softmax(x, y, task.num_classes, evaluate=gzsl_metrics, **common)
        out.update(fit_softmax(syn_f, syn_y - task.num_seen, task.num_unseen, evaluate=zsl_metrics, **common))
    else:
        out = gzsl_metrics(fit_softmax(x, y, task.num_classes, **common))[1]
        out.update(zsl_metrics(fit_softmax(syn_f, syn_y - task.num_seen, task.num_unseen, **common))[1])
    out["synthesis_s"] = synthesis_s
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------- training

def pretrain_classifier(task: GZSLTask, config: Dict, device) -> nn.Module:
    """f-CLSWGAN's frozen classifier on real seen features (Adam 1e-3, beta1 0.5, 50 epochs, batch 100)."""
    g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
    clf = fit_softmax(task.train_features.to(device), task.train_labels.to(device), task.num_seen,
                      lr=config["pretrain_lr"], epochs=config["pretrain_epochs"],
                      batch_size=config["pretrain_batch_size"], generator=g)
    return nn.Sequential(clf, nn.LogSoftmax(dim=1)).requires_grad_(False)


class Stage:
    """One model trained on one task: the model, its trainer and the batch sampler over the task's seen features."""

    def __init__(self, method: str, task: GZSLTask, config: Dict):
        self.task, self.config = task, config
        device = torch.device(config["device"])
        self.features = task.train_features.to(device)
        self.labels = task.train_labels.to(device)
        self.attributes = task.attributes.to(device)
        self.model = TFVAEGAN(gan_config(method, task, config)).to(device)
        pre = pretrain_classifier(task, config, device) if method == "clswgan" else None
        self.trainer = GANTrainer(self.model, pre, backend=config["backend"] if config["backend"] != "auto" else None)

    def sample(self) -> Tuple[Tensor, Tensor, Tensor]:
        """A fresh random batch of seen features each call, as published (``next_seen_batch``)."""
        idx = torch.randperm(self.features.shape[0])[:self.config["batch_size"]].to(self.features.device)
        y = self.labels[idx]
        return self.features[idx], self.attributes[y], y

    def train_epoch(self, epoch: int, desc: str) -> Dict[str, float]:
        c = self.model.config
        steps = math.ceil(self.features.shape[0] / self.config["batch_size"])
        sums: Dict[str, float] = {}
        bar = progress(range(c.feedback_loop * steps), disable=self.config["no_progress"], desc=desc, leave=False)
        for i in bar:
            losses = self.trainer.generator_step(self.sample, i // steps)
            for key in ("d_cost", "g_cost", "wasserstein", "vae", "recons", "cls"):
                sums[key] = sums.get(key, 0.0) + getattr(losses, key)
        n = c.feedback_loop * steps
        return {**{f"loss/{k}": v / n for k, v in sums.items()}, "lambda1": self.trainer.lambda1}

    def state_dict(self) -> Dict:
        return {"model": self.model.state_dict(), "trainer": self.trainer.state_dict(),
                "pretrained": self.trainer.pretrained_classifier.state_dict()
                if self.trainer.pretrained_classifier is not None else None}

    def load_state_dict(self, state: Dict) -> None:
        self.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])
        if state["pretrained"] is not None:
            self.trainer.pretrained_classifier.load_state_dict(state["pretrained"])


def _eval_generator(seed: int, stage: str, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + (0 if stage == "test" else 500_000) + epoch)


def run_seed(method: str, config: Dict, resume: Optional[str], cli: Dict) -> Dict[str, float]:
    """One seed: the stages its selection needs, a CSV row and a checkpoint per epoch, the selected metrics."""
    load = lambda c: load_dataset(c["dataset"], c["data_root"], class_embedding=c["class_embedding"])  # noqa: E731
    data = None if resume else load(config)  # a missing dataset fails before a run folder is made
    run = Run(config, method, resume=resume, cli_overrides=cli)
    config = run.config
    data = data if data is not None else load(config)
    selection, seed, epochs = config["selection"], config["seed"], config["epochs"]
    selector = Selector(selection)
    state = run.load_checkpoint() if resume else None
    stage_name, start, val_best = "val" if selection == "val" else "test", 0, None
    if state is not None:
        stage_name, start, val_best = state["stage"], state["epoch"], state.get("val_best")
        selector.load_state_dict(state["selector"])
        print(f"resuming {run.dir} at stage {stage_name!r} after epoch {start}")
    else:
        print(f"run folder: {run.dir}")
    best_metrics = state.get("best_metrics") if state else None
    zsl_best = state.get("zsl_best") if state else None

    while True:
        task = data.validation_task(config["split_seed"]) if stage_name == "val" else data.test_task()
        stage_epochs = epochs if stage_name == "val" or selection != "val" else val_best
        seed_everything(seed)
        stage = Stage(method, task, config)
        if state is not None and state["stage"] == stage_name:
            stage.load_state_dict(state["stage_state"])
            set_rng_state(state["rng"])
        else:
            start = 0
        offset = epochs if stage_name == "test" and selection == "val" else 0  # log epochs count across stages
        if state is not None:
            run.truncate_log(offset + start)
        for epoch in range(start + 1, stage_epochs + 1):
            t0 = time.perf_counter()
            row = {"stage": stage_name, "epoch": offset + epoch, "stage_epoch": epoch,
                   **stage.train_epoch(epoch, f"{method} {stage_name} epoch {epoch}/{stage_epochs}")}
            row["train_s"] = time.perf_counter() - t0
            last = epoch == stage_epochs
            evaluate_now = (stage_name == "val" or selection == "parity" or last
                            or epoch % config["eval_every"] == 0)
            metrics = dict.fromkeys(METRICS, "")
            is_best = False
            if evaluate_now:
                metrics = evaluate(stage.model, task, config, _eval_generator(seed, stage_name, epoch),
                                   best_on_test=selection == "parity")
                if stage_name == "val":
                    selector.update(epoch, metrics["H"], None)
                    val_best = selector.best_epoch
                elif selection == "parity":
                    is_best = selector.update(epoch, None, metrics["H"])
                    zsl_best = max(zsl_best or 0.0, metrics["T1"])
                elif last:
                    is_best = True
                    if selection == "last":
                        selector.update(epoch, None, None)
                if is_best:
                    best_metrics = dict(metrics)
                print(f"{stage_name} epoch {epoch}: " + " ".join(
                    f"{k}={100 * metrics[k]:.2f}" for k in ("T1", "S", "U", "H")), flush=True)
            run.log({**row, **metrics})
            run.save_checkpoint({"stage": stage_name, "epoch": epoch, "stage_state": stage.state_dict(),
                                 "selector": selector.state_dict(), "rng": rng_state(), "val_best": val_best,
                                 "best_metrics": best_metrics, "zsl_best": zsl_best, "config": config},
                                best=is_best)
            state = None
        if stage_name == "val":
            print(f"validation: best H at epoch {val_best}; training on trainval for {val_best} epochs")
            stage_name, state, start = "test", None, 0
            continue
        break

    results = dict(best_metrics)
    if selection == "parity":
        results["T1"] = zsl_best  # the published code keeps the best ZSL accuracy of any epoch, separately
    description = (f"validation H chose epoch {val_best}; trained on trainval for {val_best} epochs"
                   if selection == "val" else selector.describe())
    results["selected_epoch"] = val_best if selection == "val" else selector.best_epoch
    results["model_selection"] = description
    if run.is_main:
        _print_result(method, config, results, description)
        run.save_results(results)
    run.close()
    return results


def _print_result(method: str, config: Dict, r: Dict, description: str) -> None:
    print(f"\n{method} on {config['dataset']} (seed {config['seed']}): {description}")
    print(f"  ZSL T1 {100 * r['T1']:.2f}   GZSL S {100 * r['S']:.2f}  U {100 * r['U']:.2f}  H {100 * r['H']:.2f}")


def main(args: argparse.Namespace, method: str = "tfvaegan") -> Dict[str, float]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{method} trains in one process (4096-wide MLPs on at most ~40k features; data parallelism "
                         f"does not pay): run seeds or datasets as separate processes instead of under torchrun "
                         f"(WORLD_SIZE={os.environ['WORLD_SIZE']})")
    config = _config(args, method)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    cli = vars(args)
    if args.resume:
        return run_seed(method, config, args.resume, cli)
    seeds = [config["seed"] + i for i in range(config["seeds"])]
    results: List[Dict] = []
    for seed in seeds:
        results.append(run_seed(method, {**config, "seed": seed}, None, {**cli, "seed": seed}))
    if len(seeds) == 1:
        return results[0]
    summary = {}
    how = "epoch chosen on the validation split" if config["selection"] == "val" else results[0]["model_selection"]
    print(f"\n{method} on {config['dataset']}, mean ± std over {len(seeds)} seeds {seeds} ({how}):")
    for key in ("T1", "S", "U", "H"):
        values = [100 * r[key] for r in results]
        summary[key], summary[f"{key}_std"] = statistics.mean(values) / 100, statistics.stdev(values) / 100
        print(f"  {key:>2}: {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
    summary["per_seed"] = results
    return summary
