"""Forward values and gradients of the straight-through estimators in ``qat.ste``."""

from __future__ import annotations

import pytest
import torch

from qat.ste import grad_scale, round_ste, sign_ste


def _wide_values(n: int = 20000) -> torch.Tensor:
    """Random values over many magnitudes (1e-8 .. 1e3), both signs, plus exact ties and zero."""
    torch.manual_seed(0)
    x = torch.randn(n) * torch.logspace(-8, 3, n)
    ties = torch.tensor([-2.5, -1.5, -0.5, 0.0, 0.5, 1.5, 2.5, 3.5])
    return torch.cat([x, ties])


def test_round_ste_forward_is_round_half_to_even() -> None:
    x = _wide_values()
    assert torch.equal(round_ste(x), torch.round(x))
    # Ties go to the even integer (banker's rounding), written out by hand.
    ties = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
    assert round_ste(ties).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0]


def test_round_ste_gradient_is_one() -> None:
    x = _wide_values().requires_grad_(True)
    upstream = torch.randn_like(x)
    (round_ste(x) * upstream).sum().backward()
    # d round_ste / dx = 1 everywhere, so the input gradient is the upstream gradient itself.
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("scale", [0.37, 1e-3, 1.0 / (1000 * 15) ** 0.5, 4.0])
def test_grad_scale_forward_is_identity(scale: float) -> None:
    x = _wide_values()
    assert torch.equal(grad_scale(x, scale), x)


@pytest.mark.parametrize("scale", [0.37, 1e-3, 4.0])
def test_grad_scale_multiplies_gradient(scale: float) -> None:
    x = _wide_values().requires_grad_(True)
    upstream = torch.randn_like(x)
    (grad_scale(x, scale) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream * scale)


def test_grad_scale_accepts_tensor_scale() -> None:
    x = torch.randn(5, requires_grad=True)
    grad_scale(x, torch.tensor(0.25)).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5,), 0.25))


def test_sign_ste_forward() -> None:
    x = _wide_values()
    y = sign_ste(x)
    expected = torch.tensor([1.0 if v >= 0 else -1.0 for v in x.tolist()])
    assert torch.equal(y, expected)
    # 0 (and -0.0) go to +1.
    assert sign_ste(torch.tensor([0.0, -0.0])).tolist() == [1.0, 1.0]


def test_sign_ste_gradient_is_clipped_identity() -> None:
    x = torch.tensor([-3.0, -1.0, -0.999, -0.2, 0.0, 0.4, 1.0, 1.0001, 7.0], requires_grad=True)
    upstream = torch.arange(1.0, 10.0)
    (sign_ste(x) * upstream).sum().backward()
    # Gradient 1 for |x| <= 1 (boundaries included), 0 outside.
    inside = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert torch.equal(x.grad, upstream * inside)
