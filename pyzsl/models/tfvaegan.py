"""TF-VAEGAN (Narayan et al., ECCV 2020) and f-CLSWGAN (Xian et al., CVPR 2018) as one configurable model.

Layers, losses and the loop order follow the published code (akshitac8/tfvaegan ``networks/TFVAEGAN_model.py`` and
``train_images.py``; /work/shared/reference/generative-gzsl-methods.md §1-2):

- Encoder: [x, a] -> 4096 (LReLU) -> 2 nz (LReLU) -> (mu, logvar), nz = attribute size.
- Generator: [z, a] -> ngh (LReLU) = x1 -> X (sigmoid; ReLU for f-CLSWGAN). With feedback, ``x1 + alpha * F(h)``
  replaces x1, where h is the semantic decoder's hidden activation of the generator's first output (detached).
- Feedback F: ngh -> ngh (LReLU) -> ngh (LReLU).
- Semantic decoder: X -> ngh (LReLU) = hidden -> A, rows L2-normalised.
- Critic: [x, a] -> ndh (LReLU) -> 1, a conditional WGAN-GP critic with the adaptive gradient-penalty weight
  (x1.1 when the mean penalty over a critic block exceeds 1.05, /1.1 below 1.001).
- Losses: VAE (summed BCE + KL, per sample), ``gamma_g * -D(fake)``, ``recons_weight * WeightedL1(Dec(fake), a)``
  with WeightedL1 = sum_j |d_j|^3 / ||d|| per sample; the decoder is also fitted on real features inside the critic
  block. Two passes per epoch: the first without feedback, the second with feedback weight ``a1``; synthesis uses
  ``a2``.
- f-CLSWGAN: no encoder, feedback or decoder, fixed lambda = 10, gamma = 1, ReLU output, one pass per epoch, and
  ``cls_weight * NLL`` of a frozen softmax classifier pretrained on real seen features.

:class:`GANTrainer` runs one generator step (``critic_iter`` critic steps then one generator step) computing exactly
the published quantities with less work: the forward passes whose results are discarded in the published loop
(the critic block's encoder/generator graph, the generator's first hidden layer computed twice, the decoder output
layer on the feedback path) are skipped, the real, fake and interpolated critic rows go through one matrix product,
and the critic's gradient, including the gradient penalty's double backward, is computed in closed form with the
three weight-gradient products fused into one (the critic is linear -> LeakyReLU -> linear, so
``dD/dx = (w2 * lrelu'(pre)) W1x`` and the penalty's gradient follows by the chain rule; the LeakyReLU derivative
is piecewise constant, so the terms autograd adds through it are exactly zero).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import feedback_synthesis

SLOPE = 0.2  # LeakyReLU(0.2) everywhere, as published


def weights_init(module: nn.Module) -> None:
    """N(0, 0.02) weights and zero biases for every Linear layer, as published."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)


