"""pyzsl.models.tfvaegan: the fast generator step against the published loop, synthesis, losses, configuration."""
import copy

import pytest
import torch
import torch.nn.functional as F

from pyzsl.models.tfvaegan import (GANConfig, GANTrainer, PublishedLoop, TFVAEGAN, clswgan_config, vae_loss,
                                   weighted_l1)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest

SMALL = dict(hidden=32, critic_hidden=24, encoder_hidden=28, batch_size=16)
CONFIGS = {
    "tfvaegan": lambda: GANConfig(40, 12, **SMALL),
    "flo-prior-noise": lambda: GANConfig(40, 12, encoded_noise=False, a1=0.5, **SMALL),
    "awa2-frozen-decoder": lambda: GANConfig(40, 12, freeze_dec=True, recons_weight=0.1, a1=0.01, **SMALL),
    "clswgan": lambda: clswgan_config(40, 12, hidden=32, critic_hidden=24, batch_size=16),
}



@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def problem(config: GANConfig, dtype, n=90, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, config.feature_dim, generator=g, dtype=dtype)
    att = F.normalize(torch.rand(classes, config.attribute_dim, generator=g, dtype=dtype), dim=1)
    y = torch.randint(classes, (n,), generator=g)

    def sample():
        idx = torch.randperm(n)[:config.batch_size]
        return x[idx], att[y[idx]], y[idx]
    pre = None
    if config.cls_weight > 0:
        pre = torch.nn.Sequential(torch.nn.Linear(config.feature_dim, classes), torch.nn.LogSoftmax(1)).to(dtype)
    return sample, pre


def train(step_cls, model, sample, pre, steps, seed=1):
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    step = step_cls(model, copy.deepcopy(pre)) if pre is not None else step_cls(model)
    losses = []
    for _ in range(steps):
        for loop in range(model.config.feedback_loop):
            out = step.generator_step(sample, loop)
            losses.append([out.d_cost, out.wasserstein, out.g_cost, out.vae, out.recons, out.cls, out.lambda1])
    return torch.tensor(losses, dtype=torch.float64), model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_equals_published_loop_float64(name, float64_default):
    """The closed-form critic gradient, fused products and skipped passes compute the published step exactly."""
    config = CONFIGS[name]()
    torch.manual_seed(0)
    model = TFVAEGAN(config).double()
    sample, pre = problem(config, torch.float64)
    mine, m1 = train(GANTrainer, model, sample, pre, steps=3)
    ref, m2 = train(PublishedLoop, model, sample, pre, steps=3)
    torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)
    for key, value in m2.state_dict().items():
        torch.testing.assert_close(m1.state_dict()[key], value, rtol=1e-9, atol=1e-12, msg=key)
    if config.adaptive_lambda:
        assert len(set(ref[:, -1].tolist())) > 1  # the adaptive lambda moved, identically in both


def test_step_close_to_published_loop_float32():
    config = CONFIGS["tfvaegan"]()
    torch.manual_seed(0)
    model = TFVAEGAN(config)
    sample, _ = problem(config, torch.float32)
    mine, _ = train(GANTrainer, model, sample, None, steps=2)
    ref, _ = train(PublishedLoop, model, sample, None, steps=2)
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


def test_step_is_reproducible_and_changes_every_trained_module():
    config = CONFIGS["tfvaegan"]()
    torch.manual_seed(0)
    model = TFVAEGAN(config)
    sample, _ = problem(config, torch.float32)
    a, m1 = train(GANTrainer, model, sample, None, steps=1)
    b, m2 = train(GANTrainer, model, sample, None, steps=1)
    assert torch.equal(a, b)
    before = model.state_dict()
    for key, value in m1.state_dict().items():
        assert torch.equal(value, m2.state_dict()[key])
        if key != "critic.fc2.bias":  # its gradient is -gD/B*B + gD/B*B = 0 exactly, as published
            assert not torch.equal(value, before[key]), f"{key} was not trained"


