"""Forward values and gradients of the straight-through estimators in ``qat.ste``."""

from __future__ import annotations

import pytest
import torch

from qat.ste import (
    approx_sign_ste,
    binarize_ste,
    fake_quantize_lowrank_ste,
    fake_quantize_ste,
    grad_scale,
    round_ste,
    sign_ste,
)


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


# -- binarize_ste: one node equal to the composition through sign_ste -------------------------------------------------


def _binarize_composite(x: torch.Tensor, scales: torch.Tensor, shape: list[int]) -> torch.Tensor:
    r, out = x.float(), torch.zeros_like(x, dtype=torch.float32)
    for k in range(scales.shape[0]):
        y = scales[k].reshape(shape) * sign_ste(r)
        out, r = out + y, r - y
    return out


@pytest.mark.parametrize("num_bases", [1, 2, 3])
@pytest.mark.parametrize("channel_axis", [0, 1, None])
def test_binarize_ste_equals_the_sign_ste_composition(num_bases: int, channel_axis: int | None) -> None:
    torch.manual_seed(0)
    x = (torch.randn(6, 5, 3) * 1.5).requires_grad_()  # many |r_k| beyond 1: the clip mask matters
    channels = 1 if channel_axis is None else x.shape[channel_axis]
    scales = (torch.rand(num_bases, channels) + 0.3).requires_grad_()
    shape = [1, 1, 1]
    if channel_axis is not None:
        shape[channel_axis] = channels
    upstream = torch.randn(6, 5, 3)
    s = scales if channel_axis is not None else scales[:, 0]
    (binarize_ste(x, s, channel_axis) * upstream).sum().backward()
    fused = (x.grad.clone(), scales.grad.clone())
    x.grad = scales.grad = None
    expected = _binarize_composite(x, s, shape)
    (expected * upstream).sum().backward()
    assert torch.equal(binarize_ste(x, s, channel_axis).detach(), expected.detach())
    torch.testing.assert_close(fused[0], x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[1], scales.grad, rtol=1e-5, atol=1e-5)
    assert fused[0].abs().sum() > 0 and (fused[0] == 0).any()  # both sides of the clip were exercised


def test_binarize_ste_two_bases_gradient_by_hand() -> None:
    """K = 2, one channel: dQ/dw = s_I [|w| <= 1] + s_II [|r_1| <= 1] (1 - s_I [|w| <= 1]) (chain through r_1),
    dQ/ds_I = b_I - s_II [|r_1| <= 1] b_I, dQ/ds_II = b_II (BinaryDM Eq. 7-8)."""
    w = torch.tensor([[0.5, -2.0, 1.5, -0.1]], requires_grad=True)
    scales = torch.tensor([[0.8], [0.3]], requires_grad=True)
    q = binarize_ste(w, scales, 0)
    # b_I = [1, -1, 1, -1]; r_1 = w - 0.8 b_I = [-0.3, -1.2, 0.7, 0.7]; b_II = [-1, -1, 1, 1]
    assert torch.allclose(q, torch.tensor([[0.5, -1.1, 1.1, -0.5]]))
    q.sum().backward()
    in_w = torch.tensor([1.0, 0.0, 0.0, 1.0])
    in_r1 = torch.tensor([1.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(w.grad[0], 0.8 * in_w + 0.3 * in_r1 * (1 - 0.8 * in_w))
    b1, b2 = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0, 1.0])
    torch.testing.assert_close(scales.grad[:, 0], torch.stack([(b1 - 0.3 * in_r1 * b1).sum(), b2.sum()]))


# -- fake_quantize_ste: the fused path must equal the composite round_ste form ----------------------------------------


def _composite(x, step, zero, q_min, q_max, delta=None):
    """Eq. (1) written with round_ste / clamp (autograd derives the gradients): the reference."""
    z = round_ste(zero)
    q = torch.clamp(round_ste(x.float() / step) + z, q_min, q_max)
    if delta is not None:
        q = torch.clamp(q + round_ste(delta.float() / step), q_min, q_max)
    return ((q - z) * step).to(x.dtype)


