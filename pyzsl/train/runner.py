"""What every pyzsl trainer shares: flags and config resolution, the run folder, CSV/TensorBoard logging, atomic
checkpoints and exact resume, seeding, progress bars, model selection and torch.distributed set-up.

A run folder holds ``config.yaml`` (the resolved configuration), ``log.csv`` (one row per epoch), ``last.pt`` (the
newest checkpoint) and ``best.pt`` (the selected model) and, at the end, ``results.json``. Checkpoints are written to a temporary file and renamed, so a
kill during a save leaves the previous checkpoint intact.
"""
import argparse
import csv
import datetime
import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

SELECTIONS = ("val", "last", "parity")
# Flags a resumed run may change; everything else must come from the run's own config.yaml.
RESUMABLE_OVERRIDES = ("epochs", "no_progress", "num_workers", "threads")
# Command-line entries that are not options of the run itself.
NOT_OPTIONS = ("config", "resume", "method")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every method takes. They default to None so the method's defaults and ``--config`` can fill them."""
    parser.add_argument("--dataset", help="dataset name (see the method's --help for the choices)")
    parser.add_argument("--data-root", help="folder holding the dataset files (default: $PYZSL_DATA)")
    parser.add_argument("--config", help="YAML file of option values; flags on the command line win over it")
    parser.add_argument("--out", help="folder in which run folders are created (default: runs)")
    parser.add_argument("--seed", type=int, help="random seed; CPU runs with the same seed are identical (default 0)")
    parser.add_argument("--epochs", type=int, help="number of training epochs")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--selection", choices=SELECTIONS,
                        help="model selection: val (best epoch on the validation split, the default), last "
                             "(the final epoch), or parity (best epoch on the TEST split, as some published code "
                             "does; only for reproducing published numbers)")
    parser.add_argument("--backend", help="kernel backend for pyzsl ops: auto, reference, cpp, triton, cuda")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    parser.add_argument("--no-progress", action="store_true", default=None, help="hide the progress bars")


COMMON_DEFAULTS = {
    "out": "runs", "seed": 0, "selection": "val", "backend": "auto", "num_workers": 0, "no_progress": False,
    "data_root": None, "device": None,
}