@dataclass
class GANConfig:
    """Architecture and optimisation settings (names follow the published flags)."""
    feature_dim: int                  # resSize
    attribute_dim: int                # attSize (= nz, the latent size)
    hidden: int = 4096                # ngh: generator hidden = decoder hidden = feedback width
    critic_hidden: int = 4096         # ndh
    encoder_hidden: int = 4096
    use_encoder: bool = True          # VAE encoder (TF-VAEGAN); False: f-CLSWGAN
    use_feedback: bool = True
    use_decoder: bool = True
    generator_output: str = "sigmoid"  # "relu" for f-CLSWGAN
    a1: float = 1.0                   # feedback weight in training
    a2: float = 1.0                   # feedback weight in synthesis
    gamma_d: float = 10.0
    gamma_g: float = 10.0
    lambda1: float = 10.0             # initial gradient-penalty weight
    adaptive_lambda: bool = True
    recons_weight: float = 0.01
    critic_iter: int = 5
    feedback_loop: int = 2
    encoded_noise: bool = True
    freeze_dec: bool = False
    cls_weight: float = 0.0           # f-CLSWGAN's classification loss weight
    lr: float = 1e-4
    feed_lr: float = 1e-5
    dec_lr: float = 1e-4
    beta1: float = 0.5
    batch_size: int = 64

    def __post_init__(self):
        if self.generator_output not in ("sigmoid", "relu"):
            raise ValueError(f"generator_output must be 'sigmoid' or 'relu', got {self.generator_output!r}")
        if self.use_feedback and not self.use_decoder:
            raise ValueError("use_feedback needs use_decoder: the feedback reads the semantic decoder's hidden layer")
        if self.encoded_noise and not self.use_encoder:
            raise ValueError("encoded_noise needs use_encoder")
        for name in ("feature_dim", "attribute_dim", "hidden", "critic_hidden", "encoder_hidden", "critic_iter",
                     "feedback_loop", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def latent_dim(self) -> int:
        return self.attribute_dim


def clswgan_config(feature_dim: int, attribute_dim: int, **overrides) -> GANConfig:
    """f-CLSWGAN as a configuration of the same code."""
    settings = dict(use_encoder=False, use_feedback=False, use_decoder=False, generator_output="relu",
                    gamma_d=1.0, gamma_g=1.0, lambda1=10.0, adaptive_lambda=False, recons_weight=0.0,
                    feedback_loop=1, encoded_noise=False, cls_weight=0.01, a1=0.0, a2=0.0)
    settings.update(overrides)
    return GANConfig(feature_dim, attribute_dim, **settings)


class Encoder(nn.Module):
    def __init__(self, feature_dim: int, attribute_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(feature_dim + attribute_dim, hidden)
        self.fc3 = nn.Linear(hidden, 2 * attribute_dim)
        self.linear_means = nn.Linear(2 * attribute_dim, attribute_dim)
        self.linear_log_var = nn.Linear(2 * attribute_dim, attribute_dim)

    def forward(self, x: Tensor, a: Tensor) -> Tuple[Tensor, Tensor]:
        h = F.leaky_relu(self.fc1(torch.cat([x, a], 1)), SLOPE)
        h = F.leaky_relu(self.fc3(h), SLOPE)
        return self.linear_means(h), self.linear_log_var(h)


class Generator(nn.Module):
    """[z, a] -> hidden -> features; ``feedback`` (already scaled by alpha) is added to the hidden layer."""

    def __init__(self, latent_dim: int, attribute_dim: int, hidden: int, feature_dim: int, output: str = "sigmoid"):
        super().__init__()
        self.fc1 = nn.Linear(latent_dim + attribute_dim, hidden)
        self.fc3 = nn.Linear(hidden, feature_dim)
        self.output = output

    def hidden(self, z: Tensor, a: Tensor) -> Tensor:
        return F.leaky_relu(self.fc1(torch.cat([z, a], 1)), SLOPE)

    def head(self, x1: Tensor) -> Tensor:
        out = self.fc3(x1)
        return torch.sigmoid(out) if self.output == "sigmoid" else torch.relu(out)

    def forward(self, z: Tensor, a: Tensor, feedback: Optional[Tensor] = None) -> Tensor:
        x1 = self.hidden(z, a)
        return self.head(x1 if feedback is None else x1 + feedback)


class Feedback(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor) -> Tensor:
        return F.leaky_relu(self.fc2(F.leaky_relu(self.fc1(h), SLOPE)), SLOPE)


class SemanticDecoder(nn.Module):
    """Features -> (L2-normalised attributes, hidden activation)."""

    def __init__(self, feature_dim: int, hidden: int, attribute_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(feature_dim, hidden)
        self.fc3 = nn.Linear(hidden, attribute_dim)

    def hidden(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.fc1(x), SLOPE)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        h = self.hidden(x)
        out = self.fc3(h)
        return out / out.pow(2).sum(1, keepdim=True).sqrt(), h


class Critic(nn.Module):
    def __init__(self, feature_dim: int, attribute_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(feature_dim + attribute_dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        return self.fc2(F.leaky_relu(self.fc1(torch.cat([x, a], 1)), SLOPE))


class TFVAEGAN(nn.Module):
    """Encoder, generator, critic, feedback module and semantic decoder (those the configuration uses)."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c.feature_dim, c.attribute_dim, c.encoder_hidden) if c.use_encoder else None
        self.generator = Generator(c.latent_dim, c.attribute_dim, c.hidden, c.feature_dim, c.generator_output)
        self.critic = Critic(c.feature_dim, c.attribute_dim, c.critic_hidden)
        self.feedback = Feedback(c.hidden) if c.use_feedback else None
        self.decoder = SemanticDecoder(c.feature_dim, c.hidden, c.attribute_dim) if c.use_decoder else None
        self.apply(weights_init)

    def generate(self, z: Tensor, a: Tensor, alpha: Optional[float] = None, *, backend: Optional[str] = None,
                 chunk_size: Optional[int] = None, compute_dtype: Optional[torch.dtype] = None) -> Tensor:
        """G(z, a); with ``alpha`` (and a feedback module) the feedback path
        ``G(z, a, alpha * F(Dec.hidden(G(z, a)).detach()))``, differentiable in z, a, G and F as in training."""
        if alpha is None or self.feedback is None:
            return self.generator(z, a)
        g, d, f = self.generator, self.decoder, self.feedback
        return feedback_synthesis(z, a, g.fc1.weight, g.fc1.bias, g.fc3.weight, g.fc3.bias, d.fc1.weight, d.fc1.bias,
                                  f.fc1.weight, f.fc1.bias, f.fc2.weight, f.fc2.bias, float(alpha),
                                  chunk_size=chunk_size, compute_dtype=compute_dtype, backend=backend)

    @torch.no_grad()
    def synthesize(self, attributes: Tensor, num_per_class: int, *, alpha: Optional[float] = None,
                   generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                   chunk_size: Optional[int] = None,
                   compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """``num_per_class`` features for every row of ``attributes`` [K, A] in one batched call.

        Returns (features [K * num_per_class, X] float32, class index [K * num_per_class] in [0, K)). Noise is
        N(0, I); the feedback (weight ``alpha``, default ``a2``) is applied once, as in the published synthesis.
        """
        if attributes.dim() != 2 or attributes.shape[1] != self.config.attribute_dim:
            raise ValueError(f"synthesize: attributes must be [K, {self.config.attribute_dim}], got "
                             f"{list(attributes.shape)}")
        if num_per_class < 1:
            raise ValueError(f"synthesize: num_per_class must be >= 1, got {num_per_class}")
        device = self.generator.fc1.weight.device
        k = attributes.shape[0]
        labels = torch.arange(k).repeat_interleave(num_per_class)
        a = attributes.to(device).float().repeat_interleave(num_per_class, dim=0)
        z = torch.randn(a.shape[0], self.config.latent_dim, generator=generator, device=device)
        alpha = self.config.a2 if alpha is None else alpha
        if compute_dtype is not None and self.feedback is None:
            raise ValueError("synthesize: compute_dtype is a feature of the feedback-synthesis op; this model has no "
                             "feedback module (f-CLSWGAN), synthesise in fp32")
        fake = self.generate(z, a, alpha if self.feedback is not None else None, backend=backend,
                             chunk_size=chunk_size, compute_dtype=compute_dtype)
        return fake.float(), labels

    @torch.no_grad()
    def discriminative_features(self, x: Tensor, batch_size: int = 4096) -> Tensor:
        """The final classifier's input: [x, Dec(x), Dec hidden(x)] with a decoder, x itself without."""
        if self.decoder is None:
            return x
        device = self.decoder.fc1.weight.device
        parts = []
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].to(device)
            out, h = self.decoder(xb)
            parts.append(torch.cat([xb, out, h], 1))
        return torch.cat(parts) if parts else x.new_zeros(0, x.shape[1] + self.config.attribute_dim
                                                           + self.config.hidden)


def vae_loss(recon_x: Tensor, x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """Summed BCE + KL divergence, each divided by the batch size (published ``loss_fn``)."""
    bce = F.binary_cross_entropy(recon_x + 1e-12, x.detach(), reduction="sum") / x.shape[0]
    kld = -0.5 * torch.sum(1 + log_var - mean.pow(2) - log_var.exp()) / x.shape[0]
    return bce + kld


def weighted_l1(pred: Tensor, gt: Tensor) -> Tensor:
    """sum_j |d_j|^3 / ||d||_2 per row, averaged over rows (published ``WeightedL1``)."""
    d = pred - gt
    wt = d.pow(2)
    wt = wt / wt.sum(1, keepdim=True).sqrt()
    return (wt * d.abs()).sum() / d.shape[0]


Sampler = Callable[[], Tuple[Tensor, Tensor, Tensor]]  # () -> (features [B, X], attributes [B, A], labels [B])


@dataclass
class StepLosses:
    d_cost: float = 0.0
    wasserstein: float = 0.0
    g_cost: float = 0.0
    vae: float = 0.0
    recons: float = 0.0
    cls: float = 0.0
    lambda1: float = 0.0


class GANTrainer:
    """Optimizers and one generator step of the published loop (module docstring).

    Random draws come from the global torch generator in the published order (batch permutation, encoder noise or
    prior noise, interpolation weights), so a seeded run repeats exactly and resumes exactly from its RNG state.
    """

    def __init__(self, model: TFVAEGAN, pretrained_classifier: Optional[nn.Module] = None,
                 backend: Optional[str] = None, fused_adam: bool = True):
        self.model, c = model, model.config
        self.config = c
        self.backend = backend
        if c.cls_weight > 0 and pretrained_classifier is None:
            raise ValueError("cls_weight > 0 (f-CLSWGAN) needs a pretrained_classifier")
        self.pretrained_classifier = pretrained_classifier
        if pretrained_classifier is not None:
            pretrained_classifier.requires_grad_(False)
        betas = (c.beta1, 0.999)
        adam = lambda params, **kw: torch.optim.Adam(params, **kw, **({"fused": True} if fused_adam else {}))  # noqa
        self.opt_e = adam(model.encoder.parameters(), lr=c.lr) if model.encoder is not None else None  # default betas
        self.opt_g = adam(model.generator.parameters(), lr=c.lr, betas=betas)
        self.opt_d = adam(model.critic.parameters(), lr=c.lr, betas=betas)
        self.opt_f = adam(model.feedback.parameters(), lr=c.feed_lr, betas=betas) if model.feedback else None
        self.opt_dec = adam(model.decoder.parameters(), lr=c.dec_lr, betas=betas) if model.decoder else None
        self.lambda1 = float(c.lambda1)
        self._buffers: Dict[str, Tensor] = {}

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        named = {"e": self.opt_e, "g": self.opt_g, "d": self.opt_d, "f": self.opt_f, "dec": self.opt_dec}
        return {k: v for k, v in named.items() if v is not None}

    def state_dict(self) -> Dict:
        return {"optimizers": {k: o.state_dict() for k, o in self.optimizers().items()}, "lambda1": self.lambda1}

    def load_state_dict(self, state: Dict) -> None:
        for k, o in self.optimizers().items():
            o.load_state_dict(state["optimizers"][k])
        self.lambda1 = state["lambda1"]

    # ------------------------------------------------------------------------------------------------ pieces
    def _decoder_step_on_real(self, x: Tensor, a: Tensor) -> float:
        dec = self.model.decoder
        dec.zero_grad(set_to_none=True)
        out, _ = dec(x)
        loss = self.config.recons_weight * weighted_l1(out, a)
        loss.backward()
        self.opt_dec.step()
        return float(loss.detach())

    def _buffer(self, key: str, shape: Tuple[int, ...], like: Tensor) -> Tensor:
        """A zero-initialised work buffer kept across steps: no per-step allocation (and page faults) of large
        tensors, and parts that stay zero are written once."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[key] = like.new_zeros(shape)
        return buffer

    def _critic_gradients(self, x: Tensor, fake: Tensor, a: Tensor, alpha: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Sets the critic's .grad to that of ``gD*(mean D(fake) - mean D(real) + lambda1 * GP)`` in closed form.

        Returns (mean D(real), mean D(fake), mean (||grad|| - 1)^2), all without the gamma/lambda factors.
        """
        critic, c = self.model.critic, self.config
        w1, b1 = critic.fc1.weight, critic.fc1.bias
        w2, b2 = critic.fc2.weight.view(-1), critic.fc2.bias
        batch, xdim = x.shape
        w1x, w1a = w1[:, :xdim], w1[:, xdim:]
        # rows = [x | a; fake | a; interp | 0]: the critic's three inputs, later [.. ; r | 0] for the W1 gradient.
        rows = self._buffer("rows", (3 * batch, w1.shape[1]), x)
        rows[:batch, :xdim] = x
        rows[batch:2 * batch, :xdim] = fake
        rows[:batch, xdim:] = a
        rows[batch:2 * batch, xdim:] = a
        torch.mul(alpha, x, out=rows[2 * batch:, :xdim]).add_((1 - alpha) * fake)
        pre = (rows[:, :xdim] @ w1x.t()).view(3, batch, -1).add_(torch.addmm(b1, a, w1a.t()))  # [3, B, ndh]
        slope = torch.where(pre > 0, 1.0, SLOPE)
        hidden = pre.mul_(slope)                                                     # LeakyReLU, in place
        scores = hidden @ w2 + b2                                                    # [3, B]
        gd, lam = c.gamma_d, self.lambda1
        coef = gd / batch
        # left = [dLoss/dpre of real rows; of fake rows; u = dD/dpre of interp rows] = slope * w2 * (-coef, coef, 1)
        left = torch.mul(slope.view(3 * batch, -1), w2)
        left[:batch].mul_(-coef)
        left[batch:2 * batch].mul_(coef)
        u = left[2 * batch:]
        grad = u @ w1x                                                               # dD/dx at interp [B, X]
        norm = grad.norm(dim=1)
        gp = ((norm - 1) ** 2).mean()
        r = torch.mul(grad, (gd * lam * 2.0 / batch * (norm - 1) / norm).unsqueeze(1),  # dLoss/dgrad [B, X]
                      out=rows[2 * batch:, :xdim])
        # One product for the three contributions to W1 = [W1x | W1a]: real rows [x | a], fake rows [fake | a] and
        # the penalty's u^T [r | 0], written into a buffer kept across steps.
        grad_w1 = self._buffer("grad_w1", tuple(w1.shape), w1)
        torch.mm(left.t(), rows, out=grad_w1)
        critic.fc1.weight.grad = grad_w1
        critic.fc1.bias.grad = left[:2 * batch].sum(0)
        grad_w2 = -coef * hidden[0].sum(0) + coef * hidden[1].sum(0) + (slope[2] * (r @ w1x.t())).sum(0)
        critic.fc2.weight.grad = grad_w2.view(1, -1)
        critic.fc2.bias.grad = torch.zeros_like(b2)  # -gD/B and +gD/B summed over B rows cancel exactly
        return scores[0].mean(), scores[1].mean(), gp

    # ------------------------------------------------------------------------------------------------ step
    def generator_step(self, sample: Sampler, loop: int) -> StepLosses:
        """``critic_iter`` critic steps then one generator step; ``loop`` 1 uses the feedback (TF-VAEGAN)."""
        model, c = self.model, self.config
        use_fb = loop == 1 and model.feedback is not None
        gp_sum = torch.zeros(())
        encoded = None
        for i in range(c.critic_iter):
            x, a, y = sample()
            if model.decoder is not None and c.recons_weight > 0:
                self._decoder_step_on_real(x, a)
            if c.encoded_noise:
                # The encoder does not change until the generator phase, which reuses this last batch: its forward
                # pass of the last critic step is the generator phase's, so keep that one's graph.
                with torch.set_grad_enabled(i == c.critic_iter - 1):
                    encoded = model.encoder(x, a)
            with torch.no_grad():
                if c.encoded_noise:
                    mean, log_var = encoded
                    z = torch.randn(x.shape[0], c.latent_dim, device=x.device) * torch.exp(0.5 * log_var) + mean
                else:
                    z = torch.randn(x.shape[0], c.latent_dim, device=x.device)
                fake = model.generate(z, a, c.a1 if use_fb else None, backend=self.backend)
                alpha = torch.rand(x.shape[0], 1, device=x.device)
                d_real, d_fake, gp = self._critic_gradients(x, fake, a, alpha)
            gp_sum = gp_sum + c.gamma_d * (gp * self.lambda1)
            self.opt_d.step()
        gp_mean = gp_sum / (c.gamma_d * self.lambda1 * c.critic_iter)
        losses = StepLosses(wasserstein=float(c.gamma_d * (d_real - d_fake)),
                            d_cost=float(c.gamma_d * (d_fake - d_real) + c.gamma_d * (gp * self.lambda1)))
        if c.adaptive_lambda:
            if gp_mean > 1.05:
                self.lambda1 *= 1.1
            elif gp_mean < 1.001:
                self.lambda1 /= 1.1
        losses.lambda1 = self.lambda1

        # Generator phase on the last critic batch; the critic (and a frozen decoder) only pass gradients through.
        for opt in self.optimizers().values():
            if opt is not self.opt_d:
                opt.zero_grad(set_to_none=True)
        critic, dec = model.critic, model.decoder
        err = torch.zeros(())
        if model.encoder is not None:
            mean, log_var = encoded if encoded is not None else model.encoder(x, a)
            eps = torch.randn(x.shape[0], c.latent_dim, device=x.device)
            recon = model.generate(eps * torch.exp(0.5 * log_var) + mean, a, c.a1 if use_fb else None,
                                   backend=self.backend)
            vae = vae_loss(recon, x, mean, log_var)
            err = err + vae
            losses.vae = float(vae.detach())
        if c.encoded_noise:
            fake = recon
        else:
            noise = torch.randn(x.shape[0], c.latent_dim, device=x.device)
            if use_fb:  # the feedback for prior noise comes from the decoder of the reconstruction, as published
                with torch.no_grad():
                    h = dec.hidden(recon)
                fake = model.generator(noise, a, c.a1 * model.feedback(h))
            else:
                fake = model.generator(noise, a)
        d_fake_g = F.linear(F.leaky_relu(F.linear(torch.cat([fake, a], 1), critic.fc1.weight.detach(),
                                                  critic.fc1.bias.detach()), SLOPE),
                            critic.fc2.weight.detach(), critic.fc2.bias.detach()).mean()
        g_cost = -d_fake_g
        err = err + c.gamma_g * g_cost
        losses.g_cost = float(g_cost.detach())
        if dec is not None and c.recons_weight > 0:
            if c.freeze_dec:
                h = F.leaky_relu(F.linear(fake, dec.fc1.weight.detach(), dec.fc1.bias.detach()), SLOPE)
                out = F.linear(h, dec.fc3.weight.detach(), dec.fc3.bias.detach())
                out = out / out.pow(2).sum(1, keepdim=True).sqrt()
            else:
                out, _ = dec(fake)
            r_cost = weighted_l1(out, a)
            err = err + c.recons_weight * r_cost
            losses.recons = float(r_cost.detach())
        if c.cls_weight > 0:
            cls = F.nll_loss(self.pretrained_classifier(fake), y)
            err = err + c.cls_weight * cls
            losses.cls = float(cls.detach())
        err.backward()
        if self.opt_e is not None:
            self.opt_e.step()
        self.opt_g.step()
        if use_fb:
            self.opt_f.step()
        if dec is not None and c.recons_weight > 0 and not c.freeze_dec:
            self.opt_dec.step()
        return losses


class PublishedLoop:
    """A straightforward transcription of the published generator step (train_images.py), module by module with
    autograd and the published optimizers: the oracle for :class:`GANTrainer` in the tests and the baseline of
    ``benchmarks/bench_gan_step.py``. Same random draws in the same order as :class:`GANTrainer`."""

    def __init__(self, model: TFVAEGAN, pretrained_classifier: Optional[nn.Module] = None):
        self.model, c = model, model.config
        self.config = c
        self.pretrained_classifier = pretrained_classifier
        betas = (c.beta1, 0.999)
        self.opt_e = torch.optim.Adam(model.encoder.parameters(), lr=c.lr) if model.encoder is not None else None
        self.opt_g = torch.optim.Adam(model.generator.parameters(), lr=c.lr, betas=betas)
        self.opt_d = torch.optim.Adam(model.critic.parameters(), lr=c.lr, betas=betas)
        self.opt_f = (torch.optim.Adam(model.feedback.parameters(), lr=c.feed_lr, betas=betas)
                      if model.feedback else None)
        self.opt_dec = torch.optim.Adam(model.decoder.parameters(), lr=c.dec_lr, betas=betas) if model.decoder else None
        self.lambda1 = float(c.lambda1)

    def _feedback_fake(self, z: Tensor, a: Tensor) -> Tensor:
        g, dec = self.model.generator, self.model.decoder
        fake = g(z, a)
        _, hidden = dec(fake)
        return g(z, a, self.config.a1 * self.model.feedback(hidden.detach()))

    def _gradient_penalty(self, real: Tensor, fake: Tensor, a: Tensor) -> Tensor:
        alpha = torch.rand(real.shape[0], 1, device=real.device).expand(real.size())
        interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        out = self.model.critic(interpolates, a)
        grads = torch.autograd.grad(out, interpolates, torch.ones_like(out), create_graph=True, retain_graph=True)[0]
        return ((grads.norm(2, dim=1) - 1) ** 2).mean() * self.lambda1

    def generator_step(self, sample: Sampler, loop: int) -> StepLosses:
        model, c = self.model, self.config
        enc, gen, critic, fb, dec = model.encoder, model.generator, model.critic, model.feedback, model.decoder
        use_fb = loop == 1 and fb is not None
        critic.requires_grad_(True)
        if dec is not None:
            dec.requires_grad_(True)
        gp_sum = 0
        for _ in range(c.critic_iter):
            x, a, y = sample()
            critic.zero_grad()
            if dec is not None and c.recons_weight > 0:
                dec.zero_grad()
                recons, _ = dec(x)
                (c.recons_weight * weighted_l1(recons, a)).backward()
                self.opt_dec.step()
            d_real = c.gamma_d * critic(x, a).mean()
            d_real.backward(torch.tensor(-1.0))
            if c.encoded_noise:
                mean, log_var = enc(x, a)
                z = torch.randn(x.shape[0], c.latent_dim) * torch.exp(0.5 * log_var) + mean
            else:
                z = torch.randn(x.shape[0], c.latent_dim)
            fake = self._feedback_fake(z, a) if use_fb else gen(z, a)
            d_fake = c.gamma_d * critic(fake.detach(), a).mean()
            d_fake.backward(torch.tensor(1.0))
            gp = c.gamma_d * self._gradient_penalty(x, fake.detach(), a)
            gp_sum = gp_sum + gp.detach()
            gp.backward()
            self.opt_d.step()
        losses = StepLosses(wasserstein=float(d_real.detach() - d_fake.detach()),
                            d_cost=float((d_fake - d_real + gp).detach()))
        gp_sum = gp_sum / (c.gamma_d * self.lambda1 * c.critic_iter)
        if c.adaptive_lambda:
            if gp_sum > 1.05:
                self.lambda1 *= 1.1
            elif gp_sum < 1.001:
                self.lambda1 /= 1.1
        losses.lambda1 = self.lambda1

        critic.requires_grad_(False)
        if dec is not None and c.recons_weight > 0 and c.freeze_dec:
            dec.requires_grad_(False)
        for module in (enc, gen, fb):
            if module is not None:
                module.zero_grad()
        err = 0
        if enc is not None:
            mean, log_var = enc(x, a)
            z = torch.randn(x.shape[0], c.latent_dim) * torch.exp(0.5 * log_var) + mean
            recon = self._feedback_fake(z, a) if use_fb else gen(z, a)
            vae = vae_loss(recon, x, mean, log_var)
            err = vae
            losses.vae = float(vae.detach())
        if c.encoded_noise:
            fake = recon
        else:
            noise = torch.randn(x.shape[0], c.latent_dim)
            if use_fb:
                gen(noise, a)
                _, hidden = dec(recon)
                fake = gen(noise, a, c.a1 * fb(hidden.detach()))
            else:
                fake = gen(noise, a)
        g_cost = -critic(fake, a).mean()
        err = err + c.gamma_g * g_cost
        losses.g_cost = float(g_cost.detach())
        if dec is not None and c.recons_weight > 0:
            dec.zero_grad()
            recons_fake, _ = dec(fake)
            r_cost = weighted_l1(recons_fake, a)
            err = err + c.recons_weight * r_cost
            losses.recons = float(r_cost.detach())
        if c.cls_weight > 0:
            cls = F.nll_loss(self.pretrained_classifier(fake), y)
            err = err + c.cls_weight * cls
            losses.cls = float(cls.detach())
        err.backward()
        if self.opt_e is not None:
            self.opt_e.step()
        self.opt_g.step()
        if use_fb:
            self.opt_f.step()
        if dec is not None and c.recons_weight > 0 and not c.freeze_dec:
            self.opt_dec.step()
        critic.requires_grad_(True)
        if dec is not None:
            dec.requires_grad_(True)
        return losses


def gan_step_flops(config: GANConfig, batch: int, loop: int = 1) -> float:
    """FLOPs (2 per multiply-add, matrix products only) of one published generator step, for GFLOP/s figures.

    Counts the published loop's products (including its redundant passes), so the same work figure divides both
    the straightforward and the pyzsl times.
    """
    c = config
    X, A, H, D, E = c.feature_dim, c.attribute_dim, c.hidden, c.critic_hidden, c.encoder_hidden
    fb = loop == 1 and c.use_feedback
    enc = (X + A) * E + E * 2 * A + 2 * (2 * A) * A if c.use_encoder else 0
    gen = (2 * A) * H + H * X
    dec = X * H + H * A if c.use_decoder else 0
    feed = 2 * H * H if fb else 0
    crit = (X + A) * D + D
    fwd_fake = (gen + dec + feed + gen) if fb else gen
    # critic block: decoder fwd+bwd on real (weights + fc3 input grad), encoder fwd (when used), fake fwd,
    # critic real and fake fwd + weight grad, penalty: fwd, input grad, double backward (~3 products)
    critic_step = (2 * dec + H * A if c.use_decoder else 0) + (enc if c.encoded_noise else 0) + fwd_fake \
        + 4 * crit + 5 * crit
    # generator block: encoder, generator path, critic, decoder: forward + backward (~3x forward)
    gen_step = 3 * (enc + fwd_fake + crit + dec)
    return 2.0 * batch * (c.critic_iter * critic_step + gen_step)
