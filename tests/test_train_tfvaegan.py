"""``python -m pyzsl.train tfvaegan|clswgan`` on synthetic-gzsl: quality, reproducibility, exact resume, selection
modes and seeds."""
import csv
import json

import pytest
import torch

from pyzsl.train.__main__ import main
from pyzsl.train import tfvaegan as trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest

# Tiny layers and big batches keep these runs to seconds; the preset (256-wide) is used for the quality test.
TINY = ["--hidden", "64", "--critic-hidden", "64", "--batch-size", "128", "--syn-num", "40", "--classifier-epochs", "5",
        "--no-progress"]


def run_dirs(out):
    return sorted(p for p in out.iterdir() if p.is_dir())


def final_weights(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=False)["stage_state"]["model"]


@pytest.mark.slow
def test_short_training_reaches_h_far_above_chance(tmp_path):
    result = main(["tfvaegan", "--dataset", "synthetic-gzsl", "--selection", "last", "--epochs", "5",
                   "--out", str(tmp_path), "--no-progress"])
    # 48 seen + 12 unseen classes: chance is about 1/60 per class for S and U (H ~ 0.017), 1/12 for ZSL T1.
    assert result["H"] > 0.3 and result["U"] > 0.2, result
    assert result["T1"] > 0.4, result
    (run_dir,) = run_dirs(tmp_path)
    rows = list(csv.DictReader(open(run_dir / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "results.json").read_text())["H"] == result["H"]


@pytest.mark.slow
def test_same_seed_same_run(tmp_path):
    args = ["tfvaegan", "--selection", "last", "--epochs", "1", *TINY]
    a = main(args + ["--out", str(tmp_path / "a")])
    b = main(args + ["--out", str(tmp_path / "b")])
    assert {k: a[k] for k in ("T1", "S", "U", "H")} == {k: b[k] for k in ("T1", "S", "U", "H")}
    wa, wb = final_weights(run_dirs(tmp_path / "a")[0]), final_weights(run_dirs(tmp_path / "b")[0])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = main(args + ["--out", str(tmp_path / "c"), "--seed", "1"])
    assert not all(torch.equal(wa[k], final_weights(run_dirs(tmp_path / "c")[0])[k]) for k in wa)
    assert c["H"] >= 0


def test_training_does_not_depend_on_how_often_it_evaluates(tmp_path):
    args = ["tfvaegan", "--selection", "last", "--epochs", "2", *TINY]
    main(args + ["--out", str(tmp_path / "every"), "--eval-every", "1"])
    main(args + ["--out", str(tmp_path / "end"), "--eval-every", "2"])
    wa, wb = final_weights(run_dirs(tmp_path / "every")[0]), final_weights(run_dirs(tmp_path / "end")[0])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    """--selection val runs a validation stage then a test stage; an interruption inside the validation stage,
    then --resume, must give the same final weights and results as a run that was never interrupted."""
    args = ["tfvaegan", "--selection", "val", "--epochs", "3", *TINY]
    full = main(args + ["--out", str(tmp_path / "full")])
    original = trainer.Stage.train_epoch
    calls = {"n": 0}

    def interrupted(self, epoch, desc):
        calls["n"] += 1
        if calls["n"] == 3:  # after two validation epochs were checkpointed
            raise KeyboardInterrupt("simulated kill")
        return original(self, epoch, desc)

    monkeypatch.setattr(trainer.Stage, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(trainer.Stage, "train_epoch", original)
    (cut_dir,) = run_dirs(tmp_path / "cut")
    assert torch.load(cut_dir / "last.pt", weights_only=False)["epoch"] == 2
    resumed = main(["tfvaegan", "--resume", str(cut_dir), "--no-progress"])
    assert {k: resumed[k] for k in ("T1", "S", "U", "H", "selected_epoch")} == \
        {k: full[k] for k in ("T1", "S", "U", "H", "selected_epoch")}
    w_full, w_cut = final_weights(run_dirs(tmp_path / "full")[0]), final_weights(cut_dir)
    for key in w_full:
        assert torch.equal(w_full[key], w_cut[key]), key
    rows = list(csv.DictReader(open(cut_dir / "log.csv")))
    assert [r["stage"] for r in rows][:3] == ["val"] * 3
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))


def test_resume_may_only_change_epochs(tmp_path):
    main(["tfvaegan", "--selection", "last", "--epochs", "1", *TINY, "--out", str(tmp_path)])
    (run_dir,) = run_dirs(tmp_path)
    with pytest.raises(ValueError, match="only .* may change"):
        main(["tfvaegan", "--resume", str(run_dir), "--lr", "0.5"])


@pytest.mark.slow
def test_parity_says_it_selects_on_the_test_set(tmp_path, capsys):
    result = main(["tfvaegan", "--selection", "parity", "--epochs", "2", *TINY, "--out", str(tmp_path),
                   "--synthesis-dtype", "bf16"])
    out = capsys.readouterr().out
    assert "TEST split" in out and "parity" in result["model_selection"]
    assert 1 <= result["selected_epoch"] <= 2


@pytest.mark.slow
def test_clswgan_seeds_mean_and_std(tmp_path, capsys):
    result = main(["clswgan", "--selection", "last", "--epochs", "1", "--seeds", "2", *TINY,
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "mean ± std over 2 seeds [0, 1]" in out and "±" in out
    assert len(result["per_seed"]) == 2 and len(run_dirs(tmp_path)) == 2
    metrics = [{k: r[k] for k in ("T1", "S", "U", "H")} for r in result["per_seed"]]
    assert metrics[0] != metrics[1]  # different seeds, different runs
    assert result["H_std"] >= 0


def test_bad_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="--dataset must be one of"):
        main(["tfvaegan", "--dataset", "imagenet", "--out", str(tmp_path)])


def test_calibrated_stacking_moves_predictions_to_unseen_classes():
    from pyzsl.data.xlsa17 import make_synthetic_gzsl
    from pyzsl.train.presets.gzsl import preset
    config = {**preset("tfvaegan", "synthetic-gzsl"), "hidden": 32, "critic_hidden": 32, "encoder_hidden": 32,
              "syn_num": 20, "classifier_epochs": 2, "device": "cpu", "backend": "auto", "no_progress": True}
    task = make_synthetic_gzsl().test_task()
    torch.manual_seed(0)
    stage = trainer.Stage("tfvaegan", task, config)
    plain = trainer.evaluate(stage.model, task, config, torch.Generator().manual_seed(1), best_on_test=False)
    shifted = trainer.evaluate(stage.model, task, {**config, "calibration": 1e4}, torch.Generator().manual_seed(1),
                               best_on_test=False)
    assert plain["S"] > 0.5  # real seen features are easy to classify
    assert shifted["S"] == 0.0 and shifted["U"] >= plain["U"]  # every sample now goes to an unseen class
    assert shifted["T1"] == plain["T1"]  # ZSL has no seen classes to calibrate


def test_generic_hdf5_dataset_from_the_command_line(tmp_path):
    from pyzsl.data.xlsa17 import make_synthetic_gzsl, save_hdf5
    save_hdf5(make_synthetic_gzsl(num_seen=12, num_unseen=4, train_per_class=20), tmp_path / "mine.h5")
    result = main(["tfvaegan", "--dataset", str(tmp_path / "mine.h5"), "--selection", "val", "--epochs", "1", *TINY,
                   "--out", str(tmp_path / "runs")])
    assert 0.0 <= result["H"] <= 1.0 and result["selected_epoch"] == 1
