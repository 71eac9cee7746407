"""pyzsl.ops.norm.batch_norm_relu (LESA's BN + ReLU as one op) against F.batch_norm + F.relu, and the LESA model's
fused path against its plain BatchNorm2d path (outputs, gradients, running statistics)."""
import copy
import warnings

import pytest
import torch
from torch.library import opcheck

from pyzsl._backend import cpp_built
from pyzsl.models.lesa import LESA
from pyzsl.ops.norm import batch_norm_relu

pytestmark = pytest.mark.skipif(not cpp_built(), reason="pyzsl._C did not build")
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make(N, C, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * 2 + 0.5
    weight = torch.randn(C, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(True) for t in (x, weight, bias)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 1), (300, 7), (1000, 33), (517, 512)])
def test_matches_batch_norm_then_relu(dtype, shape):
    for seed in range(2):
        x, weight, bias = make(*shape, seed=seed, dtype=dtype)
        ours = batch_norm_relu(x, weight, bias, 1e-3, backend="cpp")
        ref = batch_norm_relu(x, weight, bias, 1e-3, backend="reference")
        torch.testing.assert_close(ours.out, ref.out, **TOL[dtype])
        torch.testing.assert_close(ours.mean, ref.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.var, ref.var, rtol=1e-10, atol=1e-12)
        g = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64).to(dtype)
        for a, b in zip(torch.autograd.grad((ours.out * g).sum(), (x, weight, bias)),
                        torch.autograd.grad((ref.out * g).sum(), (x, weight, bias))):
            torch.testing.assert_close(a, b, **TOL[dtype])


def test_gradcheck_and_opcheck():
    x, weight, bias = make(9, 4, seed=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: batch_norm_relu(*a, 1e-3, backend="cpp").out, (x, weight, bias))
    opcheck(torch.ops.pyzsl.batch_norm_relu.default, (x, weight, bias, 1e-3))
    out = torch.ops.pyzsl.batch_norm_relu(x.detach(), weight.detach(), bias.detach(), 1e-3)
    opcheck(torch.ops.pyzsl._batch_norm_relu_backward.default,
            (torch.randn_like(out[0]), out[0], x.detach(), weight.detach(), out[1], out[2], 1e-3))


def test_bad_shapes_name_the_argument():
    x, weight, bias = (t.detach() for t in make(9, 4, seed=0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be 2-D, got shape \[9\]"):
        batch_norm_relu(x[:, 0], weight, bias, 1e-3)
    with pytest.raises(ValueError, match=r"weight and bias must be \[C\] = \[4\] for x \[9, 4\], got \[3\] and \[4\]"):
        batch_norm_relu(x, weight[:3], bias, 1e-3)
    with pytest.raises(ValueError, match=r"at least 2 rows"):
        batch_norm_relu(x[:1], weight, bias, 1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lesa_fused_path_equals_batch_norm2d_path(dtype):
    vectors = torch.nn.functional.normalize(torch.randn(20, 30, generator=torch.Generator().manual_seed(0)), dim=1)
    torch.manual_seed(0)
    fused = LESA(vectors, vectors[:3], feature_dim=16, grid=(3, 4), hidden_dim=12, heads=4, backend="cpp").to(dtype)
    plain = copy.deepcopy(fused)
    plain.backend = "reference"
    features = torch.randn(5, 12, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64).relu().to(dtype)
    assert fused._fused_batch_norm_relu(torch.zeros(5 * 12, 16, dtype=dtype))
    assert not plain._fused_batch_norm_relu(torch.zeros(5 * 12, 16, dtype=dtype))
    for step in range(3):
        a, b = fused.region_features(features * (step + 1)), plain.region_features(features * (step + 1))
        torch.testing.assert_close(a, b, **TOL[dtype])
        params = [fused.conv.weight, fused.conv.bias, fused.bn.weight, fused.bn.bias]
        plain_params = [plain.conv.weight, plain.conv.bias, plain.bn.weight, plain.bn.bias]
        weights = torch.randn(a.shape, generator=torch.Generator().manual_seed(step), dtype=dtype)
        for x, y in zip(torch.autograd.grad((a * weights).sum(), params),
                        torch.autograd.grad((b * weights).sum(), plain_params)):
            torch.testing.assert_close(x, y, **TOL[dtype])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.bn, name), getattr(plain.bn, name), **TOL[dtype])
    fused.eval()
    plain.eval()
    torch.testing.assert_close(fused.region_features(features), plain.region_features(features), **TOL[dtype])


def test_lesa_keeps_torch_conv_block_off_the_cpu_without_warning():
    """With backend auto, tensors off the CPU (here the meta device) take nn.Conv2d + BatchNorm2d quietly; asking for
    cpp there is an error that names the backend."""
    vectors = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    model = LESA(vectors, vectors[:2], feature_dim=4, grid=(2, 2), hidden_dim=3, heads=2, backend="auto")
    rows = torch.zeros(8, 4, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not model._cpp_kernel(rows, "LESA conv")
    model.backend = "cpp"
    with pytest.raises(ValueError, match="backend='cpp' cannot run here"):
        model._cpp_kernel(rows, "LESA conv")
