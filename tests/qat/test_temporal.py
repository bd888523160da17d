"""Temporal LSQ (EfficientDM's TALSQ): per-sample timesteps, the explicit-timestep API and the timestep grid."""

from __future__ import annotations

import copy

import pytest
import torch
from qat_testutils import ddim_timesteps, naive_fake_quant, tiny_unet
from torch import nn

import qat
from qat.methods.efficientdm import EfficientDMConfig, efficientdm_spec
from qat.quantizers import TemporalLSQConfig, TemporalLSQQuantizer, grid_position
from qat.timestep import TimestepAware, TimestepCall, temporal_quantizers


def make_temporal(num_timesteps: int = 5, granularity: str = "tensor", channels: int = 3, channel_axis: int = 1,
                  learn_offset: bool = True, grad_scale: bool = False, seed: int = 0) -> TemporalLSQQuantizer:
    """An initialised 4-bit temporal quantizer whose table rows all differ."""
    gen = torch.Generator().manual_seed(seed)
    cfg = TemporalLSQConfig(n_bits=4, granularity=granularity, learn_offset=learn_offset, grad_scale=grad_scale,
                            num_timesteps=num_timesteps)
    q = TemporalLSQQuantizer(cfg, num_channels=channels, channel_axis=channel_axis)
    with torch.no_grad():
        q.step.copy_(0.05 + 0.3 * torch.rand(q.step.shape, generator=gen))
        q.zero_point.copy_(torch.randint(0, 16, q.zero_point.shape, generator=gen).float()
                           + (0.6 * torch.rand(q.zero_point.shape, generator=gen) - 0.3 if learn_offset else 0.0))
    q.initialized.fill_(True)
    return q


def _grads(q: TemporalLSQQuantizer) -> list[torch.Tensor]:
    return [p.grad.clone() for p in (q.step, q.zero_point) if isinstance(p, nn.Parameter)]


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("layout", ["conv", "linear"])
@pytest.mark.parametrize("learn_offset,grad_scale", [(True, False), (False, False), (True, True)])
def test_mixed_timestep_batch_equals_per_sample_calls(granularity, layout, learn_offset, grad_scale) -> None:
    torch.manual_seed(0)
    c = 3
    axis = 1 if layout == "conv" else -1
    shape = (4, c, 2, 2) if layout == "conv" else (4, 5, c)
    q_batch = make_temporal(5, granularity, c, axis, learn_offset, grad_scale)
    q_single = copy.deepcopy(q_batch)
    index = torch.tensor([3, 0, 3, 1])  # row 3 twice: its gradient accumulates over two samples
    x = torch.randn(shape) * 2.0
    upstream = torch.randn(shape)

    q_batch.set_timestep_index(index)
    out = q_batch(x)
    (out * upstream).sum().backward()

    for i in range(len(index)):
        q_single.set_timestep_index(int(index[i]))
        out_i = q_single(x[i: i + 1])
        assert torch.equal(out[i: i + 1], out_i)
        (out_i * upstream[i: i + 1]).sum().backward()

    for g_batch, g_single in zip(_grads(q_batch), _grads(q_single)):
        assert torch.count_nonzero(g_batch[[2, 4]]) == 0  # rows that no sample used get no gradient
        assert torch.count_nonzero(g_batch[3]) > 0
        torch.testing.assert_close(g_batch, g_single)


def test_per_sample_index_serves_folded_batches() -> None:
    """A (B,) index also serves a (k*B)-batch folded batch-major (e.g. B samples x heads, repeat_interleave)."""
    q = make_temporal(5)
    x = torch.randn(6, 3, 2, 2) * 2
    q.set_timestep_index(torch.tensor([4, 1, 2]))
    out = q(x)
    for j, row in enumerate([4, 4, 1, 1, 2, 2]):
        q.set_timestep_index(row)
        assert torch.equal(out[j: j + 1], q(x[j: j + 1]))
    q.set_timestep_index(torch.tensor([4, 1, 2, 0]))
    with pytest.raises(ValueError, match="does not fit an input batch of 6"):
        q(x)


def test_no_timestep_set_raises() -> None:
    q = make_temporal(5)
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(RuntimeError, match="no timestep set"):
        q(x)
    q.set_timestep_index(2)
    q(x)
    q.clear_timestep()
    with pytest.raises(RuntimeError, match="no timestep set"):
        q(x)


