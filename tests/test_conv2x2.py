"""conv2x2_same (LESA's 2x2 conv with TF 'SAME' padding): the Winograd cpp kernel against F.conv2d on the padded map."""
import pytest
import torch
from torch.library import opcheck

from pyzsl._backend import cpp_built
from pyzsl.ops.conv import conv2x2_same

pytestmark = pytest.mark.skipif(not cpp_built(), reason="pyzsl._C was not built")

# (B, h, w, C_in, C_out): LESA's grid, odd sides (tiles half outside the map), one row or column, one pixel, one
# channel, an empty batch.
SHAPES = [(2, 14, 14, 16, 8), (1, 3, 5, 4, 3), (3, 1, 1, 2, 2), (2, 1, 4, 3, 3), (1, 5, 1, 1, 1), (4, 7, 6, 9, 13),
          (0, 4, 4, 3, 2)]


def make(B, h, w, ci, co, *, seed, dtype, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, h, w, ci, generator=g, dtype=dtype)
    weight = torch.randn(co, ci, 2, 2, generator=g, dtype=dtype)
    bias = torch.randn(co, generator=g, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (x, weight, bias)]


def outputs_and_gradients(inputs, backend, weights):
    out = conv2x2_same(*inputs, backend=backend)
    return [out] + list(torch.autograd.grad((out * weights.to(out.dtype)).sum(), inputs))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpp_equals_reference_float64(shape, seed):
    inputs = make(*shape, seed=seed, dtype=torch.float64)
    weights = torch.randn(shape[:3] + shape[4:], generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    ours, ref = (outputs_and_gradients(inputs, backend, weights) for backend in ("cpp", "reference"))
    for name, a, b in zip(("out", "grad x", "grad weight", "grad bias"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[5:6])
@pytest.mark.parametrize("seed", [0, 1])
def test_cpp_float32_error_is_that_of_a_float32_conv(shape, seed):
    """float32 against the float64 reference, normwise (max error / max magnitude): a weight-gradient entry that is a
    sum of hundreds of terms can cancel to a small value, so an elementwise relative bound says little. Measured: at
    most 5e-7 for these shapes (1e-6 at LESA's 32 x 14 x 14 x 512 x 512), the float32 reference 1e-7 to 2e-6."""
    exact = make(*shape, seed=seed, dtype=torch.float64)
    weights = torch.randn(shape[:3] + shape[4:], generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    ref = outputs_and_gradients(exact, "reference", weights)
    ours = outputs_and_gradients([t.detach().float().requires_grad_() for t in exact], "cpp", weights)
    for name, a, b in zip(("out", "grad x", "grad weight", "grad bias"), ours, ref):
        assert a.dtype == torch.float32
        error = (a.double() - b).abs().max() / b.abs().max()
        assert error <= 2e-6, f"{name}: normwise error {error:.1e}"


def test_direct_formula_on_a_known_map():
    """One channel, weight [[1, 2], [3, 4]]: out[i, j] = x[i, j] + 2 x[i, j + 1] + 3 x[i + 1, j] + 4 x[i + 1, j + 1],
    zero past the map (written out, so the test does not lean on F.conv2d's padding convention)."""
    x = torch.arange(1.0, 13.0, dtype=torch.float64).view(1, 3, 4, 1)
    weight = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    padded = torch.zeros(4, 5, dtype=torch.float64)
    padded[:3, :4] = x[0, :, :, 0]
    expected = padded[:3, :4] + 2 * padded[:3, 1:] + 3 * padded[1:, :4] + 4 * padded[1:, 1:] + 0.5
    out = conv2x2_same(x, weight, torch.tensor([0.5], dtype=torch.float64), backend="cpp")
    torch.testing.assert_close(out[0, :, :, 0], expected, rtol=0, atol=1e-13)


def test_without_input_gradient_and_without_bias():
    x, weight, _ = make(2, 5, 4, 3, 6, seed=4, dtype=torch.float64)
    x = x.detach()
    outs = [conv2x2_same(x, weight, backend=backend) for backend in ("cpp", "reference")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(out.square().sum(), weight)[0] for out in outs]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_gradcheck_and_opcheck():
    x, weight, bias = make(2, 3, 5, 3, 2, seed=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: conv2x2_same(*a, backend="cpp"), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda w, b: conv2x2_same(x.detach(), w, b, backend="cpp"), (weight, bias))
    opcheck(torch.ops.pyzsl.conv2x2_same.default, (x, weight, bias))
    out, tiles = torch.ops.pyzsl.conv2x2_same(x.detach(), weight.detach(), bias.detach())
    assert tiles.shape == (9, 2 * 2 * 3, 3)
    for x_needs_grad in (True, False):
        opcheck(torch.ops.pyzsl._conv2x2_same_backward.default,
                (torch.randn_like(out), tiles, weight.detach(), x_needs_grad))


def test_bad_input_names_the_argument():
    x, weight, bias = (t.detach() for t in make(2, 4, 4, 3, 5, seed=0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be 4-D \[B, h, w, C_in\], got shape \[2, 4, 4\]"):
        conv2x2_same(x[..., 0], weight, bias)
    with pytest.raises(ValueError, match=r"weight must be \[C_out, C_in, 2, 2\] = \[C_out, 3, 2, 2\] for x "
                                         r"\[2, 4, 4, 3\], got \[5, 3, 3, 3\]"):
        conv2x2_same(x, torch.zeros(5, 3, 3, 3, dtype=torch.float64), bias)
    with pytest.raises(ValueError, match=r"bias must be \[C_out\] = \[5\], got \[4\]"):
        conv2x2_same(x, weight, bias[:4])
    with pytest.raises(ValueError, match=r"share a floating dtype, got torch.float64, torch.float32"):
        conv2x2_same(x, weight.float(), bias)
    with pytest.raises(ValueError, match=r"h, w >= 1, got shape \[2, 0, 4, 3\]"):
        conv2x2_same(x[:, :0], weight, bias)
    with pytest.raises(ValueError, match=r"cpp kernel takes float32 or float64, got torch.float16"):
        conv2x2_same(x.half(), weight.half(), bias.half(), backend="cpp")
    with pytest.raises(ValueError, match=r"has no 'triton' kernel"):
        conv2x2_same(x, weight, bias, backend="triton")
