"""``python -m pyzsl.train lesa`` end to end on small synthetic data: learning, resume after a kill, torchrun DDP."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pyzsl.train.__main__ import main

TINY = {"dataset_options": {"num_train": 300, "num_val": 100, "num_test": 200, "num_seen": 20, "num_unseen": 6},
        "hidden_dim": 16, "heads": 4}


def tiny_config(tmp_path: Path, **extra) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **extra}))
    return str(path)


def only_run(out: Path) -> Path:
    runs = list(out.iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_synthetic_training_learns_far_above_chance(tmp_path):
    out = tmp_path / "runs"
    results = main(["lesa", "--config", tiny_config(tmp_path), "--epochs", "3", "--out", str(out), "--no-progress"])
    run = only_run(out)
    assert {"config.yaml", "log.csv", "last.pt", "best.pt", "results.json"} <= {p.name for p in run.iterdir()}
    assert len((run / "log.csv").read_text().strip().splitlines()) == 1 + 3
    saved = json.loads((run / "results.json").read_text())
    assert saved["zsl/mAP"] == pytest.approx(results["zsl/mAP"])
    assert "validation split" in saved["selection"]
    for task in ("zsl", "gzsl"):
        assert results[f"{task}/mAP"] > 1.5 * results[f"chance/{task}/mAP"], results


def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path):
    config = tiny_config(tmp_path, epochs=3)
    main(["lesa", "--config", config, "--out", str(tmp_path / "whole"), "--no-progress"])
    expected = torch.load(only_run(tmp_path / "whole") / "last.pt", weights_only=False)

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "pyzsl.train", "lesa", "--config", config, "--out", str(out),
                                "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    killed_after = None
    while time.time() < deadline and process.poll() is None:
        checkpoints = list(out.glob("*/last.pt"))
        if checkpoints:
            try:
                killed_after = torch.load(checkpoints[0], weights_only=False)["epoch"]
            except Exception:  # noqa: BLE001  (renamed into place between glob and load)
                continue
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert killed_after is not None and killed_after < 3, "the run was not killed mid-way"
    run = only_run(out)
    main(["lesa", "--resume", str(run), "--no-progress"])
    resumed = torch.load(run / "last.pt", weights_only=False)
    assert resumed["epoch"] == 3
    for name, value in expected["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    assert resumed["schedule"] == expected["schedule"]
    assert len((run / "log.csv").read_text().strip().splitlines()) == 1 + 3


def test_resume_refuses_a_changed_configuration(tmp_path):
    out = tmp_path / "runs"
    main(["lesa", "--config", tiny_config(tmp_path), "--epochs", "1", "--out", str(out), "--no-progress"])
    with pytest.raises(ValueError, match="only .* may change"):
        main(["lesa", "--resume", str(only_run(out)), "--lr", "0.5"])
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        main(["lesa", "--resume", str(tmp_path)])


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tmp_path):
    config = tiny_config(tmp_path, epochs=2)
    single = main(["lesa", "--config", config, "--out", str(tmp_path / "one"), "--no-progress"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "pyzsl.train", "lesa", "--config", config, "--out", str(tmp_path / "two"), "--no-progress"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    run = only_run(tmp_path / "two")
    two = json.loads((run / "results.json").read_text())
    for key, value in single.items():
        assert two[key] == pytest.approx(value, abs=1e-6), key
    one_weights = torch.load(only_run(tmp_path / "one") / "last.pt", weights_only=False)["model"]
    two_weights = torch.load(run / "last.pt", weights_only=False)["model"]
    for name, value in one_weights.items():
        torch.testing.assert_close(two_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_cli_rejects_bad_options(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "pyzsl.train", "lesa", *args], capture_output=True, text=True)

    result = run("--dataset", "imagenet")
    assert result.returncode == 2 and "--dataset" in result.stderr and "synthetic" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    result = run("--config", str(bad))
    assert result.returncode == 2 and "unknown options ['learning_rate']" in result.stderr


def test_trains_on_nus_wide_label_sets_from_feature_stores(tmp_path, data_root):
    """The real NUS-WIDE label sets and GloVe vectors with small random feature stores: 925 / 81 / 1,006 labels."""
    from pyzsl.data.multilabel import nus_wide_labels
    from pyzsl.data.store import write_store

    seen, unseen, _, _ = nus_wide_labels(data_root)
    g = torch.Generator().manual_seed(0)

    def store(path, rows, names):
        labels = torch.randint(-1, 2, (rows, len(names)), generator=g, dtype=torch.int8)
        write_store(path, torch.rand(rows, 4, 8, generator=g), labels, names, [f"img{i}" for i in range(rows)])

    store(tmp_path / "train.h5", 48, seen)
    store(tmp_path / "test.h5", 24, unseen + seen)
    config = tiny_config(tmp_path, dataset_options={"features_dir": str(tmp_path), "val_rows": 16})
    results = main(["lesa", "--dataset", "nus-wide", "--data-root", str(data_root), "--config", config,
                    "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "runs"), "--no-progress"])
    run = only_run(tmp_path / "runs")
    assert {"zsl/mAP", "gzsl/mAP", "zsl/F1@3", "gzsl/F1@5"} <= set(results)
    assert yaml.safe_load((run / "config.yaml").read_text())["patience"] == 5  # the NUS-WIDE preset
    checkpoint = torch.load(run / "last.pt", weights_only=False)
    assert checkpoint["model"]["seen_vectors"].shape == (925, 300)
    assert checkpoint["model"]["unseen_vectors"].shape == (81, 300)