def test_timestep_index_validation() -> None:
    q = make_temporal(5)
    with pytest.raises(IndexError, match="out of range"):
        q.set_timestep_index(5)
    with pytest.raises(IndexError, match="out of range"):
        q.set_timestep_index(torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="use set_timestep for timestep values"):
        q.set_timestep_index(torch.tensor([1.0, 2.0]))


def test_timestep_context_manager_sets_and_clears() -> None:
    model = nn.ModuleDict({"a": make_temporal(5, seed=1), "b": make_temporal(5, seed=2)})
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 2, 2) * 2
    with qat.timestep(model, 3):  # default grid 0..T-1: timestep value 3 is row 3
        for name in ("a", "b"):
            ref[name].set_timestep_index(3)
            assert torch.equal(model[name](x), ref[name](x))
            ref[name].set_timestep_index(2)
            assert not torch.equal(model[name](x), ref[name](x))
    for name in ("a", "b"):
        with pytest.raises(RuntimeError, match="no timestep set"):
            model[name](x)
    # Cleared on the way out of an exception as well.
    with pytest.raises(KeyError), qat.timestep(model, torch.tensor([0, 4])):
        raise KeyError("boom")
    with pytest.raises(RuntimeError, match="no timestep set"):
        model["a"](x)
    with qat.timestep_index(model, torch.tensor([0, 4])):
        ref["a"].set_timestep_index(torch.tensor([0, 4]))
        assert torch.equal(model["a"](x), ref["a"](x))
    with pytest.raises(RuntimeError, match="no timestep set"):
        model["a"](x)


def _ddim100_quantizer() -> TemporalLSQQuantizer:
    q = make_temporal(100, channels=1, seed=3)
    q.set_grid(ddim_timesteps(100))
    return q


def test_ddim100_grid_is_stored_ascending() -> None:
    q = _ddim100_quantizer()
    assert q.timesteps.tolist() == [float(t) for t in range(1, 1000, 10)]  # 1, 11, ..., 991
    with pytest.raises(ValueError, match="grid has 20 timesteps, the table has 100"):
        q.set_grid(ddim_timesteps(20))