def test_synthesize_batches_every_class_through_the_feedback_path():
    config = GANConfig(20, 6, hidden=16, critic_hidden=8, encoder_hidden=8, a2=0.7)
    torch.manual_seed(0)
    model = TFVAEGAN(config)
    att = F.normalize(torch.rand(4, 6), dim=1)
    feats, labels = model.synthesize(att, 5, generator=torch.Generator().manual_seed(3))
    assert feats.shape == (20, 20) and torch.equal(labels, torch.arange(4).repeat_interleave(5))
    # the published per-class path: G(z, a), decoder hidden, G(z, a, a2 * F(hidden))
    z = torch.randn(20, 6, generator=torch.Generator().manual_seed(3))
    a = att.repeat_interleave(5, dim=0)
    g = model.generator
    _, hidden = model.decoder(g(z, a))
    expected = g(z, a, 0.7 * model.feedback(hidden))
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    again, _ = model.synthesize(att, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(feats, again)


def test_synthesize_bad_attributes():
    model = TFVAEGAN(GANConfig(20, 6, hidden=16, critic_hidden=8, encoder_hidden=8))
    with pytest.raises(ValueError, match=r"attributes must be \[K, 6\], got \[4, 5\]"):
        model.synthesize(torch.rand(4, 5), 3)
    clswgan = TFVAEGAN(clswgan_config(20, 6, hidden=16, critic_hidden=8))
    with pytest.raises(ValueError, match="compute_dtype"):
        clswgan.synthesize(torch.rand(4, 6), 3, compute_dtype=torch.bfloat16)


def test_discriminative_features():
    config = GANConfig(20, 6, hidden=16, critic_hidden=8, encoder_hidden=8)
    model = TFVAEGAN(config)
    x = torch.rand(7, 20)
    out = model.discriminative_features(x, batch_size=3)
    assert out.shape == (7, 20 + 6 + 16)
    dec, hidden = model.decoder(x)
    torch.testing.assert_close(out, torch.cat([x, dec, hidden], 1))
    torch.testing.assert_close(dec.norm(dim=1), torch.ones(7))
    clswgan = TFVAEGAN(clswgan_config(20, 6, hidden=16, critic_hidden=8))
    assert torch.equal(clswgan.discriminative_features(x), x)


def test_losses_match_their_formulas():
    torch.manual_seed(0)
    pred, gt = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    d = pred - gt
    expected = (d.abs().pow(3).sum(1) / d.norm(dim=1)).mean()
    torch.testing.assert_close(weighted_l1(pred, gt), expected)
    x, recon = torch.rand(5, 4, dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64)
    mean, log_var = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    bce = -(x * torch.log(recon + 1e-12) + (1 - x) * torch.log(1 - recon - 1e-12)).sum() / 5
    kld = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum() / 5
    torch.testing.assert_close(vae_loss(recon, x, mean, log_var), bce + kld, rtol=1e-6, atol=1e-8)


def test_architecture_follows_the_published_sizes():
    model = TFVAEGAN(GANConfig(2048, 312))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("weight")}
    assert shapes == {
        "encoder.fc1.weight": (4096, 2360), "encoder.fc3.weight": (624, 4096),
        "encoder.linear_means.weight": (312, 624), "encoder.linear_log_var.weight": (312, 624),
        "generator.fc1.weight": (4096, 624), "generator.fc3.weight": (2048, 4096),
        "critic.fc1.weight": (4096, 2360), "critic.fc2.weight": (1, 4096),
        "feedback.fc1.weight": (4096, 4096), "feedback.fc2.weight": (4096, 4096),
        "decoder.fc1.weight": (4096, 2048), "decoder.fc3.weight": (312, 4096),
    }
    clswgan = TFVAEGAN(clswgan_config(2048, 312))
    assert clswgan.encoder is None and clswgan.feedback is None and clswgan.decoder is None
    assert clswgan.generator.output == "relu" and not clswgan.config.adaptive_lambda


def test_config_errors():
    with pytest.raises(ValueError, match="use_feedback needs use_decoder"):
        GANConfig(8, 4, use_decoder=False)
    with pytest.raises(ValueError, match="generator_output"):
        GANConfig(8, 4, generator_output="tanh")
    with pytest.raises(ValueError, match="critic_iter must be >= 1"):
        GANConfig(8, 4, critic_iter=0)
    with pytest.raises(ValueError, match="needs a pretrained_classifier"):
        GANTrainer(TFVAEGAN(clswgan_config(8, 4, hidden=8, critic_hidden=8)))