def resolve_config(args: argparse.Namespace, defaults: Dict[str, Any]) -> Dict[str, Any]:
    """The run's configuration: ``defaults`` < the ``--config`` YAML file < flags given on the command line."""
    config = {**COMMON_DEFAULTS, **defaults}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - set(config) - set(vars(args)))
        if unknown:
            raise ValueError(f"--config {path}: unknown options {unknown}; known: {sorted(set(config) | set(vars(args)))}")
        config.update(loaded)
    for key, value in vars(args).items():
        if value is not None and key not in NOT_OPTIONS:
            config[key] = value
    if config.get("device") is None:
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if config["selection"] not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {config['selection']!r}")
    return config


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Run:
    """One run folder: its configuration, epoch log and checkpoints. Only rank 0 writes."""

    def __init__(self, config: Dict[str, Any], method: str, resume: Optional[str] = None,
                 cli_overrides: Optional[Dict[str, Any]] = None):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.is_main = rank == 0
        if resume:
            self.dir = Path(resume)
            saved = self.dir / "config.yaml"
            if not saved.is_file():
                raise FileNotFoundError(f"--resume {self.dir}: not a run folder (no config.yaml)")
            stored = yaml.safe_load(saved.read_text())
            if stored.get("method") != method:
                raise ValueError(f"--resume {self.dir}: that run is method {stored.get('method')!r}, not {method!r}")
            overrides = {k: v for k, v in (cli_overrides or {}).items() if v is not None and k not in NOT_OPTIONS}
            changed = {k: v for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and stored.get(k) != v}
            if changed:
                raise ValueError(f"--resume continues the run as configured in {saved}; only "
                                 f"{list(RESUMABLE_OVERRIDES)} may change, but these differ: {changed}")
            stored.update({k: v for k, v in overrides.items() if k in RESUMABLE_OVERRIDES})
            self.config = stored
        else:
            self.config = {**config, "method": method}
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            name = f"{method}-{self.config.get('dataset')}-s{self.config.get('seed')}-{stamp}"
            self.dir = Path(self.config["out"]) / name
            if dist.is_available() and dist.is_initialized():  # every rank must agree on the folder
                holder = [str(self.dir)]
                dist.broadcast_object_list(holder, src=0)
                self.dir = Path(holder[0])
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=True))
        self._tensorboard = None

    @property
    def log_path(self) -> Path:
        return self.dir / "log.csv"

    def log(self, row: Dict[str, Any]) -> None:
        """Append one row to log.csv (the header comes from the first row) and to TensorBoard when installed."""
        if not self.is_main:
            return
        new = not self.log_path.exists()
        with open(self.log_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        writer = self._tensorboard_writer()
        if writer is not None:
            step = int(row.get("epoch", 0))
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    writer.add_scalar(key, value, step)
            writer.flush()

    def _tensorboard_writer(self):
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                self._tensorboard = False
            else:
                self._tensorboard = SummaryWriter(str(self.dir / "tensorboard"))
        return self._tensorboard or None

    def truncate_log(self, epochs_done: int) -> None:
        """On resume, drop log rows of epochs after the checkpoint (a kill can land between log and save)."""
        if not self.is_main or not self.log_path.exists():
            return
        with open(self.log_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [r for r in rows if int(r["epoch"]) <= epochs_done]
        if len(kept) == len(rows):
            return
        tmp = self.log_path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.log_path)

    def save_results(self, results: Dict[str, Any]) -> None:
        """The final metrics as ``results.json``."""
        if self.is_main:
            tmp = self.dir / ".results.json.tmp"
            tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
            os.replace(tmp, self.dir / "results.json")

    def save_checkpoint(self, state: Dict[str, Any], best: bool = False) -> None:
        """Atomically write ``last.pt`` (and ``best.pt`` when ``best``)."""
        if not self.is_main:
            return
        atomic_torch_save(state, self.dir / "last.pt")
        if best:
            atomic_torch_save(state, self.dir / "best.pt")

    def load_checkpoint(self, which: str = "last") -> Optional[Dict[str, Any]]:
        path = self.dir / f"{which}.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels (CPU runs then repeat exactly)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def progress(iterable: Iterable, disable: bool = False, **tqdm_kwargs):
    """A tqdm bar on the main process; silent elsewhere and when ``disable``."""
    return tqdm(iterable, disable=disable or not is_main_process(), dynamic_ncols=True, **tqdm_kwargs)


class Selector:
    """Keeps the best epoch by the rule of ``--selection``: val (validation score), last, or parity (test score)."""

    def __init__(self, mode: str, higher_is_better: bool = True):
        if mode not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {mode!r}")
        self.mode = mode
        self.sign = 1.0 if higher_is_better else -1.0
        self.best_epoch = -1
        self.best_score = None

    def update(self, epoch: int, val_score: Optional[float], test_score: Optional[float]) -> bool:
        """Record an epoch's scores; True when it becomes the selected epoch."""
        if self.mode == "last":
            score = float(epoch)
        else:
            score = val_score if self.mode == "val" else test_score
            if score is None:
                raise ValueError(f"selection {self.mode!r} needs a {'validation' if self.mode == 'val' else 'test'} "
                                 f"score at epoch {epoch}")
            score = self.sign * float(score)
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            return True
        return False

    def state_dict(self) -> Dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_score": self.best_score}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best_epoch, self.best_score = state["best_epoch"], state["best_score"]

    def describe(self) -> str:
        if self.mode == "val":
            return f"selected epoch {self.best_epoch} on the validation split"
        if self.mode == "last":
            return f"selected the last epoch ({self.best_epoch})"
        return (f"selected epoch {self.best_epoch} on the TEST split (--selection parity, as the published code "
                f"does); these numbers are optimistic and not a fair held-out estimate")


def init_distributed(device: str = "cpu") -> Tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); (rank, world_size), (0, 1) without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