@pytest.mark.parametrize("steps", [20, 50])
def test_nested_ddim_grids_map_exactly_onto_rows(steps: int) -> None:
    q = _ddim100_quantizer()
    ts = ddim_timesteps(steps)
    # By hand: DDIM-n timesteps are k * (1000 // n) + 1, and 1000 // n is a multiple of 10 for n = 20 and 50, so
    # every timestep t is on the DDIM-100 grid, at row (t - 1) / 10.
    assert all((int(t) - 1) % 10 == 0 for t in ts)
    rows = torch.tensor([(int(t) - 1) // 10 for t in ts])
    lo, hi, w = grid_position(q.timesteps, ts)
    assert torch.equal(lo, rows) and torch.count_nonzero(w) == 0
    x = torch.randn(len(ts), 1, 4) * 3
    q.set_timestep(ts)  # per-sample timestep values
    out = q(x)
    q.set_timestep_index(rows)
    assert torch.equal(out, q(x))
    for i, t in enumerate(ts.tolist()):  # scalar timestep values too
        q.set_timestep(t)
        out_t = q(x[i: i + 1])
        q.set_timestep_index(int(rows[i]))
        assert torch.equal(out_t, q(x[i: i + 1]))


def _hand_position(t: int) -> tuple[int, int, float]:
    """DDIM-100 rows around timestep t, by hand: rows r at 10 r + 1; beyond 991 clamps to row 99."""
    if t >= 991:
        return 99, 99, 0.0
    lo = (t - 1) // 10
    return lo, lo + 1, ((t - 1) % 10) / 10.0


def test_hand_positions_for_examples() -> None:
    q = _ddim100_quantizer()
    # 250-step grid: t = 985 lies between 981 (row 98) and 991 (row 99): w = (985 - 981) / 10 = 0.4.
    # 30-step grid: t = 958 lies between 951 (row 95) and 961 (row 96): w = 0.7. t = 34: rows 3 (31), 4 (41), w 0.3.
    lo, hi, w = grid_position(q.timesteps, torch.tensor([985, 958, 34, 997, 1]))
    assert lo.tolist() == [98, 95, 3, 99, 0]
    assert hi.tolist()[:3] == [99, 96, 4]
    torch.testing.assert_close(w, torch.tensor([0.4, 0.7, 0.3, 0.0, 0.0]))


@pytest.mark.parametrize("steps", [250, 30])
def test_non_nested_grids_interpolate_linearly(steps: int) -> None:
    q = _ddim100_quantizer()
    ts = ddim_timesteps(steps)
    on_grid = [int(t) for t in ts if (int(t) - 1) % 10 == 0 and int(t) <= 991]
    assert len(on_grid) < len(ts)  # the grid does not nest
    table_s = q.step.detach().double()  # (100,): per-tensor rows
    table_z = q.zero_point.detach().double()
    exp_s, exp_z = [], []
    for t in ts.tolist():
        lo, hi, w = _hand_position(int(t))
        exp_s.append((1 - w) * table_s[lo] + w * table_s[hi])
        exp_z.append((1 - w) * table_z[lo] + w * table_z[hi])
    exp_s, exp_z = torch.stack(exp_s).float(), torch.stack(exp_z).float()
    lo, hi, w = grid_position(q.timesteps, ts)
    torch.testing.assert_close(w.double(), torch.tensor([_hand_position(int(t))[2] for t in ts], dtype=torch.double))

    torch.manual_seed(0)
    x = torch.randn(len(ts), 16) * 2
    q.set_timestep(ts)
    out = q(x)
    expected = torch.cat([naive_fake_quant(x[i], exp_s[i], exp_z[i], 0, 15) for i in range(len(ts))]).view_as(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Interpolation happens between *neighbouring* rows only: the 250-step timesteps beyond 991 use row 99.
    if steps == 250:
        q.set_timestep(997)
        out_997 = q(x[:1])
        q.set_timestep_index(99)
        assert torch.equal(out_997, q(x[:1]))


def test_interpolated_rows_receive_weighted_gradients() -> None:
    q = _ddim100_quantizer()
    q.set_timestep(985)  # rows 98 and 99 with weights 0.6 and 0.4
    x = torch.randn(1, 1, 64) * 2
    q(x).sum().backward()
    nz = torch.nonzero(q.step.grad.flatten()).flatten().tolist()
    assert nz == [98, 99]
    torch.testing.assert_close(q.step.grad.flatten()[98] * 0.4, q.step.grad.flatten()[99] * 0.6)


def test_state_dict_round_trip_keeps_the_grid() -> None:
    q = _ddim100_quantizer()
    sd = q.state_dict()
    assert {"step", "zero_point", "timesteps", "initialized"} <= set(sd)
    cfg = TemporalLSQConfig(n_bits=4, learn_offset=True, num_timesteps=100)
    fresh = TemporalLSQQuantizer(cfg, num_channels=1, channel_axis=1)
    assert fresh.timesteps.tolist() == list(range(100))  # default grid 0..T-1
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.timesteps, q.timesteps)
    assert bool(fresh.initialized)
    x = torch.randn(3, 1, 8)
    for t in (985, torch.tensor([1, 958, 991])):
        q.set_timestep(t)
        fresh.set_timestep(t)
        assert torch.equal(fresh(x if isinstance(t, torch.Tensor) else x[:1]),
                           q(x if isinstance(t, torch.Tensor) else x[:1]))


@pytest.fixture(scope="module")
def hooked_unet():
    torch.manual_seed(0)
    model, forward, make_batch = tiny_unet()
    qat.prepare(model, efficientdm_spec(EfficientDMConfig(family="unet", num_timesteps=10, lora_rank=4)))
    grid = ddim_timesteps(10)  # 901, 801, ..., 1
    qat.set_timestep_grid(model, grid)

    def fwd(m, batch):
        with qat.timestep(m, batch[1]):
            return forward(m, batch)

    qat.calibrate(model, [make_batch(grid[[0, 5]])], fwd)
    # Make the table rows differ (calibration without per_timestep writes the same value into every row).
    with torch.no_grad():
        for q in temporal_quantizers(model):
            q.step.mul_(torch.linspace(0.5, 2.0, 10).view(-1, *([1] * (q.step.dim() - 1))))
    return model.eval()


def test_attach_timestep_hook_sets_rows_from_the_forward_call(hooked_unet) -> None:
    model = hooked_unet
    x = torch.randn(2, 3, 8, 8)
    qat.clear_timestep(model)
    with torch.no_grad():
        # References without the hook: rows chosen by hand (t = 901 is row 9 of the ascending grid 1, 101, ..., 901).
        with qat.timestep_index(model, 9):
            out_row9 = model(x, 901).sample
        with qat.timestep_index(model, 0):
            out_row0 = model(x, 901).sample
        with qat.timestep_index(model, torch.tensor([9, 0])):
            out_mixed_ref = model(x, torch.tensor([901, 1])).sample
        with pytest.raises(RuntimeError, match="no timestep set"):
            model(x, 901)
        handle = qat.attach_timestep_hook(model)
        try:
            out_pos = model(x, 901).sample  # positional timestep
            out_kw = model(x, timestep=901).sample  # keyword timestep
            out_mixed = model(x, torch.tensor([901, 1])).sample
        finally:
            handle.remove()
        qat.clear_timestep(model)
        with pytest.raises(RuntimeError, match="no timestep set"):
            model(x, 901)
    assert torch.equal(out_pos, out_row9)
    assert torch.equal(out_kw, out_row9)
    assert not torch.equal(out_row0, out_row9)
    assert torch.equal(out_mixed, out_mixed_ref)


class TimestepScale(nn.Module):
    """Not a quantizer: scales its input by a factor looked up per timestep value (the :class:`TimestepAware`
    protocol only; no table grid, no ``set_timestep_index``)."""

    def __init__(self, table: dict[int, float]) -> None:
        super().__init__()
        self.table = table
        self.scale: torch.Tensor | None = None
        self.calls: list[TimestepCall | None] = []

    def set_timestep(self, t: torch.Tensor, call: TimestepCall | None = None) -> None:
        self.calls.append(call)
        t = torch.as_tensor(t)
        self.scale = torch.tensor([self.table[int(v)] for v in t.flatten().tolist()]).reshape(t.shape)

    def clear_timestep(self) -> None:
        self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            raise RuntimeError("TimestepScale: no timestep set")
        return x * self.scale.view(-1, *([1] * (x.dim() - 1))) if self.scale.dim() else x * self.scale


class _ScaledDenoiser(nn.Module):
    """``model(sample, timestep)``: a linear layer, the custom timestep-aware scale, a temporal quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = TimestepScale({1: 0.5, 11: 2.0, 21: -3.0})
        self.quant = make_temporal(3, channels=4, channel_axis=-1, seed=4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        return self.quant(self.scale(self.lin(sample)))


def test_a_custom_timestep_aware_module_gets_the_timestep_like_the_quantizers() -> None:
    """The helpers find timestep-aware modules by protocol, not by class: a module that only implements
    ``set_timestep`` / ``clear_timestep`` receives the timestep from ``qat.timestep`` and from the forward hook."""
    torch.manual_seed(0)
    model = _ScaledDenoiser()
    qat.set_timestep_grid(model, [21, 1, 11])  # the quantizer's rows: 1, 11, 21 (the custom module has no grid)
    assert isinstance(model.scale, TimestepAware) and not isinstance(model.lin, TimestepAware)
    found = qat.timestep_modules(model)
    assert len(found) == 2 and found[0] is model.scale and found[1] is model.quant  # module order
    tq = temporal_quantizers(model)
    assert len(tq) == 1 and tq[0] is model.quant  # only modules with a table grid
    ref_quant = copy.deepcopy(model.quant)
    x = torch.randn(2, 3, 4)

    def expected(scales: list[float], rows: list[int]) -> torch.Tensor:
        with torch.no_grad():
            y = model.lin(x) * torch.tensor(scales).view(-1, 1, 1)
            ref_quant.set_timestep_index(torch.tensor(rows))
            return ref_quant(y)

    with torch.no_grad():
        with qat.timestep(model, 11):
            out_11 = model(x, 11)
            call = model.scale.calls[-1]
            assert isinstance(call, TimestepCall) and not call.reuse and torch.equal(call.t, torch.tensor(11))
        with pytest.raises(RuntimeError, match="no timestep set"):
            model(x, 11)
        assert model.scale.scale is None  # cleared on the way out
        with qat.timestep(model, torch.tensor([1, 21]), reuse=True):
            out_mixed = model(x, torch.tensor([1, 21]))
            assert model.scale.calls[-1].reuse and torch.equal(model.scale.calls[-1].t, torch.tensor([1, 21]))
        assert model.scale.scale is None
        assert torch.equal(out_11, expected([2.0, 2.0], [1, 1]))
        assert torch.equal(out_mixed, expected([0.5, -3.0], [0, 2]))
        assert not torch.equal(out_11, expected([2.0, 2.0], [0, 0]))  # the row does matter

        n_calls = len(model.scale.calls)
        handle = qat.attach_timestep_hook(model)
        try:
            out_pos = model(x, 21)  # positional timestep
            out_kw = model(x, timestep=torch.tensor([11, 1]))  # keyword timestep, per sample
        finally:
            handle.remove()
        assert len(model.scale.calls) == n_calls + 2 and isinstance(model.scale.calls[-1], TimestepCall)
        assert torch.equal(out_pos, expected([-3.0, -3.0], [2, 2]))
        assert torch.equal(out_kw, expected([2.0, 0.5], [1, 0]))
        qat.clear_timestep(model)
        assert model.scale.scale is None
        with pytest.raises(RuntimeError, match="no timestep set"):
            model(x, 21)  # the hook is gone
        assert len(model.scale.calls) == n_calls + 2


def test_adam_momentum_keeps_moving_rows_not_visited_in_a_step() -> None:
    """Pinned decision (style convention 3): unvisited table rows are not frozen.

    After a step that visits row 0, a step that visits only row 1 still moves row 0 through Adam's momentum,
    exactly as in the EfficientDM reference code (its per-step optimizer-state swap was disabled). Rows never
    visited at all stay put, because their moments are zero.
    """
    torch.manual_seed(0)
    q = TemporalLSQQuantizer(TemporalLSQConfig(n_bits=4, num_timesteps=3, learn_offset=True))
    x = torch.randn(64) * 3
    q.initialize_(x)
    opt = torch.optim.AdamW(q.parameters(), lr=1e-2, weight_decay=0.0)
    for row in (0, 1):
        q.set_timestep_index(row)
        before = q.step.detach().clone()
        opt.zero_grad()
        (q(x) - x).pow(2).sum().backward()
        assert q.step.grad[row] != 0 and q.step.grad[2] == 0
        opt.step()
    moved = q.step.detach() - before
    assert moved[0] != 0  # row 0 moved in the step that only visited row 1
    assert moved[2] == 0  # row 2 was never visited


def test_reused_interpolation_weights_keep_their_tensor_and_take_the_new_values() -> None:
    """``reuse=True`` writes each call's weights into one tensor per grid (CUDA graphs read module tensors at fixed
    addresses), with the values of a fresh call; a new shape gets a new tensor; without reuse every call has its
    own."""
    model = nn.ModuleDict({"a": make_temporal(5, seed=1), "b": make_temporal(5, seed=2)})
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 3, 2, 2) * 2
    seen = []
    for t in (torch.tensor([1.0, 3.5]), torch.tensor([4.0, 0.25])):
        with qat.timestep(model, t, reuse=True), qat.timestep(fresh, t):
            seen.append(model["a"]._coef)
            assert model["b"]._coef is model["a"]._coef  # one tensor for the quantizers of a grid
            for name in ("a", "b"):
                assert torch.equal(model[name]._coef, fresh[name]._coef)
                assert torch.equal(model[name](x), fresh[name](x))
    assert seen[0] is seen[1]
    with qat.timestep(model, torch.tensor([1.0, 2.0, 3.0]), reuse=True):
        assert model["a"]._coef is not seen[0] and model["a"]._coef.shape == (3, 5)
    with qat.timestep(model, torch.tensor([1.0, 3.5])):
        first = model["a"]._coef
    with qat.timestep(model, torch.tensor([1.0, 3.5])):
        assert model["a"]._coef is not first


def test_reused_weights_refuse_a_second_forward_before_backward() -> None:
    """The documented limit of ``reuse``: a second call rewrites weights that the first call's backward needs, and
    autograd says so instead of computing a wrong gradient."""
    q = make_temporal(5)
    x = torch.randn(2, 3, 2, 2) * 2
    with qat.timestep(q, torch.tensor([1.5, 2.5]), reuse=True):
        first = q(x).sum()
    with qat.timestep(q, torch.tensor([0.5, 3.5]), reuse=True):
        second = q(x).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (first + second).backward()
