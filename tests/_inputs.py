"""Random multi-label inputs shared by the test files."""
import torch


def make_inputs(N, L, *, seed, dtype=torch.float64, tied=True, p_unannotated=0.3, p_positive=0.25, levels=5):
    """Scores [N, L] (integers in [0, levels) when ``tied``: ties everywhere) and int8 targets in {1, 0, -1}."""
    g = torch.Generator().manual_seed(seed)
    if tied:
        scores = torch.randint(0, levels, (N, L), generator=g).to(dtype)
    else:
        scores = torch.randn(N, L, generator=g, dtype=torch.float64).to(dtype)
    u = torch.rand(N, L, generator=g)
    targets = torch.full((N, L), -1, dtype=torch.int8)
    targets[u < p_positive] = 1
    targets[(u >= p_positive) & (u < p_positive + p_unannotated)] = 0
    return scores, targets
