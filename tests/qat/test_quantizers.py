"""Uniform, LSQ, LSQ+ and temporal LSQ fake quantizers against an independent naive reference; the binary
quantizer against hand-derived values and gradients; config validation, the registry and per-model fast paths.

Every affine quantizer is checked over signed/unsigned, symmetric/asymmetric, tensor/channel/group granularity and
bits 2..8 (invalid combinations excluded: LSQ+ needs an asymmetric scheme, temporal LSQ has no group granularity).
The step and zero-point are written by hand (not initialised by ``qat``), so the expected values only depend on
the formula Q(x) = s * (clip(round(x / s) + z, q_min, q_max) - z).

The binary quantizer is checked against Q(x) = sum_k s_k sign(r_k), r_0 = x, r_{k+1} = r_k - s_k sign(r_k),
sign(0) = +1, with s_k = mean |r_k| per output channel after ``initialize_``, computed here with numpy.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from qat_testutils import element_params, naive_fake_quant, param_key, qrange_ref
from torch import nn

import qat
import qat.ste
from qat.checks import ConfigProblems
from qat.prepare import LayerRule, QuantSpec
from qat.quantizers import (
    QUANTIZERS,
    AffineQuantizer,
    BinaryConfig,
    BinaryQuantizer,
    DynamicTokenConfig,
    LSQConfig,
    SignActConfig,
    TemporalLSQConfig,
    UniformConfig,
    build_quantizer,
    config_class,
)

KINDS = ["uniform", "lsq", "lsq+", "temporal_lsq"]
GRANULARITIES = ["tensor", "channel", "group"]
SHAPE = (4, 6)
GROUP_SIZE = 3
TEMPORAL_T = 3
TEMPORAL_ROW = 1  # the row selected for the temporal quantizer; other rows hold different values


def _valid(kind: str, symmetric: bool, granularity: str) -> bool:
    return not ((kind == "lsq+" and symmetric) or (kind == "temporal_lsq" and granularity == "group"))


def _config(kind: str, n_bits: int, signed: bool, symmetric: bool, granularity: str, grad_scale: bool = False):
    common = dict(n_bits=n_bits, signed=signed, symmetric=symmetric, granularity=granularity,
                  group_size=GROUP_SIZE if granularity == "group" else None)
    if kind == "uniform":
        return UniformConfig(**common)
    if kind == "lsq":
        return LSQConfig(**common, grad_scale=grad_scale)
    if kind == "lsq+":
        return LSQConfig(**common, learn_offset=True, grad_scale=grad_scale)
    return TemporalLSQConfig(**common, learn_offset=not symmetric, grad_scale=grad_scale, num_timesteps=TEMPORAL_T)


def _param_shape(granularity: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return (shape[0],)
    return (shape[0], math.prod(shape[1:]) // GROUP_SIZE)


def make_quantizer(kind: str, n_bits: int, signed: bool, symmetric: bool, granularity: str, grad_scale: bool = False,
                   shape: tuple[int, ...] = SHAPE, seed: int = 0):
    """A quantizer with hand-written (step, zero-point); returns it and the (step, zero) it uses."""
    gen = torch.Generator().manual_seed(seed)
    cfg = _config(kind, n_bits, signed, symmetric, granularity, grad_scale)
    groups = math.prod(shape[1:]) // GROUP_SIZE if granularity == "group" else None
    q = build_quantizer(cfg, num_channels=shape[0], channel_axis=0, group_count=groups)
    q_min, q_max = qrange_ref(n_bits, signed)
    pshape = _param_shape(granularity, shape)
    table = (1,) if kind != "temporal_lsq" else (TEMPORAL_T,)
    step = 0.05 + 0.25 * torch.rand(*table, *pshape, generator=gen)
    if symmetric:
        zero = torch.zeros_like(step)
    else:
        zero = torch.randint(q_min, q_max + 1, step.shape, generator=gen).float()
        if kind == "lsq+" or kind == "temporal_lsq":  # learned offsets are continuous; the forward rounds them
            zero = zero + 0.8 * torch.rand(step.shape, generator=gen) - 0.4
    with torch.no_grad():
        if kind == "temporal_lsq":
            q.step.copy_(step)
            q.zero_point.copy_(zero)
            q.set_timestep_index(TEMPORAL_ROW)
            step, zero = step[TEMPORAL_ROW], zero[TEMPORAL_ROW]
        else:
            step, zero = step[0], zero[0]
            q.step.copy_(step)
            q.zero_point.copy_(zero)
    q.mark_initialized()
    return q, step.clone(), zero.clone()


def make_input(step: torch.Tensor, zero: torch.Tensor, n_bits: int, signed: bool, granularity: str,
               shape: tuple[int, ...] = SHAPE, seed: int = 1) -> torch.Tensor:
    """Inputs spread over the representable range, with column 0 clipped below and the last column above."""
    gen = torch.Generator().manual_seed(seed)
    q_min, q_max = qrange_ref(n_bits, signed)
    s, z = element_params(shape, step, zero, granularity, 0, GROUP_SIZE)
    s, z = torch.from_numpy(s), torch.from_numpy(np.round(z))
    u = torch.rand(shape, generator=gen) * (q_max - q_min) + q_min - z
    u[..., 0] = q_min - z[..., 0] - 1.7
    u[..., -1] = q_max - z[..., -1] + 2.3
    return s * u


ALL_CASES = [
    (kind, bits, signed, sym, gran)
    for kind, bits, signed, sym, gran in itertools.product(KINDS, range(2, 9), [False, True], [True, False],
                                                          GRANULARITIES)
    if _valid(kind, sym, gran)
]
LSQ_CASES = [
    (kind, bits, signed, sym, gran)
    for kind, bits, signed, sym, gran in itertools.product(["lsq", "lsq+", "temporal_lsq"], [2, 3, 4, 8],
                                                          [False, True], [True, False], GRANULARITIES)
    if _valid(kind, sym, gran)
]


@pytest.mark.parametrize("kind,n_bits,signed,symmetric,granularity", ALL_CASES)
def test_forward_matches_naive_reference(kind, n_bits, signed, symmetric, granularity) -> None:
    q, step, zero = make_quantizer(kind, n_bits, signed, symmetric, granularity)
    x = make_input(step, zero, n_bits, signed, granularity)
    q_min, q_max = qrange_ref(n_bits, signed)
    expected = naive_fake_quant(x, step, zero, q_min, q_max, granularity, 0, GROUP_SIZE)
    assert torch.equal(q(x), expected)


@pytest.mark.parametrize("kind,n_bits,signed,symmetric,granularity", ALL_CASES)
def test_outputs_lie_on_the_grid(kind, n_bits, signed, symmetric, granularity) -> None:
    shape = (3, 600)  # many more elements per step than the 2^b levels
    q, step, zero = make_quantizer(kind, n_bits, signed, symmetric, granularity, shape=shape)
    x = make_input(step, zero, n_bits, signed, granularity, shape=shape) * 1.3
    out = q(x)
    q_min, q_max = qrange_ref(n_bits, signed)
    s, z = element_params(shape, step, zero, granularity, 0, GROUP_SIZE)
    codes = out.detach().numpy() / s + np.round(z)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert codes.min() >= q_min - 1e-3 and codes.max() <= q_max + 1e-3
    # At most 2^b distinct values per (step, zero-point) pair.
    out_np = out.detach().numpy()
    keys: dict[tuple[int, ...], set[float]] = {}
    for idx in np.ndindex(*shape):
        keys.setdefault(param_key(idx, shape, granularity, 0, GROUP_SIZE), set()).add(float(out_np[idx]))
    assert max(len(v) for v in keys.values()) <= 2**n_bits
    # ... and a wide input does use most of them (the grid is not degenerate).
    if granularity == "tensor":
        assert len(keys[()]) >= min(2**n_bits, 600) * 0.5


@pytest.mark.parametrize("kind,n_bits,signed,symmetric,granularity", ALL_CASES)
def test_input_gradient_is_ste(kind, n_bits, signed, symmetric, granularity) -> None:
    q, step, zero = make_quantizer(kind, n_bits, signed, symmetric, granularity)
    x = make_input(step, zero, n_bits, signed, granularity).requires_grad_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (q(x) * upstream).sum().backward()
    q_min, q_max = qrange_ref(n_bits, signed)
    s, z = element_params(SHAPE, step, zero, granularity, 0, GROUP_SIZE)
    v = np.round(x.detach().numpy() / s) + np.round(z)
    inside = torch.from_numpy(((v >= q_min) & (v <= q_max)).astype(np.float32))
    assert 0 < inside.sum() < inside.numel()  # both cases are exercised
    torch.testing.assert_close(x.grad, upstream * inside)


def _hand_step_zero_grads(x, upstream, step, zero, n_bits, signed, granularity):
    """LSQ / LSQ+ gradients written out from the formulas of Esser et al. and Bhalgat et al.

    dQ/ds = round(x/s) - x/s inside the range, q_min - z below, q_max - z above;  dQ/dz = -s where clipped, else 0.
    """
    q_min, q_max = qrange_ref(n_bits, signed)
    xs = x.detach().double().numpy()
    g = upstream.double().numpy()
    pshape = tuple(step.shape)
    gs, gz = np.zeros(pshape), np.zeros(pshape)
    for idx in np.ndindex(*xs.shape):
        key = param_key(idx, xs.shape, granularity, 0, GROUP_SIZE)
        s = float(step[key])
        z = float(np.round(float(zero[key])))
        v = float(np.float32(xs[idx]) / np.float32(s))
        code = round(v) + z  # Python round: half to even, as torch.round
        if code < q_min:
            ds, dz = q_min - z, -s
        elif code > q_max:
            ds, dz = q_max - z, -s
        else:
            ds, dz = round(v) - v, 0.0
        gs[key] += g[idx] * ds
        gz[key] += g[idx] * dz
    return torch.from_numpy(gs).float(), torch.from_numpy(gz).float()


@pytest.mark.parametrize("grad_scale", [False, True])
@pytest.mark.parametrize("kind,n_bits,signed,symmetric,granularity", LSQ_CASES)
def test_lsq_step_and_offset_gradients(kind, n_bits, signed, symmetric, granularity, grad_scale) -> None:
    q, step, zero = make_quantizer(kind, n_bits, signed, symmetric, granularity, grad_scale=grad_scale)
    x = make_input(step, zero, n_bits, signed, granularity)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    (q(x) * upstream).sum().backward()
    exp_s, exp_z = _hand_step_zero_grads(x, upstream, step, zero, n_bits, signed, granularity)
    if grad_scale:
        _, q_max = qrange_ref(n_bits, signed)
        n_per_step = x.numel() // max(step.numel(), 1)
        exp_s = exp_s / math.sqrt(n_per_step * q_max)  # LSQ's g = 1 / sqrt(N * Q_p)
    got_s = q.step.grad
    learned_z = kind == "lsq+" or (kind == "temporal_lsq" and not symmetric)
    got_z = q.zero_point.grad if learned_z else None
    if kind == "temporal_lsq":
        # Only the selected row of the table receives a gradient.
        others = [r for r in range(TEMPORAL_T) if r != TEMPORAL_ROW]
        assert torch.count_nonzero(got_s[others]) == 0
        got_s = got_s[TEMPORAL_ROW]
        if got_z is not None:
            assert torch.count_nonzero(got_z[others]) == 0
            got_z = got_z[TEMPORAL_ROW]
    torch.testing.assert_close(got_s, exp_s, rtol=1e-4, atol=1e-5)
    if learned_z:
        assert torch.count_nonzero(exp_z) > 0
        torch.testing.assert_close(got_z, exp_z, rtol=1e-4, atol=1e-5)
    else:
        assert not isinstance(q.zero_point, torch.nn.Parameter)


def test_grad_scale_changes_only_the_step_gradient() -> None:
    x = None
    grads, outs = [], []
    for gs in (False, True):
        q, step, zero = make_quantizer("lsq+", 4, False, False, "channel", grad_scale=gs)
        x = make_input(step, zero, 4, False, "channel") if x is None else x
        xi = x.clone().requires_grad_(True)
        out = q(xi)
        out.sum().backward()
        outs.append(out.detach())
        grads.append((q.step.grad.clone(), q.zero_point.grad.clone(), xi.grad.clone()))
    assert torch.equal(outs[0], outs[1])  # grad_scale is an exact identity forward
    g = 1.0 / math.sqrt(SHAPE[1] * 15)  # N = 6 elements per channel step, Q_p = 15
    torch.testing.assert_close(grads[1][0], grads[0][0] * g)
    assert torch.equal(grads[1][1], grads[0][1])
    assert torch.equal(grads[1][2], grads[0][2])


@pytest.mark.parametrize("kind", KINDS)
def test_forward_raises_when_not_initialised(kind: str) -> None:
    cfg = _config(kind, 4, False, False, "tensor")
    q = build_quantizer(cfg)
    if kind == "temporal_lsq":
        q.set_timestep_index(0)
    with pytest.raises(RuntimeError, match="not initialised"):
        q(torch.randn(3, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_disabled_quantizer_is_identity(kind: str) -> None:
    q, step, zero = make_quantizer(kind, 2, False, False, "channel")
    x = torch.randn(SHAPE) * 10
    q.enabled = False
    assert torch.equal(q(x), x)
    # Also without initialisation (and, for temporal quantizers, without a timestep).
    fresh = build_quantizer(_config(kind, 2, False, False, "tensor"))
    fresh.enabled = False
    assert torch.equal(fresh(x), x)


CHANNEL_ROWS = torch.tensor([[-3.0, -1.0, 0.5, 2.0, 0.25], [0.3, 0.9, 1.2, 0.1, 0.7], [-2.0, -0.5, -0.1, -1.5, -0.3]])


@pytest.mark.parametrize(
    "kind,signed,symmetric",
    [(k, sg, sy) for k in ("uniform", "lsq", "lsq+") for sg, sy in itertools.product([False, True], [False, True])
     if not (k == "lsq+" and sy)],
)
def test_minmax_init_covers_range_including_zero(kind: str, signed: bool, symmetric: bool) -> None:
    n_bits = 4
    q = build_quantizer(_config(kind, n_bits, signed, symmetric, "channel"), num_channels=3, channel_axis=0)
    x = CHANNEL_ROWS.clone()
    q.initialize_(x)
    q_min, q_max = qrange_ref(n_bits, signed)
    for c, row in enumerate(x.tolist()):
        lo, hi = min(min(row), 0.0), max(max(row), 0.0)  # range forced to include 0
        if symmetric and signed:
            s = max(-lo, hi) / q_max
        elif symmetric:
            s = hi / q_max
        else:
            s = (hi - lo) / (q_max - q_min)
        s = max(s, 1e-8)  # documented floor of the step (an all-negative row under symmetric unsigned)
        assert float(q.step.detach()[c]) == pytest.approx(s, rel=1e-6)
        if not symmetric:
            assert float(q.zero_point.detach()[c]) == q_min + round(-lo / s)
    out = q(x)
    err = (out - x).abs()
    s_elem = q.step.detach()[:, None].expand_as(x)
    covered = x >= 0 if (symmetric and not signed) else torch.ones_like(x, dtype=torch.bool)
    # Inside the covered range, the error is at most half a step: nothing in [min(x,0), max(x,0)] is clipped.
    assert torch.all(err[covered] <= s_elem[covered] / 2 + 1e-6)
    # Zero is exactly representable.
    assert torch.equal(q(torch.zeros(3, 5)), torch.zeros(3, 5))


@pytest.mark.parametrize("n_bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("signed,symmetric", [(False, False), (True, True)])
def test_mse_init_error_not_above_minmax(n_bits: int, granularity: str, signed: bool, symmetric: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 2000)
    x[:, :3] *= 12  # outliers: clipping pays off
    errs = {}
    for init in ("minmax", "mse"):
        cfg = UniformConfig(n_bits=n_bits, signed=signed, symmetric=symmetric, granularity=granularity, init=init)
        q = build_quantizer(cfg, num_channels=4, channel_axis=0)
        q.initialize_(x)
        errs[init] = (q(x) - x).abs().pow(2.4).mean().item()  # the Lp error mse init minimises (p = 2.4)
    assert errs["mse"] <= errs["minmax"]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: UniformConfig(n_bits=1), r"^n_bits: must be in \[2, 8\] for uniform, got 1$"),
        (lambda: LSQConfig(n_bits=9), r"^n_bits: must be in \[2, 8\] for lsq, got 9$"),
        (lambda: UniformConfig(granularity="row"),
         r"^granularity: must be one of \['tensor', 'channel', 'group'\], got 'row'$"),
        (lambda: LSQConfig(granularity="group"), r"^group_size: granularity 'group' needs a positive group_size$"),
        (lambda: LSQConfig(granularity="group", group_size=0),
         r"^group_size: granularity 'group' needs a positive group_size$"),
        (lambda: UniformConfig(granularity="channel", group_size=8),
         r"^group_size: is only valid with granularity 'group', not 'channel'$"),
        (lambda: LSQConfig(symmetric=True, learn_offset=True), r"^learn_offset: needs an asymmetric quantizer"),
        (lambda: TemporalLSQConfig(granularity="group", group_size=4),
         r"^granularity: temporal_lsq quantizes activations: granularity must be 'tensor' or 'channel'$"),
        (lambda: TemporalLSQConfig(num_timesteps=0), r"^num_timesteps: must be >= 1, got 0$"),
        (lambda: UniformConfig(init="percentile"), r"^init: must be one of \['minmax', 'mse'\], got 'percentile'$"),
        (lambda: BinaryConfig(n_bits=2), r"^n_bits: must be in \[1, 1\] for binary, got 2$"),
        (lambda: BinaryConfig(n_bits=4, num_bases=2), r"^n_bits: must be in \[1, 1\] for binary, got 4$"),
        (lambda: BinaryConfig(num_bases=0), r"^num_bases: must be >= 1, got 0$"),
        (lambda: BinaryConfig(granularity="group"),
         r"^granularity: must be one of \['channel', 'tensor'\], got 'group'$"),
    ],
)
def test_config_validation(make, match: str) -> None:
    with pytest.raises(ConfigProblems, match=match) as info:
        make()
    assert isinstance(info.value, ValueError) and len(info.value.problems) == 1


def test_config_validation_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigProblems) as info:
        UniformConfig(n_bits=1, granularity="row", init="percentile")
    assert [field for field, _ in info.value.problems] == ["n_bits", "granularity", "init"]
    assert str(info.value) == ("n_bits: must be in [2, 8] for uniform, got 1; granularity: must be one of "
                               "['tensor', 'channel', 'group'], got 'row'; init: must be one of ['minmax', 'mse'], "
                               "got 'percentile'")
    with pytest.raises(ConfigProblems, match=r"^n_bits: .*, got 2; num_bases: must be >= 1, got 0$"):
        BinaryConfig(n_bits=2, num_bases=0)


def test_quantizer_needs_channels_for_channel_granularity() -> None:
    with pytest.raises(ValueError, match="needs num_channels"):
        build_quantizer(UniformConfig(granularity="channel"))


def test_registry_lookup() -> None:
    assert config_class("uniform") is UniformConfig
    assert config_class("lsq") is LSQConfig
    assert config_class("temporal_lsq") is TemporalLSQConfig
    assert config_class("binary") is BinaryConfig
    assert config_class("sign_act") is SignActConfig
    assert config_class("dynamic_token") is DynamicTokenConfig
    assert QUANTIZERS.names() == ["binary", "dynamic_token", "lsq", "sign_act", "temporal_lsq", "uniform"]
    assert type(build_quantizer(BinaryConfig(), num_channels=3)) is BinaryQuantizer
    with pytest.raises(KeyError, match=r"unknown quantizer 'adaround'; known: \['binary', 'dynamic_token', 'lsq', "
                                       r"'sign_act', 'temporal_lsq', 'uniform'\]"):
        config_class("adaround")
    with pytest.raises(KeyError, match="known: "):
        QUANTIZERS.get("nope")


# -- binary quantizer -------------------------------------------------------------------------------------------------
BIN_SHAPE = (4, 3, 2, 2)  # a conv weight: one scale per output channel and basis


def _binary(num_bases: int, granularity: str = "channel", shape: tuple[int, ...] = BIN_SHAPE,
            learn_scale: bool = True):
    cfg = BinaryConfig(num_bases=num_bases, granularity=granularity, learn_scale=learn_scale)
    return build_quantizer(cfg, num_channels=shape[0], channel_axis=0)


def _sign(a: np.ndarray) -> np.ndarray:
    return np.where(a >= 0, 1.0, -1.0)  # sign(0) = +1


def _binary_reference(w: np.ndarray, num_bases: int, granularity: str) -> tuple[np.ndarray, np.ndarray]:
    """``(scales, Q(w))`` by hand in float64: s_k = mean |r_k| (per output channel or over the tensor),
    Q = sum_k s_k sign(r_k), r_{k+1} = r_k - s_k sign(r_k)."""
    r = w.astype(np.float64)
    axes = tuple(range(1, w.ndim)) if granularity == "channel" else None
    out, scales = np.zeros_like(r), []
    for _ in range(num_bases):
        s = np.abs(r).mean(axis=axes, keepdims=True)
        b = _sign(r)
        out, r = out + s * b, r - s * b
        scales.append(s.reshape(-1) if granularity == "channel" else s.reshape(()))
    return np.stack(scales), out


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("num_bases", [1, 2])
def test_binary_initialisation_and_forward_match_the_hand_reference(num_bases: int, granularity: str) -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(BIN_SHAPE, generator=gen) * torch.tensor([0.1, 1.0, 3.0, 0.5]).view(-1, 1, 1, 1)
    w[0, 0, 0, 0] = 0.0  # sign(0) = +1
    q = _binary(num_bases, granularity)
    assert not bool(q.initialized)
    q.initialize_(w)
    assert bool(q.initialized)
    exp_s, exp_q = _binary_reference(w.numpy(), num_bases, granularity)
    assert tuple(q.scale.shape) == exp_s.shape == ((num_bases, 4) if granularity == "channel" else (num_bases,))
    torch.testing.assert_close(q.scale.detach().double(), torch.from_numpy(exp_s), rtol=1e-6, atol=0)
    out = q(w)
    assert out.dtype == w.dtype and out.shape == w.shape
    torch.testing.assert_close(out.double(), torch.from_numpy(exp_q), rtol=1e-6, atol=1e-7)
    # at most 2^K values per channel, and the first basis carries the sign of w (s_2 < s_1)
    for c in range(BIN_SHAPE[0]):
        assert out[c].unique().numel() <= 2**num_bases
    assert torch.equal(torch.sign(out), torch.where(w >= 0, 1.0, -1.0))
    assert torch.equal(q(torch.zeros(BIN_SHAPE)) > 0, torch.ones(BIN_SHAPE, dtype=torch.bool))


def test_binary_hand_example_maps_zero_to_plus_one_in_every_basis() -> None:
    # row 0: mean |w| = 2; r_1 = w - 2 sign(w) = [0, 0, -2, 2] (sign(0) = +1 twice), s_2 = 1.
    # row 1: mean |w| = 2; r_1 = [-1, -1, 1, -3], s_2 = 1.5. Every value is exact in float32.
    w = torch.tensor([[2.0, -2.0, 0.0, 4.0], [1.0, 1.0, -1.0, -5.0]])
    cases = {
        1: ([[2.0, 2.0]], [[2.0, -2.0, 2.0, 2.0], [2.0, 2.0, -2.0, -2.0]]),
        2: ([[2.0, 2.0], [1.0, 1.5]], [[3.0, -1.0, 1.0, 3.0], [0.5, 0.5, -0.5, -3.5]]),
    }
    for num_bases, (scales, expected) in cases.items():
        q = _binary(num_bases, shape=(2, 4))
        q.initialize_(w)
        assert torch.equal(q.scale.detach(), torch.tensor(scales))
        assert torch.equal(q(w), torch.tensor(expected))


@pytest.mark.parametrize("num_bases", [1, 2])
def test_binary_gradients_match_the_hand_derivation(num_bases: int) -> None:
    """Clipped STE (d sign(r) / dr = [|r| <= 1]) through Q = s_1 b_1 + s_2 b_2, b_1 = sign(w), b_2 = sign(r_1):

    dQ/dw = s_1 [|w| <= 1] + s_2 [|r_1| <= 1] (1 - s_1 [|w| <= 1]),
    dQ/ds_1 = sign(w) (1 - s_2 [|r_1| <= 1]),  dQ/ds_2 = sign(r_1)   (K = 1: s_1 [|w| <= 1] and sign(w)),
    the scale gradients summed over each output channel.
    """
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(BIN_SHAPE, generator=gen) * 1.5  # |w| > 1 and |r_1| > 1 both occur
    upstream = torch.randn(BIN_SHAPE, generator=gen)
    q = _binary(num_bases)
    q.initialize_(w)
    x = w.clone().requires_grad_(True)
    (q(x) * upstream).sum().backward()

    wn, g = w.double().numpy(), upstream.double().numpy()
    s = q.scale.detach().double().numpy()
    s1 = s[0].reshape(-1, 1, 1, 1)
    b1, m1 = _sign(wn), (np.abs(wn) <= 1).astype(np.float64)
    assert 0 < m1.sum() < m1.size
    if num_bases == 1:
        dx, ds = s1 * m1, [b1]
    else:
        s2 = s[1].reshape(-1, 1, 1, 1)
        r1 = wn - s1 * b1
        b2, m2 = _sign(r1), (np.abs(r1) <= 1).astype(np.float64)
        assert 0 < m2.sum() < m2.size and (b2 != b1).any()
        dx = s1 * m1 + s2 * m2 * (1 - s1 * m1)
        ds = [b1 * (1 - s2 * m2), b2]
    torch.testing.assert_close(x.grad.double(), torch.from_numpy(g * dx), rtol=1e-5, atol=1e-6)
    expected = np.stack([(g * d).reshape(BIN_SHAPE[0], -1).sum(axis=1) for d in ds])
    torch.testing.assert_close(q.scale.grad.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


def test_binary_fixed_scales_are_buffers() -> None:
    w = torch.randn(BIN_SHAPE, generator=torch.Generator().manual_seed(6))
    learned, fixed = _binary(2), _binary(2, learn_scale=False)
    learned.initialize_(w)
    fixed.initialize_(w)
    assert isinstance(learned.scale, nn.Parameter) and [n for n, _ in learned.named_parameters()] == ["scale"]
    assert not isinstance(fixed.scale, nn.Parameter) and list(fixed.parameters()) == []
    assert {"scale", "active_bases", "initialized"} == set(fixed.state_dict()) == set(learned.state_dict())
    assert torch.equal(fixed.scale, learned.scale.detach()) and torch.equal(fixed(w), learned(w).detach())


def test_binary_needs_initialisation_channels_and_is_identity_when_disabled() -> None:
    q = _binary(2)
    x = torch.randn(BIN_SHAPE) * 10
    with pytest.raises(RuntimeError, match="BinaryQuantizer is enabled but not initialised"):
        q(x)
    q.enabled = False
    assert torch.equal(q(x), x)
    with pytest.raises(ValueError, match="binary quantizer with granularity 'channel' needs num_channels"):
        build_quantizer(BinaryConfig())


# -- fast paths are chosen per model ----------------------------------------------------------------------------------
def _fast_path_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    qat.prepare(model, QuantSpec(rules=[
        LayerRule(["0", "2"], weight=LSQConfig(n_bits=4, granularity="channel"), act=UniformConfig(n_bits=8)),
        LayerRule(["4"], weight=BinaryConfig(), act=LSQConfig(n_bits=4)),  # a binary quantizer is not affine
    ]))
    qat.calibrate(model, [torch.randn(8, 6, generator=torch.Generator().manual_seed(1))], lambda m, b: m(b))
    return model.eval()


def _affine(model: nn.Module) -> list[AffineQuantizer]:
    return [m for m in model.modules() if isinstance(m, AffineQuantizer)]


def test_set_fast_path_sets_one_model_and_leaves_another_untouched(monkeypatch) -> None:
    a, b = _fast_path_model(), _fast_path_model()
    assert len(_affine(a)) == len(_affine(b)) == 5
    assert all(q.fused and not q.compiled_kernels for q in _affine(a) + _affine(b))  # the defaults
    assert qat.set_fast_path(a, fused=False, compiled_kernels=True) == 5
    assert all(not q.fused and q.compiled_kernels for q in _affine(a))
    assert all(q.fused and not q.compiled_kernels for q in _affine(b))  # no process-wide state
    assert not hasattr(b[4].weight_quantizer, "fused")

    # each call reads its own quantizers' choice; the spy runs the eager math (no compilation in a unit test)
    calls: list[bool] = []
    eager = qat.ste._kernel

    def spy(name: str, compiled: bool = False):
        calls.append(compiled)
        return eager(name, False)

    monkeypatch.setattr(qat.ste, "_kernel", spy)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = b(x)
        assert calls and not any(calls)  # b: fused, eager kernels
        calls.clear()
        composite = a(x)
        assert calls == []  # a: fused=False, the composite round_ste path calls no kernel
        assert qat.set_fast_path(a, fused=True) == 5  # None leaves compiled_kernels as it was
        assert all(q.fused and q.compiled_kernels for q in _affine(a))
        fused = a(x)
        assert calls and all(calls)  # a: fused, compiled kernels requested
        calls.clear()
        assert torch.equal(b(x), ref) and calls and not any(calls)  # b still unchanged
    assert torch.equal(fused, ref)  # same weights, same (eager) math
    torch.testing.assert_close(composite, ref, rtol=1e-6, atol=1e-6)
    assert qat.set_fast_path(nn.Sequential(nn.Linear(2, 2)), fused=False) == 0