@pytest.mark.parametrize("step_shape", [(), (1, 3, 1, 1), (4, 1, 1, 1), (4, 3, 1, 1)])
@pytest.mark.parametrize("bits", [(0, 15), (-128, 127), (-2, 1)])
@pytest.mark.parametrize("with_delta", [False, True])
def test_fake_quantize_ste_matches_the_composite_reference(step_shape, bits, with_delta) -> None:
    torch.manual_seed(1)
    q_min, q_max = bits
    x0 = torch.randn(4, 3, 5, 5) * 2
    s0 = torch.rand(step_shape) * 0.3 + 0.05
    z0 = torch.randn(step_shape) * 2 + (q_min + q_max) / 2  # non-integer, partly outside the range: clipping paths
    d0 = torch.randn(4, 3, 5, 5) * 0.5 if with_delta else None
    grads = []
    for fn in (fake_quantize_ste, _composite):
        x, s, z = (t.clone().requires_grad_(True) for t in (x0, s0, z0))
        d = d0.clone().requires_grad_(True) if with_delta else None
        out = fn(x, s, z, q_min, q_max, d)
        upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        (out * upstream).sum().backward()
        grads.append((out.detach(), x.grad, s.grad, z.grad, None if d is None else d.grad))
    fused, ref = grads
    assert torch.equal(fused[0], ref[0])  # forward values are bit-identical
    for a, b in zip(fused[1:], ref[1:], strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if q_max - q_min < 100:  # the low-bit cases exercise both clipped and unclipped elements
        assert (ref[1] == 0).any() and (ref[1] != 0).any()


def test_fake_quantize_ste_keeps_the_input_dtype_and_saves_only_the_input() -> None:
    x = torch.randn(8, 16, 12, 12, dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    z = torch.tensor(3.0, requires_grad=True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fake_quantize_ste(x, s, z, 0, 15)
    assert out.dtype == torch.bfloat16
    assert sum(saved) <= x.numel() * x.element_size() + 64  # one bf16 copy of x, plus the scalars
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _composite(x, s, z, 0, 15)
    assert sum(saved) > 2 * x.numel() * x.element_size()  # the composite form keeps float32 intermediates
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and s.grad is not None and z.grad is not None


@pytest.mark.parametrize("shape,target", [
    ((4, 3, 5, 5), ()),                # per-tensor step, conv input
    ((4, 3, 5, 5), (4, 1, 1, 1)),      # per-sample step
    ((4, 3, 5, 5), (1, 3, 1, 1)),      # per-channel step: the inner dims go first, the batch after
    ((2, 7, 6), (1, 1, 6)),            # per-channel step of a linear input: nothing to reduce first
    ((2, 7, 6), (2, 1, 1)),            # per-sample step of a linear input
    ((300, 300), (1, 1)),              # a row over the limit is not reduced first
    ((5,), ()),
])
@pytest.mark.parametrize("compiling", [False, True])
def test_sum_to_equals_sum_to_size(shape, target, compiling, monkeypatch) -> None:
    from qat.ste import _sum_to

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)  # the two-stage form is compile-only
    torch.manual_seed(0)
    t = torch.randn(shape, dtype=torch.float64)
    out = _sum_to(t, torch.Size(target))
    assert out.shape == torch.Size(target)
    torch.testing.assert_close(out, t.sum_to_size(target), rtol=1e-12, atol=1e-12)


def test_sum_to_reduces_inner_rows_first(monkeypatch) -> None:
    """The first stage sums whole rows of the innermost broadcast dimensions, within the row limit."""
    import qat.ste as ste

    calls = []
    real = torch.Tensor.sum

    def spy(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("dim"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sum", spy)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ste._sum_to(torch.ones(4, 3, 5, 5), torch.Size(()))
    assert calls == [[3, 2, 1]]  # C * H * W = 75 fits the limit: one row per sample
    calls.clear()
    monkeypatch.setattr(ste, "_ROW_LIMIT", 30)
    ste._sum_to(torch.ones(4, 3, 5, 5), torch.Size(()))
    assert calls == [[3, 2]]  # rows of H * W = 25 elements per (sample, channel)
    calls.clear()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    ste._sum_to(torch.ones(4, 3, 5, 5), torch.Size(()))
    assert calls == []  # eagerly: sum_to_size alone, no extra kernel


def test_compiled_choice_is_per_call_and_reaches_both_passes(monkeypatch) -> None:
    """No process-wide switch: ``compiled=`` of each call selects the kernels of its forward and its backward."""
    import qat.ste as ste

    assert ste._kernel("value") is ste._fq_value and ste._kernel("backward", compiled=False) is ste._fq_backward
    calls: list[tuple[str, bool]] = []
    eager = ste._kernel

    def spy(name: str, compiled: bool = False):
        calls.append((name, compiled))
        return eager(name, False)  # the eager math either way: nothing is compiled in a unit test

    monkeypatch.setattr(ste, "_kernel", spy)
    torch.manual_seed(0)
    x0 = torch.randn(3, 4) * 2
    for compiled in (False, True, False):
        calls.clear()
        x, s, z = x0.clone().requires_grad_(True), torch.tensor(0.3, requires_grad=True), torch.tensor(7.4)
        out = ste.fake_quantize_ste(x, s, z, 0, 15, compiled=compiled)
        out.sum().backward()
        assert calls == [("value", compiled), ("backward", compiled)]
        assert torch.equal(out, _composite(x0, torch.tensor(0.3), z, 0, 15))
    calls.clear()
    ste.fake_quantize_forward(x0, torch.tensor(0.3), torch.tensor(7.4), 0, 15, compiled=True)
    ste.fake_quantize_backward(torch.ones_like(x0), x0, torch.tensor(0.3), torch.tensor(7.4), None, 0, 15,
                               compiled=True)
    assert calls == [("value", True), ("backward", True)]


# -- fake_quantize_lowrank_ste: QALoRA's weight node must equal fake_quantize_ste of w with delta = scaling B A -----


@pytest.mark.parametrize("w_shape", [(6, 5), (6, 5, 1, 1), (6, 4, 3, 3)])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [(0, 15), (-128, 127), (0, 1)])
def test_fake_quantize_lowrank_ste_matches_the_composite_reference(w_shape, per_channel, bits) -> None:
    torch.manual_seed(2)
    q_min, q_max, rank, scaling = *bits, 3, 0.7
    c = w_shape[0]
    w = torch.randn(w_shape)
    b0 = torch.randn(c, rank, *(1,) * (len(w_shape) - 2))  # peft: a 1x1 conv for conv layers
    a0 = torch.randn(rank, *w_shape[1:]) * 0.5
    param_shape = (c,) + (1,) * (len(w_shape) - 1) if per_channel else ()
    s0 = torch.rand(param_shape) * 0.3 + 0.1
    z0 = torch.randn(param_shape) * 2 + (q_min + q_max) / 2  # partly outside the range: both clips are exercised
    results = []
    for lowrank in (True, False):
        b, a, s, z = (t.clone().requires_grad_(True) for t in (b0, a0, s0, z0))
        delta = scaling * (b.reshape(c, rank) @ a.reshape(rank, -1)).reshape(w_shape)
        if lowrank:
            out = fake_quantize_lowrank_ste(w, delta.detach(), b, a, s, z, scaling, q_min, q_max)
        else:
            out = _composite(w, s, z, q_min, q_max, delta)
        upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        (out * upstream).sum().backward()
        results.append((out.detach(), b.grad, a.grad, s.grad, z.grad))
    fast, ref = results
    assert torch.equal(fast[0], ref[0])  # forward values are bit-identical
    for x, y in zip(fast[1:], ref[1:], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    if q_max - q_min < 100:  # the outer clip both passes and stops the gradient to delta somewhere
        delta = (scaling * (b0.reshape(c, rank) @ a0.reshape(rank, -1))).reshape(w_shape).requires_grad_(True)
        _composite(w, s0, z0, q_min, q_max, delta).sum().backward()
        assert (delta.grad == 0).any() and (delta.grad != 0).any()


def test_fake_quantize_lowrank_ste_saves_a_small_integer_per_element_and_rejects_group_steps() -> None:
    c, k, rank = 64, 288, 8
    w = torch.randn(c, k)
    b, a = torch.randn(c, rank, requires_grad=True), torch.randn(rank, k, requires_grad=True)
    s, z = torch.full((c, 1), 0.2, requires_grad=True), torch.full((c, 1), 8.0)
    delta = (b @ a).detach()
    saved: list[tuple[torch.dtype, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fake_quantize_lowrank_ste(w, delta, b, a, s, z, 1.0, 0, 15)
    weight_sized = [dtype for dtype, n in saved if n == w.numel()]
    assert sorted(weight_sized, key=str) == sorted([torch.float32, torch.int8], key=str)  # w itself and the codes
    with pytest.raises(ValueError, match="per output channel"):
        fake_quantize_lowrank_ste(w, delta, b, a, torch.ones(c, 2), torch.zeros(c, 2), 1.0, 0, 15)


# -- approx_sign_ste: sign forward, Bi-Real's ApproxSign backward -----------------------------------------------------


def test_approx_sign_ste_forward_is_sign_with_zero_to_plus_one() -> None:
    x = _wide_values()
    expected = torch.tensor([1.0 if v >= 0 else -1.0 for v in x.tolist()])
    assert torch.equal(approx_sign_ste(x), expected)
    assert approx_sign_ste(torch.tensor([0.0, -0.0])).tolist() == [1.0, 1.0]
    assert approx_sign_ste(torch.tensor([0.5], dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_approx_sign_ste_gradient_is_the_piecewise_quadratics_derivative() -> None:
    # Bi-Real Net Eq. 6: d/dx (2x + x^2) = 2 + 2x on [-1, 0), d/dx (2x - x^2) = 2 - 2x on [0, 1), 0 elsewhere.
    x = torch.tensor([-3.0, -1.0, -0.75, -0.25, 0.0, 0.25, 0.5, 0.999, 1.0, 2.0], requires_grad=True)
    upstream = torch.arange(1.0, 11.0)
    (approx_sign_ste(x) * upstream).sum().backward()
    by_hand = []
    for v in x.detach().tolist():
        by_hand.append(2 + 2 * v if -1 <= v < 0 else 2 - 2 * v if 0 <= v < 1 else 0.0)
    torch.testing.assert_close(x.grad, upstream * torch.tensor(by_hand))
    # the same as differentiating the quadratic surrogate with autograd
    z = x.detach().clone().requires_grad_(True)
    surrogate = torch.where(z < -1, -1.0, torch.where(z < 0, 2 * z + z * z, torch.where(z < 1, 2 * z - z * z, 1.0)))
    (surrogate * upstream).sum().backward()
    torch.testing.assert_close(x.grad, z.grad)
