"""PTQ initialisation (``qat.calibrate`` / ``qat.initialize_weight_quantizers``) against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from qat_testutils import naive_fake_quant
from torch import nn

import qat
from qat.prepare import LayerRule, QuantSpec
from qat.quantizers import BinaryConfig, LSQConfig, TemporalLSQConfig, UniformConfig


class TwoLayer(nn.Module):
    def __init__(self, d_in: int = 8, d_hidden: int = 6, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def prepared(weight=None, act=None, seed: int = 0, patterns=("fc1", "fc2")) -> TwoLayer:
    torch.manual_seed(seed)
    model = TwoLayer()
    qat.prepare(model, QuantSpec(rules=[LayerRule(patterns=list(patterns), weight=weight, act=act)]))
    return model


def test_weight_minmax_init_per_channel_matches_hand_computation() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.conv = nn.Conv2d(3, 5, 3)
    model.fc = nn.Linear(8, 4)
    with torch.no_grad():
        model.conv.weight[1] = model.conv.weight[1].abs() + 0.01  # an all-positive channel: range starts at 0
        model.fc.weight[2] = -model.fc.weight[2].abs() - 0.01  # an all-negative channel: range ends at 0
    qat.prepare(model, QuantSpec(rules=[
        LayerRule(patterns=["conv"], weight=UniformConfig(n_bits=4, granularity="channel")),
        LayerRule(patterns=["fc"], weight=LSQConfig(n_bits=3, granularity="channel", signed=True, symmetric=True)),
    ]))
    assert qat.initialize_weight_quantizers(model) == 2
    # conv: unsigned asymmetric 4-bit, s = (max(w, 0) - min(w, 0)) / 15, z = round(-min(w, 0) / s).
    for c, row in enumerate(model.conv.weight.detach().reshape(5, -1).tolist()):
        lo, hi = min(min(row), 0.0), max(max(row), 0.0)
        s = (hi - lo) / 15
        assert model.conv.weight_quantizer.step[c].item() == pytest.approx(s, rel=1e-6)
        assert model.conv.weight_quantizer.zero_point[c].item() == round(-lo / s)
    assert model.conv.weight_quantizer.zero_point[1].item() == 0
    # fc: signed symmetric 3-bit, s = max(|w|) / 3, z = 0.
    for c, row in enumerate(model.fc.weight.detach().tolist()):
        assert model.fc.weight_quantizer.step[c].item() == pytest.approx(max(abs(v) for v in row) / 3, rel=1e-6)
    assert torch.count_nonzero(model.fc.weight_quantizer.zero_point) == 0
    assert bool(model.fc.weight_quantizer.initialized) and bool(model.conv.weight_quantizer.initialized)


def test_weight_minmax_init_per_group() -> None:
    torch.manual_seed(0)
    model = prepared(weight=UniformConfig(n_bits=4, granularity="group", group_size=4), patterns=("fc1",))
    qat.initialize_weight_quantizers(model)
    w = model.fc1.weight.detach()  # (6, 8): two groups of 4 per output channel
    q = model.fc1.weight_quantizer
    assert tuple(q.step.shape) == (6, 2)
    for c in range(6):
        for g in range(2):
            vals = w[c, 4 * g: 4 * g + 4].tolist()
            lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
            assert q.step[c, g].item() == pytest.approx((hi - lo) / 15, rel=1e-6)


def test_binary_quantizers_initialise_from_the_weight_and_the_first_input() -> None:
    """Binary weights: s_1 = mean |W|, s_2 = mean |W - s_1 sign(W)| per output channel. A quantizer without per-row
    statistics (binary activations here) is initialised from the first input it sees."""
    model = prepared(weight=BinaryConfig(num_bases=2), act=BinaryConfig(granularity="tensor"), patterns=("fc1",))
    gen = torch.Generator().manual_seed(1)
    first, second = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen) * 5
    assert qat.calibrate(model, [first, second], lambda m, b: m(b)) == {"weights": 1, "activations": 1}
    w = model.fc1.weight.detach().double().numpy()
    s1 = np.abs(w).mean(axis=1)
    r1 = w - s1[:, None] * np.where(w >= 0, 1.0, -1.0)
    torch.testing.assert_close(model.fc1.weight_quantizer.scale.detach().double(),
                               torch.from_numpy(np.stack([s1, np.abs(r1).mean(axis=1)])), rtol=1e-6, atol=0)
    act = model.fc1.act_quantizer
    assert act.enabled and act.scale.item() == pytest.approx(first.abs().mean().item(), rel=1e-6)
    assert qat.is_initialized(model)


def _ref_fq(x: torch.Tensor, s: float, z: float, q_min: int, q_max: int) -> torch.Tensor:
    return s * (torch.clamp(torch.round(x / s) + z, q_min, q_max) - z)


def test_activation_mse_calibration_picks_a_ratio_not_worse_than_minmax() -> None:
    torch.manual_seed(0)
    model = prepared(act=UniformConfig(n_bits=4, init="mse"), patterns=("fc1",))
    batches = [torch.randn(16, 8) for _ in range(2)]
    batches[0][0, 0] = 9.0  # outliers: min-max wastes most of the 16 levels on them
    batches[1][3, 5] = -6.0
    counts = qat.calibrate(model, batches, lambda m, b: m(b))
    assert counts == {"weights": 0, "activations": 1}
    x = torch.cat(batches).flatten().double()
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    # calibrate keeps (a subsample of) the data plus the exact min and max as two extra columns (documented in
    # qat.calibration._Collector.rows); the search minimises the error on that sample.
    sample = torch.cat([x, torch.tensor([x.min().item(), x.max().item()], dtype=torch.double)])

    def lp_err(data: torch.Tensor, s: float, z: float) -> float:
        return (_ref_fq(data, s, z, 0, 15) - data).abs().pow(2.4).mean().item()

    # The 80 candidate ranges [r * min, r * max], r = 1, 0.99, ..., 0.21, by hand.
    candidates = []
    for i in range(80):
        r = 1.0 - 0.01 * i
        s = (hi - lo) * r / 15
        z = float(round(-lo * r / s))
        candidates.append((lp_err(sample, s, z), s, z))
    best_err, best_s, best_z = min(candidates)
    _, minmax_s, minmax_z = candidates[0]
    q = model.fc1.act_quantizer
    s_q, z_q = q.step.item(), q.zero_point.item()
    assert s_q == pytest.approx(best_s, rel=1e-5) and z_q == best_z
    assert lp_err(sample, s_q, z_q) <= best_err * (1 + 1e-5)
    # Not worse than min-max on the calibration data itself, and clearly better with these outliers.
    assert lp_err(x, s_q, z_q) < 0.9 * lp_err(x, minmax_s, minmax_z)
    assert s_q < 0.95 * minmax_s  # the outliers are clipped


def test_activations_are_calibrated_on_full_precision_inputs() -> None:
    torch.manual_seed(0)
    model = prepared(weight=UniformConfig(n_bits=3, granularity="channel"), act=UniformConfig(n_bits=8))
    model.train()
    x = torch.randn(32, 8)
    qat.calibrate(model, [x], lambda m, b: m(b))
    assert model.training  # mode restored
    assert model.fc1.act_quantizer.enabled and model.fc2.act_quantizer.enabled  # switches restored
    # fc2 sees fc1's output computed with quantized weights and an un-quantized input.
    q1 = model.fc1.weight_quantizer
    w1 = naive_fake_quant(model.fc1.weight, q1.step, q1.zero_point, 0, 7, "channel", 0)
    h = F.linear(x, w1, model.fc1.bias).detach()
    lo, hi = min(h.min().item(), 0.0), max(h.max().item(), 0.0)
    assert model.fc2.act_quantizer.step.item() == pytest.approx((hi - lo) / 255, rel=1e-5)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    assert model.fc1.act_quantizer.step.item() == pytest.approx((hi - lo) / 255, rel=1e-6)


GRID = torch.tensor([1, 11, 21, 31])


def _temporal_model(seed: int = 0) -> TwoLayer:
    model = prepared(act=TemporalLSQConfig(n_bits=4, num_timesteps=4, init="minmax", learn_offset=True),
                     patterns=("fc1",), seed=seed)
    qat.set_timestep_grid(model, GRID)
    return model


def _calib_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    small = torch.randn(4, 8, generator=gen) * 0.1  # t = 1 (row 0): small range
    large = torch.randn(4, 8, generator=gen) * 3 + 1  # t = 21 (row 2): large range
    mixed = torch.cat([torch.randn(1, 8, generator=gen) * 0.1, torch.randn(1, 8, generator=gen) * 3])
    near = torch.full((1, 8), 0.5)
    near[0, 0] = 9.0  # t = 18: interpolated, nearest row 2 (w = 0.7)
    return [(small, torch.tensor(1)), (large, torch.tensor(21)), (mixed, torch.tensor([1, 21])),
            (near, torch.tensor(18))]


def _forward(m, batch):
    with qat.timestep(m, batch[1]):
        return m(batch[0])


def _minmax_step_zero(values: torch.Tensor) -> tuple[float, float]:
    lo, hi = min(values.min().item(), 0.0), max(values.max().item(), 0.0)
    s = (hi - lo) / 15
    return s, float(round(-lo / s))


def test_per_timestep_calibration_fills_rows_seen_and_keeps_global_elsewhere() -> None:
    batches = _calib_batches()
    model = _temporal_model()
    qat.calibrate(model, batches, _forward, per_timestep=True)
    q = model.fc1.act_quantizer
    small, large, mixed, near = (b[0] for b in batches)
    # By hand: row 0 saw `small` and mixed[0]; row 2 saw `large`, mixed[1] and `near`; rows 1, 3 saw nothing.
    row0 = _minmax_step_zero(torch.cat([small.flatten(), mixed[0]]))
    row2 = _minmax_step_zero(torch.cat([large.flatten(), mixed[1], near.flatten()]))
    everything = _minmax_step_zero(torch.cat([b[0].flatten() for b in batches]))
    for row, (s, z) in ((0, row0), (2, row2), (1, everything), (3, everything)):
        assert q.step[row].item() == pytest.approx(s, rel=1e-5)
        assert q.zero_point[row].item() == z
    assert q.step[2].item() > 10 * q.step[0].item()

    flat = _temporal_model()
    qat.calibrate(flat, batches, _forward, per_timestep=False)
    fq = flat.fc1.act_quantizer
    for row in range(4):
        assert fq.step[row].item() == pytest.approx(everything[0], rel=1e-5)
    assert torch.equal(fq.step[1], q.step[1]) and torch.equal(fq.step[3], q.step[3])


def test_per_timestep_calibration_needs_a_timestep() -> None:
    model = _temporal_model()
    with pytest.raises(RuntimeError, match="per-timestep calibration needs a timestep"):
        qat.calibrate(model, [torch.randn(2, 8)], lambda m, b: m(b), per_timestep=True)


def test_force_false_skips_initialised_quantizers() -> None:
    model = prepared(weight=LSQConfig(n_bits=4, granularity="channel"), act=UniformConfig(n_bits=8))
    x = torch.randn(8, 8)
    assert qat.calibrate(model, [x], lambda m, b: m(b)) == {"weights": 2, "activations": 2}
    calibrated = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.fc1.weight_quantizer.step.mul_(3.0)
        model.fc2.act_quantizer.step.mul_(0.5)
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    assert qat.calibrate(model, [x * 10], lambda m, b: m(b)) == {"weights": 0, "activations": 0}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in edited.items())  # nothing re-initialised
    assert qat.initialize_weight_quantizers(model) == 0
    # force=True re-initialises everything (same data: back to the calibrated values).
    assert qat.calibrate(model, [x], lambda m, b: m(b), force=True) == {"weights": 2, "activations": 2}
    for k, v in calibrated.items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_partially_initialised_model_only_initialises_the_rest() -> None:
    model = prepared(weight=LSQConfig(n_bits=4, granularity="channel"), act=UniformConfig(n_bits=8))
    x = torch.randn(8, 8)
    model.fc1.act_quantizer.initialize_(torch.full((2, 8), 4.0))
    assert not qat.is_initialized(model)
    assert qat.calibrate(model, [x], lambda m, b: m(b)) == {"weights": 2, "activations": 1}
    assert model.fc1.act_quantizer.step.item() == pytest.approx(4.0 / 255)  # kept
    assert qat.is_initialized(model)


def test_calibration_that_misses_a_layer_raises() -> None:
    model = prepared(act=UniformConfig(n_bits=8))
    with pytest.raises(RuntimeError, match="calibration never reached 1 quantizers.*fc2.act_quantizer"):
        qat.calibrate(model, [torch.randn(2, 8)], lambda m, b: m.fc1(b))
    assert model.fc1.act_quantizer.enabled and model.fc2.act_quantizer.enabled


def test_subsampling_keeps_the_exact_extremes() -> None:
    model = prepared(act=UniformConfig(n_bits=8), patterns=("fc1",))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 8, generator=gen) for _ in range(4)]
    batches[2][10, 3] = 50.0  # one extreme element among 2048; max_samples keeps only 64 columns
    qat.calibrate(model, batches, lambda m, b: m(b), max_samples=64)
    lo = min(min(b.min().item() for b in batches), 0.0)
    assert model.fc1.act_quantizer.step.item() == pytest.approx((50.0 - lo) / 255, rel=1e-6)
    assert np.isclose(model.fc1.act_quantizer.zero_point.item(), round(-lo / ((50.0 - lo) / 255)))


def test_collector_subsamples_huge_inputs_without_a_full_permutation(monkeypatch) -> None:
    import qat.calibration as calib

    monkeypatch.setattr(calib, "PERMUTE_LIMIT", 1000)  # stand in for a video layer's ~1e8 columns

    def no_randperm(*args, **kwargs):
        raise AssertionError("randperm over every column")

    col = calib._Collector(64, torch.Generator().manual_seed(0))
    rows = torch.arange(5000, dtype=torch.float32).repeat(2, 1)  # (2, 5000)
    monkeypatch.setattr(calib.torch, "randperm", no_randperm)
    col.add(rows)
    out = col.rows()
    assert out.shape == (2, 64 + 2)
    assert torch.equal(out[0], out[1])  # the same columns for every row
    assert out[:, -2:].tolist() == [[0.0, 4999.0], [0.0, 4999.0]]  # exact extremes kept
    assert out[0, :64].unique().numel() > 50  # spread over the input, not one block
