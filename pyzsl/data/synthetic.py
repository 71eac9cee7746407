"""``synthetic``: the embedded multi-label ZSL dataset, seeded, with seen and unseen labels, for LESA.

How it is made (all from one ``torch.Generator`` seeded with ``seed``):

1. Every label has a random word vector ``v_l`` (``embedding_dim``, L2-normalised); the first ``num_unseen`` labels
   are unseen, the rest seen.
2. A fixed random linear map ``A`` turns a word vector into the label's visual prototype ``A v_l`` (``feature_dim``),
   so a model that learns the map from seen labels can score unseen ones: the zero-shot premise.
3. An image has ``1..max_positives`` positive labels (seen labels only for train/val images; any label for test
   images). Each positive writes its prototype into one or two random regions of a ``grid`` region map; every region
   gets Gaussian noise. Region features are passed through ReLU, like CNN activations.
4. Targets are +1 for positives and -1 for the rest, except that a fraction ``unannotated`` of the negatives is set to
   0 (unannotated), as in NUS-WIDE and Open Images. Train/val targets cover the seen labels; test targets cover
   unseen then seen labels (the GZSL order).

Chance level: a random ranking gives each label an expected AP equal to its share of positive images, so chance mAP
is about ``mean positives per image / labels`` (printed by the trainer as ``chance``).
"""
from typing import Tuple

import torch
from torch.utils.data import TensorDataset

from .multilabel import MultilabelZSLData


def _images(generator: torch.Generator, count: int, labels: torch.Tensor, prototypes: torch.Tensor,
            grid: Tuple[int, int], max_positives: int, noise: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` region maps whose positives are drawn from ``labels`` (indices into ``prototypes``)."""
    regions = grid[0] * grid[1]
    features = noise * torch.randn(count, regions, prototypes.shape[1], generator=generator)
    positives = torch.zeros(count, prototypes.shape[0], dtype=torch.bool)
    sizes = torch.randint(1, max_positives + 1, (count,), generator=generator)
    for i in range(count):
        chosen = labels[torch.randperm(len(labels), generator=generator)[: int(sizes[i])]]
        positives[i, chosen] = True
        for label in chosen.tolist():
            where = torch.randint(0, regions, (int(torch.randint(1, 3, (1,), generator=generator)),),
                                  generator=generator)
            features[i, where] += prototypes[label]
    return features.relu_(), positives


def _targets(generator: torch.Generator, positives: torch.Tensor, unannotated: float) -> torch.Tensor:
    targets = torch.where(positives, 1, -1).to(torch.int8)
    hidden = (torch.rand(positives.shape, generator=generator) < unannotated) & ~positives
    targets[hidden] = 0
    return targets


def load_synthetic(*, num_seen: int = 60, num_unseen: int = 20, embedding_dim: int = 32, feature_dim: int = 64,
                   grid: Tuple[int, int] = (4, 4), num_train: int = 4000, num_val: int = 500, num_test: int = 1000,
                   max_positives: int = 3, noise: float = 0.5, unannotated: float = 0.1,
                   seed: int = 0) -> MultilabelZSLData:
    """The synthetic dataset described in the module docstring; the same ``seed`` gives the same tensors."""
    for name, value in (("num_seen", num_seen), ("num_unseen", num_unseen), ("num_train", num_train),
                        ("num_val", num_val), ("num_test", num_test), ("max_positives", max_positives)):
        if value < 1:
            raise ValueError(f"load_synthetic: {name} must be >= 1, got {value}")
    if not 0 <= unannotated < 1:
        raise ValueError(f"load_synthetic: unannotated must be in [0, 1), got {unannotated}")
    generator = torch.Generator().manual_seed(seed)
    total = num_seen + num_unseen
    vectors = torch.nn.functional.normalize(torch.randn(total, embedding_dim, generator=generator), dim=1)
    projection = torch.randn(feature_dim, embedding_dim, generator=generator) * (4.0 / embedding_dim ** 0.5)
    prototypes = vectors @ projection.t()
    unseen, seen = torch.arange(num_unseen), torch.arange(num_unseen, total)   # GZSL order: unseen first

    def split(count: int, allowed: torch.Tensor, columns: torch.Tensor) -> TensorDataset:
        features, positives = _images(generator, count, allowed, prototypes, grid, max_positives, noise)
        return TensorDataset(features, _targets(generator, positives[:, columns], unannotated))

    train = split(num_train, seen, seen)
    val = split(num_val, seen, seen)
    test = split(num_test, torch.arange(total), torch.arange(total))
    return MultilabelZSLData(
        name="synthetic", train=train, val=val, test=test,
        seen_names=[f"seen_{i}" for i in range(num_seen)], unseen_names=[f"unseen_{i}" for i in range(num_unseen)],
        seen_vectors=vectors[seen].clone(), unseen_vectors=vectors[unseen].clone(),
        feature_shape=(grid[0] * grid[1], feature_dim))
