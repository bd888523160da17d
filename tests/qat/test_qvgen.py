"""QVGen: per-token dynamic activations, the auxiliary low-rank branch, its rank decay, student, export and resume.

References are written out by hand: Eq. (1) of :mod:`qat.quantizers.dynamic` token by token (and its gradients
through the composite straight-through form), truncated SVDs with ``torch.linalg.svd``, the rank schedule from
``(1 + cos(pi f)) / 2`` with the step numbers worked out here, and the layer map of the tiny UNet by name.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from qat_testutils import small_unet
from safetensors.torch import load_file
from torch import Tensor, nn

import qat
from qat.methods import Calibration, QVGen, QVGenConfig
from qat.methods.qvgen import decay_ranks, phase_starts, rank_schedule
from qat.nn import QuantConv2d, QuantLinear
from qat.nn.auxiliary import AuxBranchLayer, AuxLowRank, aux_layers
from qat.prepare import quant_layers
from qat.quantizers import DynamicTokenConfig, DynamicTokenQuantizer, LSQConfig, LSQQuantizer, UniformQuantizer
from qat.quantizers.dynamic import timestep_group

EDGES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
FP_LAYERS = ("down_blocks.0.downsamplers.0.conv", "down_blocks.1.resnets.0.conv_shortcut",
             "up_blocks.0.resnets.0.conv_shortcut", "up_blocks.1.resnets.0.conv_shortcut")


def _forward(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    with qat.timestep(m, batch[1]):
        return m(*batch).sample


def _student(cfg: QVGenConfig, model: nn.Module | None = None) -> tuple[QVGen, nn.Module]:
    method = QVGen(cfg)
    student, _ = method.build_student(model or small_unet(), "unet")
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    method.initialize(student, Calibration([(x, torch.tensor([900, 600, 300, 10]))], _forward))
    return method, student


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# -- DynamicTokenQuantizer ------------------------------------------------------------------------------------------

LOWER = [-1.0, 0.0, 1.0, 2.0]  # l_g of groups 0..3
UPPER = [2.0, 1.0, 0.5, -0.5]  # u_g


def _dyn(channel_axis: int, groups: int = 4, bits: int = 4) -> DynamicTokenQuantizer:
    q = DynamicTokenQuantizer(DynamicTokenConfig(n_bits=bits, clip_groups=groups), channel_axis=channel_axis)
    with torch.no_grad():
        q.clip_logits.copy_(torch.tensor([LOWER[:groups], UPPER[:groups]]).T)
    return q


def _token_ref(v: Tensor, lo_ratio: float, hi_ratio: float, bits: int) -> Tensor:
    """Eq. (1) for one token (a vector of channels), float32 scalars."""
    q_max = 2**bits - 1
    hi = torch.tensor(hi_ratio, dtype=torch.float32) * torch.clamp(v.max(), min=0.0)
    lo = torch.tensor(lo_ratio, dtype=torch.float32) * torch.clamp(v.min(), max=0.0)
    s = (hi - lo) / q_max
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(v / s) + z, 0, q_max)
    return s * (q - z)


def _dyn_ref(x: Tensor, groups: list[int], channel_axis: int, bits: int = 4) -> Tensor:
    """Token by token: tokens are ``x[b, n, :]`` (channels last) or ``x[b, :, h, w]`` (channels at axis 1)."""
    out = torch.empty_like(x)
    for b, g in enumerate(groups):
        lo_r, hi_r = _sigmoid(LOWER[g]), _sigmoid(UPPER[g])
        if channel_axis == -1:
            for n in range(x.shape[1]):
                out[b, n] = _token_ref(x[b, n], lo_r, hi_r, bits)
        else:
            for h in range(x.shape[2]):
                for w in range(x.shape[3]):
                    out[b, :, h, w] = _token_ref(x[b, :, h, w], lo_r, hi_r, bits)
    return out


def _composite(x: Tensor, logits: Tensor, groups: list[int], channel_axis: int, bits: int = 4) -> Tensor:
    """Eq. (1) as a composite of differentiable ops with straight-through rounding (the gradient reference)."""
    q_max = 2**bits - 1
    ratio = torch.sigmoid(logits[torch.tensor(groups)])  # (B, 2)
    shape = [len(groups)] + [1] * (x.dim() - 1)
    lo_r, hi_r = ratio[:, 0].reshape(shape), ratio[:, 1].reshape(shape)
    hi = x.amax(dim=channel_axis, keepdim=True).clamp_min(0) * hi_r
    lo = x.amin(dim=channel_axis, keepdim=True).clamp_max(0) * lo_r
    s = (hi - lo) / q_max
    z = -lo / s
    z = z + (torch.round(z) - z).detach()
    v = x / s
    v = v + (torch.round(v) - v).detach()
    return s * (torch.clamp(v + z, 0, q_max) - z)


@pytest.mark.parametrize("channel_axis, shape, t, groups", [
    (-1, (4, 3, 6), [0, 249, 250, 999], [0, 0, 1, 3]),  # linear input (B, N, C): group 2 unused
    (1, (3, 5, 2, 3), [1000, 500, 0], [3, 2, 0]),  # conv input (B, C, H, W): t = 1000 clamps; group 1 unused
])
def test_dynamic_token_forward_and_gradients_against_hand_reference(channel_axis: int, shape: tuple[int, ...],
                                                                     t: list[int], groups: list[int]) -> None:
    q = _dyn(channel_axis)
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 1.5).requires_grad_(True)
    up = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    assert timestep_group(torch.tensor(t), 4, 1000).tolist() == groups  # Eq. (2): floor(t G / T), clamped
    with qat.timestep(q, torch.tensor(t)):
        y = q(x)
    (y * up).sum().backward()
    torch.testing.assert_close(y.detach(), _dyn_ref(x.detach(), groups, channel_axis))

    xr = x.detach().clone().requires_grad_(True)
    logits = q.clip_logits.detach().clone().requires_grad_(True)
    ref = _composite(xr, logits, groups, channel_axis)
    (ref * up).sum().backward()
    torch.testing.assert_close(y.detach(), ref.detach())
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.clip_logits.grad, logits.grad, rtol=1e-4, atol=1e-5)
    used = set(groups)
    for g in range(4):  # only the groups of the batch's timesteps are trained
        assert (q.clip_logits.grad[g].abs().sum() > 0) == (g in used), g
    assert x.grad.abs().sum() > 0


def test_dynamic_token_group_map_and_its_edges() -> None:
    t = torch.tensor([-5, 0, 1, 19, 20, 999, 1000, 2500])
    # G = 50, T = 1000: groups of 20 timesteps; values outside [0, T) go to the first / last group
    assert timestep_group(t, 50, 1000).tolist() == [0, 0, 0, 0, 1, 49, 49, 49]
    assert timestep_group(torch.tensor([0.0, 499.9, 500.0]), 2, 1000).tolist() == [0, 0, 1]
    q = _dyn(-1)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with qat.timestep(q, torch.tensor([999, 0])):
            last = q(x)
        with qat.timestep(q, torch.tensor([1000, 0])):
            clamped = q(x)
        with qat.timestep(q, torch.tensor(999)):  # one timestep for the whole batch
            scalar = q(x)
    assert torch.equal(last, clamped)
    torch.testing.assert_close(last, _dyn_ref(x, [3, 0], -1))
    torch.testing.assert_close(scalar, _dyn_ref(x, [3, 3], -1))


def test_dynamic_token_groups_keep_their_tensor_across_reused_calls() -> None:
    """``reuse=True`` (the trainer's student forward) writes each call's groups into one tensor (CUDA graphs read
    module tensors at fixed addresses), with the values of a fresh call; without reuse every call has its own."""
    model = nn.ModuleDict({"a": _dyn(-1), "b": _dyn(-1)})
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(5))
    seen = []
    with torch.no_grad():
        for t in (torch.tensor([0, 999]), torch.tensor([500, 20])):
            with qat.timestep(model, t, reuse=True), qat.timestep(fresh, t):
                seen.append(model["a"]._group)
                assert model["b"]._group is model["a"]._group  # one tensor for the quantizers of a call
                c = model["a"].config
                assert torch.equal(model["a"]._group, timestep_group(t, c.clip_groups, c.num_train_timesteps))
                for name in ("a", "b"):
                    assert torch.equal(model[name](x), fresh[name](x))
        assert seen[0] is seen[1]
        with qat.timestep(model, torch.tensor([1, 2, 3]), reuse=True):  # another batch size: a new tensor
            assert model["a"]._group is not seen[0] and model["a"]._group.shape == (3,)
        with qat.timestep(model, torch.tensor([0, 999])):
            first = model["a"]._group
        with qat.timestep(model, torch.tensor([0, 999])):
            assert model["a"]._group is not first


def test_dynamic_token_batch_folded_sample_major() -> None:
    q = _dyn(-1)
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(3))  # 2 samples x 2 frames, sample-major
    with torch.no_grad(), qat.timestep(q, torch.tensor([0, 999])):
        y = q(x)
        with pytest.raises(ValueError, match="2 timesteps set for an input of batch 3"):
            q(x[:3])
    torch.testing.assert_close(y, _dyn_ref(x, [0, 0, 3, 3], -1))


def test_dynamic_token_needs_a_timestep_only_with_several_groups() -> None:
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(4))
    with pytest.raises(RuntimeError, match=r"qat\.timestep"):
        _dyn(-1)(x)
    q = _dyn(-1)
    with qat.timestep(q, torch.tensor([10, 10])):
        q(x)
    with pytest.raises(RuntimeError, match="no timestep is set"):  # cleared on leaving the context
        q(x)
    one = _dyn(-1, groups=1)
    torch.testing.assert_close(one(x), _dyn_ref(x, [0, 0], -1))


def test_dynamic_token_config_problems_name_the_field() -> None:
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"^clip_init: must be in \(0, 1\)"):
            DynamicTokenConfig(clip_init=bad)
    with pytest.raises(ValueError, match=r"^n_bits: must be in \[2, 8\]"):
        DynamicTokenConfig(n_bits=1)
    with pytest.raises(ValueError, match=r"^clip_groups: must be >= 1"):
        DynamicTokenConfig(clip_groups=0)
    with pytest.raises(ValueError, match=r"^num_train_timesteps: must be >= 1"):
        DynamicTokenConfig(num_train_timesteps=0)


def test_dynamic_token_ready_when_built_and_state_dict_round_trip() -> None:
    q = DynamicTokenQuantizer(DynamicTokenConfig(n_bits=3, clip_groups=5, clip_init=0.8), channel_axis=1)
    assert bool(q.initialized) and q.clip_logits.shape == (5, 2)
    torch.testing.assert_close(torch.sigmoid(q.clip_logits), torch.full((5, 2), 0.8))
    with torch.no_grad():
        q.clip_logits.uniform_(-2.0, 3.0, generator=torch.Generator().manual_seed(5))
    state = q.state_dict()
    assert set(state) == {"clip_logits", "initialized"}
    other = DynamicTokenQuantizer(DynamicTokenConfig(n_bits=3, clip_groups=5, clip_init=0.8), channel_axis=1)
    other.load_state_dict(state)
    assert torch.equal(other.clip_logits, q.clip_logits) and bool(other.initialized)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([100, 900])
    with torch.no_grad(), qat.timestep(q, t), qat.timestep(other, t):
        assert torch.equal(other(x), q(x))
    q.enabled = False
    assert q(x) is x


# -- AuxLowRank -----------------------------------------------------------------------------------------------------


def _orthonormal(n: int, k: int, seed: int) -> Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))[0]


def _best_rank(e: Tensor, r: int) -> Tensor:
    u, s, vh = torch.linalg.svd(e.double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float()


def test_svd_init_reproduces_an_error_of_rank_below_r0_exactly() -> None:
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    e = (_orthonormal(12, 5, 0) * s) @ _orthonormal(10, 5, 1).T
    aux = AuxLowRank(12, 10, 8)
    with pytest.raises(RuntimeError, match="not initialised"):
        aux.delta()
    aux.initialize_(e)
    torch.testing.assert_close(aux.delta(), e, rtol=0, atol=1e-5)
    # L = U sqrt(S), R = sqrt(S) V^T: L^T L = R R^T = S
    expected = torch.cat([s, torch.zeros(3)])
    torch.testing.assert_close(aux.left.T @ aux.left, torch.diag(expected), rtol=0, atol=1e-5)
    torch.testing.assert_close(aux.right @ aux.right.T, torch.diag(expected), rtol=0, atol=1e-5)
    assert torch.equal(aux.gamma, torch.ones(8)) and int(aux.phase) == 0 and bool(aux.initialized)
    assert aux.effective_rank() == 8


@pytest.mark.parametrize("shape, r0, spectrum", [
    ((12, 10), 3, None),  # exact SVD
    ((40, 36), 4, 0.5),  # min(n, m) > 4 r0: the randomised SVD, on a spectrum 0.5^i
])
def test_svd_init_below_the_rank_is_the_best_rank_r0_approximation(shape: tuple[int, int], r0: int,
                                                                    spectrum: float | None) -> None:
    n, m = shape
    if spectrum is None:
        e = torch.randn(n, m, generator=torch.Generator().manual_seed(2))
    else:
        k = min(n, m)
        e = (_orthonormal(n, k, 3) * spectrum ** torch.arange(k, dtype=torch.float32)) @ _orthonormal(m, k, 4).T
    torch.manual_seed(0)  # svd_lowrank draws its test matrix from the global generator
    aux = AuxLowRank(n, m, r0)
    aux.initialize_(e)
    ref = _best_rank(e, r0)
    torch.testing.assert_close(aux.delta(), ref, rtol=0, atol=1e-5)
    assert (e - aux.delta()).abs().max() > 1e-3  # the truncation dropped something


def _lsq() -> LSQConfig:
    return LSQConfig(n_bits=4, granularity="channel", init="mse", learn_offset=True, grad_scale=True)


def test_branch_on_a_quant_linear_at_full_rank_gives_back_the_float_weight() -> None:
    torch.manual_seed(7)
    lin = nn.Linear(6, 5)
    ql = QuantLinear.from_float(lin, _lsq(), DynamicTokenConfig(clip_groups=1))
    ql.weight_quantizer.initialize_(ql.weight)
    layer = AuxBranchLayer(ql, rank=5)  # r0 >= min(out, in)
    error = layer.quantization_error()
    assert error.abs().max() > 1e-3  # 4-bit weights: a real error to absorb
    layer.aux.initialize_(error)
    assert layer.weight is lin.weight and layer.aux.left.shape == (5, 5) and layer.aux.right.shape == (5, 6)
    torch.testing.assert_close(layer.branch_weight(), lin.weight, rtol=0, atol=1e-5)
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        quantized = layer(x)
        torch.testing.assert_close(quantized, F.linear(ql.act_quantizer(x), lin.weight, lin.bias), rtol=0,
                                   atol=1e-5)
        ql.act_quantizer.enabled = False
        torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=1e-5)
    assert {k.split(".")[0] for k in layer.state_dict()} == {"base_layer", "aux"}
    with pytest.raises(TypeError, match="QuantLinear or QuantConv2d"):
        AuxBranchLayer(lin, rank=2)


@pytest.mark.parametrize("rank", [4, 2])
def test_branch_on_a_quant_conv_reshapes_phi_to_the_weight(rank: int) -> None:
    torch.manual_seed(9)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    qc = QuantConv2d.from_float(conv, _lsq(), DynamicTokenConfig(clip_groups=1))
    qc.weight_quantizer.initialize_(qc.weight)
    layer = AuxBranchLayer(qc, rank=rank)
    assert layer.aux.left.shape == (4, rank) and layer.aux.right.shape == (rank, 27)  # fan-in C_in k_h k_w
    error = layer.quantization_error()
    layer.aux.initialize_(error)
    phi = layer.branch_weight() - qc.quantized_weight()
    ref = _best_rank(error.reshape(4, 27), rank).reshape(4, 3, 3, 3)  # rank 4 = min(4, 27): the whole error
    torch.testing.assert_close(phi, ref, rtol=0, atol=1e-5)
    qc.act_quantizer.enabled = False
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = conv(x) if rank == 4 else F.conv2d(x, qc.quantized_weight() + ref, conv.bias, padding=1)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


# -- rebasis_ -------------------------------------------------------------------------------------------------------


def test_rebasis_keeps_the_product_never_edits_parameters_and_orders_directions() -> None:
    r0, k = 8, 3
    aux = AuxLowRank(12, 10, r0)
    aux.initialize_(torch.randn(12, 10, generator=torch.Generator().manual_seed(11)))
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():  # as after training: L and R no longer orthogonal
        aux.left.add_(0.3 * torch.randn(12, r0, generator=gen))
        aux.right.add_(0.3 * torch.randn(r0, 10, generator=gen))
    aux.gamma.copy_(torch.tensor([1.0] * k + [0.0] * (r0 - k)))
    before = aux.delta()
    left, right = aux.left.detach().clone(), aux.right.detach().clone()

    aux.rebasis_(k)
    assert torch.equal(aux.left, left) and torch.equal(aux.right, right)
    torch.testing.assert_close(aux.delta(), before, rtol=0, atol=1e-5)
    assert int(aux.phase) == 1 and aux.gamma.tolist() == [1.0] * k + [0.0] * (r0 - k)
    assert torch.equal(aux.basis_left[:, k:], torch.zeros(r0, r0 - k))
    assert torch.equal(aux.basis_right[k:], torch.zeros(r0 - k, r0))
    # the new factors are U' sqrt(S') and sqrt(S') V'^T of the product: orthogonal, by decreasing singular value
    le = aux.left @ aux.basis_left[:, :k]
    re = aux.basis_right[:k] @ aux.right
    sv = torch.linalg.svdvals(before.double()).float()[:k]
    assert sv[0] > sv[1] > sv[2] > 1e-2
    torch.testing.assert_close(le.T @ le, torch.diag(sv), rtol=0, atol=1e-4)
    torch.testing.assert_close(re @ re.T, torch.diag(sv), rtol=0, atol=1e-4)
    # so masking the last direction leaves the best rank-2 approximation of the product
    aux.gamma.copy_(torch.tensor([1.0] * 2 + [0.0] * (r0 - 2)))
    rank2 = aux.delta()
    torch.testing.assert_close(rank2, _best_rank(before, 2), rtol=0, atol=1e-5)
    aux.rebasis_(2)
    torch.testing.assert_close(aux.delta(), rank2, rtol=0, atol=1e-5)
    assert int(aux.phase) == 2 and aux.effective_rank() == 2

    aux.rebasis_(0)
    assert torch.equal(aux.delta(), torch.zeros(12, 10))
    assert int(aux.phase) == 3 and aux.effective_rank() == 0
    assert torch.equal(aux.left, left) and torch.equal(aux.right, right)


def test_rebasis_of_a_thin_layer_keeps_more_directions_than_it_has() -> None:
    r0 = 32
    aux = AuxLowRank(8, 72, r0)  # an 8-channel conv (fan-in 72): 8 directions, fewer than the 16 kept
    e = 0.1 * torch.randn(8, 72, generator=torch.Generator().manual_seed(15))  # the scale of a 4-bit error
    aux.initialize_(e)
    torch.testing.assert_close(aux.delta(), e, rtol=0, atol=1e-5)
    aux.gamma.copy_(torch.tensor([1.0] * 16 + [0.0] * 16))
    aux.rebasis_(16)
    torch.testing.assert_close(aux.delta(), e, rtol=0, atol=1e-5)
    assert aux.gamma.tolist() == [1.0] * 16 + [0.0] * 16 and int(aux.phase) == 1
    assert torch.equal(aux.basis_left[:, 8:], torch.zeros(r0, r0 - 8))
    assert torch.equal(aux.basis_right[8:], torch.zeros(r0 - 8, r0))
    aux.gamma.copy_(torch.tensor([1.0] * 4 + [0.0] * 28))  # the next phase keeps the 4 largest directions
    torch.testing.assert_close(aux.delta(), _best_rank(e, 4), rtol=0, atol=1e-5)
    aux.rebasis_(4)
    torch.testing.assert_close(aux.delta(), _best_rank(e, 4), rtol=0, atol=1e-5)


# -- the rank schedule ----------------------------------------------------------------------------------------------


def test_decay_ranks() -> None:
    assert decay_ranks(32, 0.5) == [32, 16, 8, 4, 2, 1]
    assert decay_ranks(8, 0.5) == [8, 4, 2, 1]
    assert decay_ranks(10, 0.25) == [10, 7, 5, 3, 2, 1]  # floor(7.5), floor(5.25), floor(3.75), floor(2.25), ...
    assert decay_ranks(5, 0.1) == [5, 4, 3, 2, 1]  # floor(0.9 r) = r for r < 10: at least one less per phase
    assert decay_ranks(6, 1.0) == [6]
    assert decay_ranks(0, 0.5) == []


def _cos(f: float) -> float:
    return (1 + math.cos(math.pi * f)) / 2


@pytest.mark.parametrize("step, phase, rank, keep, u", [
    (0, 0, 32, 16, _cos(1 / 100)),
    (50, 0, 32, 16, _cos(51 / 100)),
    (99, 0, 32, 16, 0.0),
    (100, 1, 16, 8, _cos(1 / 100)),
    (599, 5, 1, 0, 0.0),
    (600, 6, 0, 0, 0.0),
    (10_000, 6, 0, 0, 0.0),
])
def test_rank_schedule_cosine_at_hand_computed_steps(step: int, phase: int, rank: int, keep: int, u: float) -> None:
    ranks = [32, 16, 8, 4, 2, 1]
    assert phase_starts(600, 6) == [0, 100, 200, 300, 400, 500, 600]
    now = rank_schedule(step, 600, ranks)
    assert (now.phase, now.rank, now.keep) == (phase, rank, keep)
    assert now.u == pytest.approx(u, abs=1e-12)


def test_rank_schedule_linear_and_zero_on_the_last_step_of_every_phase() -> None:
    ranks = [32, 16, 8, 4, 2, 1]
    for end in (99, 199, 299, 399, 499, 599):
        assert rank_schedule(end, 600, ranks).u == 0.0 and rank_schedule(end, 600, ranks, "linear").u == 0.0
        assert rank_schedule(end + 1, 600, ranks).phase == rank_schedule(end, 600, ranks).phase + 1
    assert rank_schedule(50, 600, ranks, "linear").u == pytest.approx(1 - 51 / 100)
    assert rank_schedule(250, 600, ranks, "linear").u == pytest.approx(1 - 51 / 100)
    # uneven phases: round(i 13 / 6) = 0, 2, 4, 6 (6.5 to even), 9, 11, 13
    starts = phase_starts(13, 6)
    assert starts == [0, 2, 4, 6, 9, 11, 13]
    for annealing in ("cosine", "linear"):
        for i in range(6):
            for step in range(starts[i], starts[i + 1]):
                now = rank_schedule(step, 13, ranks, annealing)
                assert now.phase == i and now.rank == ranks[i]
                assert (now.u == 0.0) == (step == starts[i + 1] - 1), (annealing, step)  # exactly 0 at the end
        assert rank_schedule(7, 13, ranks, annealing).u == pytest.approx(
            _cos(2 / 3) if annealing == "cosine" else 1 / 3)
    assert rank_schedule(0, 10, []).rank == 0


# -- the QVGen student ----------------------------------------------------------------------------------------------


def test_student_layer_map_branches_on_the_main_layers_only() -> None:
    model = small_unet()
    method = QVGen(QVGenConfig(clip_groups=4))
    student, report = method.build_student(model, "unet")
    assert method.ranks == [32, 16, 8, 4, 2, 1]
    branches = aux_layers(student)
    # down 0: conv1, time_emb_proj, conv2 (3); down 1: q, k, v, out + a ResBlock (7); mid: 2 ResBlocks + attention
    # (10); up 0: 2 ResBlocks, 2 attentions, upsampler (15); up 1: 2 ResBlocks (6)
    assert len(branches) == 41
    assert "auxiliary branches: 41 layers, ranks per phase 32 -> 16 -> 8 -> 4 -> 2 -> 1 -> 0" in report
    for name in ("down_blocks.0.resnets.0.conv1", "down_blocks.1.attentions.0.to_q",
                 "mid_block.resnets.0.time_emb_proj", "up_blocks.0.upsamplers.0.conv",
                 "up_blocks.0.attentions.1.to_out.0"):
        layer = branches[name]
        assert isinstance(layer.base_layer.weight_quantizer, LSQQuantizer), name
        assert isinstance(layer.base_layer.act_quantizer, DynamicTokenQuantizer), name
        assert layer.aux.rank0 == 32 and layer.base_layer.act_quantizer.config.clip_groups == 4
    for name in EDGES:  # W8A8 static, no branch
        layer = student.get_submodule(name)
        assert type(layer) in (QuantLinear, QuantConv2d), name
        assert isinstance(layer.weight_quantizer, UniformQuantizer) and layer.weight_quantizer.config.n_bits == 8
        assert isinstance(layer.act_quantizer, UniformQuantizer) and layer.act_quantizer.config.n_bits == 8
    for name in FP_LAYERS:
        assert type(student.get_submodule(name)) in (nn.Conv2d, nn.Linear), name
    assert all(p.requires_grad for p in student.parameters())
    assert not quant_layers(model) and not aux_layers(model)  # the teacher is untouched


def test_initialize_sets_phi_to_the_weights_quantization_error() -> None:
    _, student = _student(QVGenConfig(clip_groups=4))
    for name, layer in aux_layers(student).items():
        assert bool(layer.aux.initialized), name
        # every layer here has min(out, fan-in) <= 16 < r0 = 32: Q_w(W) + Phi is W itself
        torch.testing.assert_close(layer.branch_weight(), layer.weight, rtol=0, atol=1e-5)
    for name in EDGES:
        assert bool(student.get_submodule(name).act_quantizer.initialized), name


def _gamma(keep: int, rank: int, u: float, r0: int = 32) -> Tensor:
    return torch.tensor([1.0] * keep + [u] * (rank - keep) + [0.0] * (r0 - rank))


# max_steps 12, six phases of two steps: u = (1 + cos(pi / 2)) / 2 = 0.5 on the first step, 0 on the second
SCHEDULE = {0: (16, 32, 0.5), 1: (16, 32, 0.0), 2: (8, 16, 0.5), 3: (8, 16, 0.0), 4: (4, 8, 0.5), 5: (4, 8, 0.0),
            6: (2, 4, 0.5), 7: (2, 4, 0.0), 8: (1, 2, 0.5), 9: (1, 2, 0.0), 10: (0, 1, 0.5), 11: (0, 1, 0.0)}


def test_schedule_convert_and_export_on_a_tiny_unet(tmp_path) -> None:
    method, student = _student(QVGenConfig(clip_groups=4))
    early = copy.deepcopy(student)  # Phi at its initialisation
    branches = list(aux_layers(student).values())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(13))
    t = torch.tensor([870, 120])
    previous = None
    for step in range(12):
        keep, rank, u = SCHEDULE[step]
        logged = method.on_train_step(student, step, 12)
        assert logged["aux_rank"] == rank and logged["aux_decay_factor"] == pytest.approx(u, abs=1e-12)
        if step % 2 == 0 and previous is not None:  # a boundary: the survivors' product is unchanged
            for layer, old in zip(branches, previous):
                layer.aux.gamma.copy_(_gamma(rank, rank, 1.0))
                torch.testing.assert_close(layer.aux.delta(), old, rtol=0, atol=1e-5)
            assert method.on_train_step(student, step, 12) == logged  # again: no second re-decomposition
        for layer in branches:
            torch.testing.assert_close(layer.aux.gamma, _gamma(keep, rank, u), rtol=0, atol=1e-7)
            assert int(layer.aux.phase) == step // 2
        previous = [layer.aux.delta() for layer in branches]
    for layer in branches:
        assert torch.equal(layer.aux.delta(), torch.zeros_like(layer.aux.delta()))
    with torch.no_grad():
        expected = _forward(student, (x, t))

    with pytest.warns(UserWarning, match="had not decayed to zero"):
        method.convert(early)

    out = qat.export_quantized(student, tmp_path / "qvgen", convert_fn=method.convert)
    tensors = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert not [k for k in tensors if "aux" in k or "base_layer" in k]
    name = "down_blocks.0.resnets.0.conv1"
    assert f"{name}.weight.packed" in tensors and f"{name}.weight" not in tensors
    assert torch.equal(tensors[f"{name}.act_quantizer.clip_logits"],
                       branches[0].base_layer.act_quantizer.clip_logits.detach())
    loaded = qat.load_quantized(out)
    with torch.no_grad():
        assert (_forward(loaded, (x, t)) - expected).abs().max() == 0

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = method.convert(student)
    assert converted is student
    assert not [m for m in student.modules() if isinstance(m, (AuxBranchLayer, AuxLowRank))]
    assert not [k for k in student.state_dict() if "aux" in k or "base_layer" in k]
    assert type(student.get_submodule(name)) is QuantConv2d
    assert not any(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        assert torch.equal(_forward(student, (x, t)), expected)


def test_aux_rank_zero_is_the_lsq_baseline_without_branches() -> None:
    method = QVGen(QVGenConfig(aux_rank=0, clip_groups=4))
    student, report = method.build_student(small_unet(), "unet")
    assert method.ranks == [] and "none (LSQ QAT baseline)" in report and "no auxiliary branch" in method.describe()
    assert not [m for m in student.modules() if isinstance(m, (AuxBranchLayer, AuxLowRank))]
    layer = student.get_submodule("down_blocks.1.attentions.0.to_q")
    assert type(layer) is QuantLinear and isinstance(layer.act_quantizer, DynamicTokenQuantizer)
    assert isinstance(layer.weight_quantizer, LSQQuantizer)
    assert method.on_train_step(student, 0, 12) == {}
    assert "aux_lowrank" not in [g["name"] for g in method.param_groups(student)]


def test_param_groups_separate_the_parameter_kinds_with_their_lrs() -> None:
    cfg = QVGenConfig(clip_groups=4, lr=1e-3, weight_quantizer_lr=2e-3, aux_lr=3e-3, clip_lr=4e-2, weight_decay=0.05)
    method, student = _student(cfg)
    groups = {g["name"]: g for g in method.param_groups(student)}
    assert {n: (g["lr"], g["weight_decay"]) for n, g in groups.items()} == {
        "weights": (1e-3, 0.05), "weight_quantizers": (2e-3, 0.0), "aux_lowrank": (3e-3, 0.05),
        "act_clips": (4e-2, 0.0)}
    branches = aux_layers(student).values()
    clips = {id(layer.base_layer.act_quantizer.clip_logits) for layer in branches}
    wq = {id(p) for layer in branches for p in (layer.base_layer.weight_quantizer.step,
                                                 layer.base_layer.weight_quantizer.zero_point)}
    aux = {id(p) for layer in branches for p in (layer.aux.left, layer.aux.right)}
    trainable = [p for p in student.parameters() if p.requires_grad]
    weights = {id(p) for p in trainable} - clips - wq - aux
    assert len(clips) == 41 and len(wq) == 82 and len(aux) == 82
    assert id(student.conv_in.weight) in weights and id(next(iter(branches)).weight) in weights
    for name, expected in (("act_clips", clips), ("weight_quantizers", wq), ("aux_lowrank", aux),
                           ("weights", weights)):
        ids = [id(p) for p in groups[name]["params"]]
        assert len(ids) == len(set(ids)) and set(ids) == expected, name
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)


# -- resume across a rank change ------------------------------------------------------------------------------------

STEPS = 6  # aux_rank 4: ranks 4, 2, 1 over phases [0, 2), [2, 4), [4, 6)
RESUME_CFG = dict(aux_rank=4, clip_groups=4, lr=1e-3, weight_quantizer_lr=1e-3, aux_lr=1e-2, clip_lr=1e-2)


def _batches() -> list[tuple[Tensor, Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(14)
    return [(torch.randn(2, 3, 8, 8, generator=gen), torch.randint(0, 1000, (2,), generator=gen),
             torch.randn(2, 3, 8, 8, generator=gen)) for _ in range(STEPS)]


def _optimizer(method: QVGen, student: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(method.param_groups(student), betas=(0.9, 0.95))


def _train(method: QVGen, student: nn.Module, opt: torch.optim.Optimizer, steps: range, batches: list,
           saves: dict[int, tuple[dict, dict] | None] | None = None) -> None:
    for step in steps:
        method.on_train_step(student, step, STEPS)
        x, t, target = batches[step]
        opt.zero_grad()
        F.mse_loss(_forward(student, (x, t)), target).backward()
        opt.step()
        if saves is not None and step in saves:
            saves[step] = (copy.deepcopy(student.state_dict()), copy.deepcopy(opt.state_dict()))


def _resumed(model: nn.Module, saved: tuple[dict, dict], start: int, batches: list,
             load_optimizer: bool = True) -> nn.Module:
    method = QVGen(QVGenConfig(**RESUME_CFG))
    student, _ = method.build_student(model, "unet")
    student.load_state_dict(saved[0])  # no initialize: the checkpoint restores everything
    opt = _optimizer(method, student)
    if load_optimizer:
        opt.load_state_dict(saved[1])
    _train(method, student, opt, range(start, STEPS), batches)
    return student


def test_resume_across_a_rank_change_matches_the_straight_run() -> None:
    model = small_unet()
    batches = _batches()
    method, student = _student(QVGenConfig(**RESUME_CFG), model)
    initial = copy.deepcopy(student.state_dict())
    # saved after step 1 (the next step starts phase 1) and after step 2 (the first step of phase 1)
    saves: dict[int, tuple[dict, dict] | None] = {1: None, 2: None}
    _train(method, student, _optimizer(method, student), range(STEPS), batches, saves)
    final = student.state_dict()
    assert any(not torch.equal(final[k], initial[k]) for k in final if k.endswith("aux.left"))
    assert int(saves[1][0]["down_blocks.0.resnets.0.conv1.aux.phase"]) == 0
    assert int(saves[2][0]["down_blocks.0.resnets.0.conv1.aux.phase"]) == 1
    for k in (1, 2):
        state = _resumed(model, saves[k], k + 1, batches).state_dict()
        assert set(state) == set(final)
        for key in final:
            assert torch.equal(state[key], final[key]), (k, key)
        assert int(state["down_blocks.0.resnets.0.conv1.aux.phase"]) == 2
    # the comparison can fail: the same resume with a fresh optimizer ends elsewhere
    other = _resumed(model, saves[1], 2, batches, load_optimizer=False).state_dict()
    assert any(not torch.equal(other[k], final[k]) for k in final)
