"""TF-VAEGAN and f-CLSWGAN presets per dataset.

TF-VAEGAN: akshitac8/tfvaegan ``scripts/run_*_tfvaegan.py`` (generative-gzsl-methods.md §1.9). f-CLSWGAN: the GZSL
commands of Xian et al.'s release as reproduced in luca-rossi/grabzsl ``scripts/run_clswgan_*_gzsl.py`` (§2);
``awa2`` uses the published AWA (AWA1) settings. Every value here can be overridden by ``--config`` or a flag.
``synthetic-gzsl`` is ours: 256-wide layers so a run takes a few minutes on 2 CPU cores, on one thread (matrices
this small gain nothing from a second thread, and on a busy machine OpenMP barrier waits made the 2-thread run over
10x slower, measured).
"""

# Settings shared by every dataset unless a preset overrides them.
TFVAEGAN_DEFAULTS = {
    "dataset": "synthetic-gzsl", "class_embedding": "att", "batch_size": 64, "critic_iter": 5, "feedback_loop": 2,
    "hidden": 4096, "critic_hidden": 4096, "encoder_hidden": 4096, "lambda1": 10.0, "adaptive_lambda": True,
    "gamma_d": 10.0, "gamma_g": 10.0, "recons_weight": 0.01, "a1": 1.0, "a2": 1.0, "lr": 1e-4, "feed_lr": 1e-5,
    "dec_lr": 1e-4, "encoded_noise": True, "freeze_dec": False, "cls_weight": 0.0, "classifier_lr": 1e-3,
    "classifier_epochs": 25, "classifier_batch_size": None, "syn_num": 300, "epochs": 300, "calibration": 0.0,
    "synthesis_dtype": "fp32", "split_seed": 0, "seeds": 1, "eval_every": 1, "threads": None,
    "pretrain_epochs": 50, "pretrain_batch_size": 100, "pretrain_lr": 1e-3,
}

TFVAEGAN_PRESETS = {
    "cub": {"seed": 3483, "epochs": 300, "syn_num": 300, "lr": 1e-4, "classifier_lr": 1e-3, "gamma_d": 10.0,
            "gamma_g": 10.0, "recons_weight": 0.01, "a1": 1.0, "a2": 1.0, "feed_lr": 1e-5, "dec_lr": 1e-4,
            "encoded_noise": True, "freeze_dec": False},
    "awa2": {"seed": 9182, "epochs": 120, "syn_num": 1800, "lr": 1e-5, "classifier_lr": 1e-3, "gamma_d": 10.0,
             "gamma_g": 10.0, "recons_weight": 0.1, "a1": 0.01, "a2": 0.01, "feed_lr": 1e-4, "dec_lr": 1e-4,
             "encoded_noise": True, "freeze_dec": True},
    "flo": {"seed": 806, "epochs": 500, "syn_num": 1200, "lr": 1e-4, "classifier_lr": 1e-3, "gamma_d": 10.0,
            "gamma_g": 10.0, "recons_weight": 0.01, "a1": 0.5, "a2": 0.5, "feed_lr": 1e-5, "dec_lr": 1e-4,
            "encoded_noise": False, "freeze_dec": False},
    "sun": {"seed": 4115, "epochs": 400, "syn_num": 400, "lr": 1e-3, "classifier_lr": 5e-4, "gamma_d": 1.0,
            "gamma_g": 1.0, "recons_weight": 0.01, "a1": 0.1, "a2": 0.01, "feed_lr": 1e-4, "dec_lr": 1e-4,
            "encoded_noise": True, "freeze_dec": False},
    "synthetic-gzsl": {"seed": 0, "epochs": 10, "syn_num": 100, "hidden": 256, "critic_hidden": 256,
                       "encoder_hidden": 256, "lr": 2e-3, "feed_lr": 2e-4, "dec_lr": 2e-3, "a1": 0.5, "a2": 0.5,
                       "classifier_lr": 1e-3, "classifier_epochs": 25, "threads": 1},
}

# f-CLSWGAN: no encoder, feedback or decoder; fixed lambda = 10; gamma 1; one pass per epoch.
CLSWGAN_OVERRIDES = {"gamma_d": 1.0, "gamma_g": 1.0, "adaptive_lambda": False, "feedback_loop": 1,
                     "encoded_noise": False, "recons_weight": 0.0, "a1": 0.0, "a2": 0.0}
CLSWGAN_PRESETS = {
    "cub": {"seed": 3483, "syn_num": 300, "epochs": 56, "lr": 1e-4, "classifier_lr": 1e-3, "cls_weight": 0.01},
    "flo": {"seed": 806, "syn_num": 1200, "epochs": 80, "lr": 1e-4, "classifier_lr": 1e-3, "cls_weight": 0.1},
    "sun": {"seed": 4115, "syn_num": 400, "epochs": 40, "lr": 2e-4, "classifier_lr": 1e-3, "cls_weight": 0.01},
    "awa2": {"seed": 9182, "syn_num": 1800, "epochs": 30, "lr": 1e-5, "classifier_lr": 1e-3, "cls_weight": 0.01},
    "synthetic-gzsl": {"seed": 0, "epochs": 20, "syn_num": 100, "hidden": 256, "critic_hidden": 256, "lr": 1e-3,
                       "classifier_lr": 1e-3, "cls_weight": 0.1, "threads": 1},
}


def preset(method: str, dataset: str) -> dict:
    """The full default configuration of ``method`` on ``dataset`` (unknown datasets get the shared defaults)."""
    key = dataset.lower()
    if method == "clswgan":
        return {**TFVAEGAN_DEFAULTS, **CLSWGAN_OVERRIDES, **CLSWGAN_PRESETS.get(key, {}), "dataset": dataset}
    return {**TFVAEGAN_DEFAULTS, **TFVAEGAN_PRESETS.get(key, {}), "dataset": dataset}
