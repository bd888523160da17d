"""Real-kernel runtime (``qat.runtime``): the integer GEMM against an int64 reference, every backend against the fake
reload of exported tiny students, the timestep tables, and the per-layer report.

Tolerances (why each is what it is):

* ``int8`` per layer, on the same input: the integer sum is exact, so the runtime layer and the fake layer differ by
  the fake path's float32 GEMM rounding plus a few roundings of the rescale. The bound is the textbook one for a
  float32 dot product of length ``K`` (any summation order), ``|dy| <= (K + 8) 2^-24 (|Q_a(x)| |Q(W)|^T + |b|)``,
  elementwise, computed here from the fake layer's own dequantized operands.
* ``fp8`` per layer: the same plus the float8_e4m3fn rounding of the centred codes: exact for codes within +-16
  (4-bit grids), at most ``2^-4`` relative per operand otherwise, so ``eps = e_a + e_w + e_a e_w`` is added to the
  factor above.
* end to end (whole models): a last-bit difference of one layer can move a downstream activation across a rounding
  boundary of its quantizer (one code step), and in a tiny random UNet such a flip cascades (measured: one flipped
  code of 3072 moved the output by 1.5% relative L2). The exactness check is therefore the per-layer one on the
  inputs each runtime layer really saw; end to end ``int8`` must stay within 5% relative L2 (measured about 2e-7
  without a flip, up to 2.1e-2 with one) and ``fp8`` on 8-bit codes within 25% (measured 0.11 to 0.12).
* ``int4wo`` against the weight-only reference (the fake reload with its activation quantizers disabled): bit for
  bit, since the dequantized weight is the reloaded ``Q(W)`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from qat_testutils import ddim_timesteps, qrange_ref, tiny_unet, tiny_unet_cond
from torch import nn

import qat
from qat.nn import QuantConv2d, QuantLinear
from qat.prepare import LayerRule, QuantSpec
from qat.quantizers import BinaryConfig, LSQConfig, TemporalLSQConfig, UniformConfig
from qat.quantizers.dynamic import DynamicTokenConfig
from qat.runtime import (
    BACKENDS,
    Float8Layer,
    Int8Layer,
    RuntimeLayer,
    WeightOnlyLayer,
    fp8_matmul,
    int8_matmul,
    load_for_inference,
    pack_int4,
    prepare_int8_weight,
    to_backend,
    unpack_int4,
    zero_point_matmul,
)

U = 2.0**-24  # float32 unit roundoff
E4M3 = 2.0**-4  # float8_e4m3fn: 3 stored mantissa bits, relative rounding error <= 2^-4
SEQ_GRID = torch.tensor([10, 20, 30])
UNET_GRID = ddim_timesteps(10)  # 901, 801, ..., 1
KNOWN = r"\['fake', 'int8', 'fp8', 'int4wo'\]"


# -- helpers ---------------------------------------------------------------------------------------------------------
def _perturb_tables(model: nn.Module, seed: int = 1) -> None:
    """Distinct rows per timestep: steps scaled by 0.7..1.3, zero-points moved by a fraction (kept in the range)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in qat.temporal_quantizers(model):
            q.step.mul_(0.7 + 0.6 * torch.rand(q.step.shape, generator=gen))
            shape = q.zero_point.shape
            moved = q.zero_point + torch.randint(-1, 2, shape, generator=gen) + torch.rand(shape, generator=gen) - 0.5
            q.zero_point.copy_(moved.clamp(q.q_min, q.q_max))


def _export(model: nn.Module, spec: QuantSpec, batches: list, forward: Callable, grid: torch.Tensor,
            out: Path) -> Path:
    """Prepared, calibrated (timestep set per batch), tables perturbed, exported."""
    qat.prepare(model, spec)
    qat.set_timestep_grid(model, grid)

    def timed(m: nn.Module, batch: tuple) -> torch.Tensor:
        with qat.timestep(m, batch[1]):
            return forward(m, batch)

    qat.calibrate(model, batches, timed, max_samples=256)
    _perturb_tables(model)
    model.eval()
    return qat.export_quantized(model, out)


def _magnitude(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``|Q_a(x)| |Q(W)|^T + |b|`` of a fake layer (the scale of its float32 rounding), in the output's layout."""
    xq, w = layer.act_quantizer(x).abs(), layer.weight.abs()
    if isinstance(layer, nn.Conv2d):
        mag = F.conv2d(xq, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return mag if layer.bias is None else mag + layer.bias.abs().reshape(1, -1, 1, 1)
    mag = F.linear(xq, w)
    return mag if layer.bias is None else mag + layer.bias.abs()


def _fp8_eps(layer: nn.Module) -> float:
    """``e_a + e_w + e_a e_w``: e = 0 for grids whose centred codes stay within +-16 (<= 4 bits, zero-point in the
    range), else the e4m3 rounding bound."""
    e_a = 0.0 if layer.act_quantizer.config.n_bits <= 4 else E4M3
    e_w = 0.0 if layer.weight_quantizer.config.n_bits <= 4 else E4M3
    return e_a + e_w + e_a * e_w


def _check_layers_against_fake(rt: nn.Module, fake: nn.Module, run: Callable[[nn.Module], torch.Tensor],
                               t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Runs ``rt``; every runtime layer's output must lie within the rounding bound of the fake layer of the same
    name applied to the same input (see the module docstring). Returns ``rt``'s output and the layers checked."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out)))
               for n, m in rt.named_modules() if isinstance(m, (Int8Layer, Float8Layer))]
    try:
        with torch.no_grad(), qat.timestep(rt, t):
            y = run(rt)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), qat.timestep(fake, t):
        for name, (x, out) in seen.items():
            layer, runtime = fake.get_submodule(name), rt.get_submodule(name)
            ref = layer(x)
            eps = _fp8_eps(layer) if isinstance(runtime, Float8Layer) else 0.0
            tol = (eps + (layer.weight[0].numel() + 8) * U) * _magnitude(layer, x)
            excess = (out - ref).abs() - tol
            assert out.shape == ref.shape and out.dtype == ref.dtype, name
            assert float(excess.max()) <= 0.0, f"{name}: {float(excess.max())} over the bound"
    return y, len(seen)


def _weight_only_reference(fake: nn.Module) -> nn.Module:
    """The fake reload with its activation quantizers switched off: ``f(x, Q(W)) + b``."""
    for layer in qat.quant_layers(fake).values():
        if layer.act_quantizer is not None:
            layer.act_quantizer.enabled = False
    return fake


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- kernels ---------------------------------------------------------------------------------------------------------
GEMM_SHAPES = [(1, 1, 1), (5, 7, 3), (16, 8, 8), (17, 13, 10), (40, 64, 9), (3, 130, 17)]


@pytest.mark.parametrize(("m", "k", "n"), GEMM_SHAPES)
@pytest.mark.parametrize(("bits", "signed"), [(8, False), (8, True), (4, False), (2, True)])
def test_integer_gemm_with_zero_points_is_exact(m: int, k: int, n: int, bits: int, signed: bool) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n + bits)
    q_min, q_max = qrange_ref(bits, signed)
    codes = lambda *shape: torch.randint(q_min, q_max + 1, shape, generator=gen)  # noqa: E731
    q_a, z_a, q_w, z_w = codes(m, k), codes(m, 1), codes(n, k), codes(n)
    # the reference: int64 products of the zero-point-corrected codes, written out without the runtime's algebra
    ref = (q_a - z_a).to(torch.int64) @ (q_w - z_w[:, None]).to(torch.int64).T
    o = q_min + 2 ** (bits - 1)  # centring offset: every code of the grid fits int8
    w_t, w_zero, w_term = prepare_int8_weight(q_w - o, z_w - o)
    assert w_t.dtype == torch.int8 and w_t.shape[0] % 8 == 0 and w_t.shape[1] % 8 == 0  # padded as cuBLAS needs
    acc = zero_point_matmul((q_a - o).to(torch.int8), (z_a - o).to(torch.int32), w_t, w_zero, w_term, n)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc.to(torch.int64), ref)
    # the plain GEMM, unpadded operands
    a, b = (q_a - o).to(torch.int8), (q_w - o).to(torch.int8)
    assert torch.equal(int8_matmul(a, b.T.contiguous()).to(torch.int64),
                       (q_a - o).to(torch.int64) @ (q_w - o).to(torch.int64).T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: cuBLAS's int8 and float8 GEMMs; the CPU "
                    "cases above run the same code path on the CPU kernels")
@pytest.mark.parametrize("m", [1, 8, 16, 17, 23, 24, 31, 33, 256, 300])
def test_integer_and_float8_gemms_are_exact_on_cuda(m: int) -> None:
    """cuBLAS accepts every operand the runtime hands it, and the int8 sum with zero-points is the int64 reference
    bit for bit; so is the float8 one for 4-bit codes (every code within +-16 is exact in e4m3)."""
    gen = torch.Generator().manual_seed(m)
    for k, n in ((13, 10), (72, 96), (1152, 4608)):
        q_a, q_w = torch.randint(0, 256, (m, k), generator=gen), torch.randint(0, 256, (n, k), generator=gen)
        z_a, z_w = torch.randint(0, 256, (m, 1), generator=gen), torch.randint(0, 256, (n,), generator=gen)
        ref = (q_a - z_a) @ (q_w - z_w[:, None]).T
        w_t, w_zero, w_term = (t.cuda() for t in prepare_int8_weight(q_w - 128, z_w - 128))
        acc = zero_point_matmul((q_a - 128).to(torch.int8).cuda(), (z_a - 128).to(torch.int32).cuda(), w_t, w_zero,
                                w_term, n)
        assert torch.equal(acc.cpu().to(torch.int64), ref), (m, k, n)
        d_a, d_w = torch.randint(-16, 17, (m, k), generator=gen), torch.randint(-16, 17, (n, k), generator=gen)
        w8 = F.pad(d_w, (0, -k % 16, 0, -n % 16)).to(torch.float8_e4m3fn).cuda()
        out = fp8_matmul(d_a.float().cuda(), w8.t())[:, :n]
        assert torch.equal(out.cpu(), (d_a @ d_w.T).float()), (m, k, n)


def test_integer_gemm_widens_where_int32_would_overflow() -> None:
    # 8-bit unsigned codes at the range ends with zero-points 0 and 255: za (Sw - K zw) alone exceeds 2^31
    k = 40000
    q_a = torch.full((3, k), 255)
    q_a[1] = 0
    q_w = torch.zeros(4, k, dtype=torch.int64)
    q_w[0] = 255
    z_a, z_w = torch.tensor([[0], [255], [7]]), torch.tensor([255, 0, 255, 3])
    ref = (q_a - z_a) @ (q_w - z_w[:, None]).T
    assert int(ref.abs().max()) >= 2**31
    w_t, w_zero, w_term = prepare_int8_weight(q_w - 128, z_w - 128, wide=True)
    acc = zero_point_matmul((q_a - 128).to(torch.int8), z_a - 128, w_t, w_zero, w_term, 4, wide=True)
    assert acc.dtype == torch.int64 and torch.equal(acc, ref)


def test_kernels_receive_shapes_that_cuda_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU kernels take any shape; cuBLAS's do not. Every operand handed over here already meets the CUDA
    requirements (``_int_mm``: M > 16, M, K and N multiples of 8, contiguous; ``_scaled_mm``: K and N multiples of
    16, second operand column-major), so the same code path runs on a GPU."""
    calls = []
    int_mm, scaled_mm = torch._int_mm, torch._scaled_mm

    def checked_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append("int8")
        assert a.shape[0] > 16 and a.shape[0] % 8 == 0 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0, (
            a.shape, b.shape)
        assert a.is_contiguous() and b.is_contiguous()
        return int_mm(a, b)

    def checked_scaled_mm(a: torch.Tensor, b: torch.Tensor, **kwargs) -> torch.Tensor:
        calls.append("fp8")
        assert a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0 and b.stride(0) == 1, (a.shape, b.shape, b.stride())
        return scaled_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "_int_mm", checked_int_mm)
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm)
    gen = torch.Generator().manual_seed(0)
    for m, k, n in GEMM_SHAPES:
        a, w = (torch.randint(-128, 128, s, generator=gen) for s in ((m, k), (n, k)))
        w_t, w_zero, w_term = prepare_int8_weight(w, torch.zeros(n, dtype=torch.int64))
        acc = zero_point_matmul(a.to(torch.int8), None, w_t, None, w_term, n)
        assert torch.equal(acc.to(torch.int64), a @ w.T)
    x = torch.randn(3, 7, 5, 5)
    with torch.no_grad():
        for backend, layer in (("int8", nn.Conv2d(7, 9, 3, padding=1)), ("fp8", nn.Linear(5, 3))):
            model = nn.Sequential(layer)
            qat.prepare(model, QuantSpec(rules=[LayerRule(["0"], weight=W4C, act=LSQConfig(n_bits=4))]))
            qat.calibrate(model, [x], lambda m, b: m(b))
            model[0].weight.copy_(model[0].weight_quantizer(model[0].weight))  # on the grid, as a reload
            to_backend(model, backend)(x)
    assert calls.count("int8") == len(GEMM_SHAPES) + 1 and calls.count("fp8") == 1


def test_int4_packing_layout_and_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (5, 11), generator=gen, dtype=torch.uint8)
    packed = pack_int4(u)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    # low nibble = even code, high nibble = odd code, the odd tail padded with 0 (numpy, element by element)
    un, pk = u.numpy().astype(int), packed.numpy().astype(int)
    for r in range(5):
        for j in range(6):
            hi = un[r, 2 * j + 1] if 2 * j + 1 < 11 else 0
            assert pk[r, j] == un[r, 2 * j] + 16 * hi
    assert torch.equal(unpack_int4(packed, 11), u)


# -- single layers: each backend against the fake layer --------------------------------------------------------------
W4C, W8C = LSQConfig(n_bits=4, granularity="channel"), LSQConfig(n_bits=8, granularity="channel")
A4T, A8T = (TemporalLSQConfig(n_bits=b, learn_offset=True, num_timesteps=3) for b in (4, 8))
SYM8 = LSQConfig(n_bits=8, signed=True, symmetric=True)
#: name -> (float layer, input shape, weight config, activation config)
LAYER_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], object, object]] = {
    "linear_w8a8_asym_temporal": (lambda: nn.Linear(24, 20), (3, 5, 24), W8C, A8T),
    "linear_w4a4_temporal": (lambda: nn.Linear(30, 9), (4, 30), W4C, A4T),
    "linear_w8a8_signed_symmetric": (lambda: nn.Linear(16, 12), (6, 16),
                                     LSQConfig(n_bits=8, signed=True, symmetric=True, granularity="channel"), SYM8),
    "linear_w4a8_uniform_tensor_no_bias": (lambda: nn.Linear(19, 7, bias=False), (2, 3, 19), UniformConfig(n_bits=4),
                                           LSQConfig(n_bits=8, symmetric=True)),
    "conv1x1_stride2": (lambda: nn.Conv2d(6, 10, 1, stride=2), (2, 6, 7, 5), W4C, A8T),
    "conv3x3_pad1_w4a4": (lambda: nn.Conv2d(5, 12, 3, padding=1), (2, 5, 6, 6), W4C, A4T),
    "conv_dilated_strided_w8a8": (lambda: nn.Conv2d(4, 8, (3, 2), stride=2, padding=(2, 1), dilation=2, bias=False),
                                  (3, 4, 9, 7), W8C, LSQConfig(n_bits=8, learn_offset=True)),
}


@pytest.fixture(scope="module", params=list(LAYER_CASES))
def layer_case(request, tmp_path_factory):
    make, shape, w_cfg, a_cfg = LAYER_CASES[request.param]
    torch.manual_seed(0)
    model = nn.Sequential(make())
    spec = QuantSpec(rules=[LayerRule(["0"], weight=w_cfg, act=a_cfg)])
    t = torch.tensor([10, 25, 30, 17, 20, 12][: shape[0]])  # grid points and interpolated values, per sample
    batches = [(torch.randn(shape) * 2, t), (torch.randn(shape), t.flip(0))]
    out = _export(model, spec, batches, lambda m, b: m(b[0]), SEQ_GRID, tmp_path_factory.mktemp(request.param))
    torch.manual_seed(99)  # the skeletons' random weights must not matter
    return dict(out=out, make=lambda: nn.Sequential(make()), x=torch.randn(shape) * 1.5, t=t, name=request.param)


@pytest.mark.parametrize("backend", ["int8", "fp8"])
def test_gemm_layer_matches_the_fake_layer_within_rounding(layer_case, backend: str) -> None:
    fake = qat.load_quantized(layer_case["out"], model=layer_case["make"]())
    rt = load_for_inference(layer_case["out"], backend, model=layer_case["make"]())
    layer = rt[0]
    assert isinstance(layer, Int8Layer if backend == "int8" else Float8Layer)
    assert rt.runtime_report.on(backend) == ["0"] and rt.runtime_report.fake == {}
    _, checked = _check_layers_against_fake(rt, fake, lambda m: m(layer_case["x"]), layer_case["t"])
    assert checked == 1
    if backend == "int8" and "signed_symmetric" in layer_case["name"]:
        assert not layer.has_a_zero and not layer.has_w_zero  # zero-point terms dropped, not computed
    if backend == "int8" and "asym" in layer_case["name"]:
        assert layer.has_a_zero and layer.has_w_zero


def test_weight_only_layer_is_the_weight_only_reference_bit_for_bit(layer_case) -> None:
    ref = _weight_only_reference(qat.load_quantized(layer_case["out"], model=layer_case["make"]()))
    rt = load_for_inference(layer_case["out"], "int4wo", model=layer_case["make"]())
    assert isinstance(rt[0], WeightOnlyLayer) and torch.equal(rt[0].dequantized_weight(), ref[0].weight)
    bits = ref[0].weight_quantizer.config.n_bits
    k = ref[0].weight[0].numel()
    assert rt[0].packed.dtype == torch.uint8
    assert rt[0].packed.shape[1] == (math.ceil(k / 2) if bits <= 4 else k)  # two codes per byte at <= 4 bits
    with torch.no_grad(), qat.timestep(rt, layer_case["t"]):
        y = rt(layer_case["x"])
        assert torch.equal(y, ref(layer_case["x"]))  # activations NOT quantized: the weight-only model
        fake = qat.load_quantized(layer_case["out"], model=layer_case["make"]())
        with qat.timestep(fake, layer_case["t"]):
            assert not torch.allclose(y, fake(layer_case["x"]))  # ... which is not the trained student's output


def test_runtime_layers_trace_as_one_graph(layer_case) -> None:
    # no data-dependent Python branching and no .item() per call: dynamo captures each layer in full
    for backend in ("int8", "fp8", "int4wo"):
        rt = load_for_inference(layer_case["out"], backend, model=layer_case["make"]())
        torch._dynamo.reset()
        compiled = torch.compile(rt[0], backend="eager", fullgraph=True)
        with torch.no_grad(), qat.timestep(rt, layer_case["t"]):
            assert torch.equal(compiled(layer_case["x"]), rt[0](layer_case["x"]))


# -- exported students: an MLP and tiny diffusers UNets --------------------------------------------------------------
def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 32), nn.SiLU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 5))


def _scheme_spec(w_bits: int, a_bits: int, temporal: bool, num_timesteps: int) -> QuantSpec:
    act = (TemporalLSQConfig(n_bits=a_bits, learn_offset=True, num_timesteps=num_timesteps) if temporal
           else LSQConfig(n_bits=a_bits, learn_offset=True))
    return QuantSpec(rules=[LayerRule(["*"], weight=LSQConfig(n_bits=w_bits, granularity="channel"), act=act)])


@pytest.fixture(scope="module", params=["W8A8", "W4A4"])
def mlp_export(request, tmp_path_factory):
    bits = int(request.param[1])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(64, 12, generator=gen), torch.tensor(t)) for t in (10, 20, 30)]
    out = _export(_mlp(), _scheme_spec(bits, bits, True, 3), batches, lambda m, b: m(b[0]), SEQ_GRID,
                  tmp_path_factory.mktemp(f"mlp_{request.param}"))
    return dict(out=out, scheme=request.param)


@pytest.mark.parametrize("t", [[20], [10, 30, 20, 10], [15, 27, 30, 11]], ids=["grid", "per_sample", "interpolated"])
def test_mlp_backends_against_the_fake_reload(mlp_export, t: list[int]) -> None:
    torch.manual_seed(7)
    x, tt = torch.randn(4, 12), torch.tensor(t if len(t) > 1 else t[0])
    fake = qat.load_quantized(mlp_export["out"], model=_mlp())
    with torch.no_grad(), qat.timestep(fake, tt):
        y_fake = fake(x)
    for backend in ("int8", "fp8"):
        rt = load_for_inference(mlp_export["out"], backend, model=_mlp())
        assert rt.runtime_report.counts() == {backend: 3}
        y, checked = _check_layers_against_fake(rt, fake, lambda m: m(x), tt)
        assert checked == 3
        tol = 0.25 if backend == "fp8" and mlp_export["scheme"] == "W8A8" else 0.05
        assert _rel(y, y_fake) <= tol
    rt = load_for_inference(mlp_export["out"], "int4wo", model=_mlp())
    ref = _weight_only_reference(qat.load_quantized(mlp_export["out"], model=_mlp()))
    with torch.no_grad():
        assert torch.equal(rt(x), ref(x))


UNETS = {"unet": tiny_unet, "unet_cond": tiny_unet_cond}


@pytest.fixture(scope="module", params=[(u, s) for u in UNETS for s in ("W8A8", "W4A4")], ids=lambda p: "-".join(p))
def unet_export(request, tmp_path_factory):
    name, scheme = request.param
    bits = int(scheme[1])
    torch.manual_seed(0)
    model, forward, make_batch = UNETS[name]()
    batches = [make_batch(UNET_GRID[[0, 4]]), make_batch(UNET_GRID[[7, 9]])]
    out = _export(model, _scheme_spec(bits, bits, True, 10), batches, forward, UNET_GRID,
                  tmp_path_factory.mktemp(f"{name}_{scheme}"))
    n_layers = len(qat.quant_layers(model))
    torch.manual_seed(5)
    batch = make_batch(torch.tensor([901, 350]))  # a grid point and an interpolated timestep, per sample
    return dict(out=out, scheme=scheme, forward=forward, batch=batch, n_layers=n_layers)


def test_unet_int8_and_fp8_against_the_fake_reload(unet_export) -> None:
    forward, batch = unet_export["forward"], unet_export["batch"]
    fake = qat.load_quantized(unet_export["out"])
    with torch.no_grad(), qat.timestep(fake, batch[1]):
        y_fake = forward(fake, batch)
    assert float(y_fake.abs().max()) > 0.1  # a real output
    for backend in ("int8", "fp8"):
        rt = load_for_inference(unet_export["out"], backend)
        report = rt.runtime_report
        # every quantized Linear and Conv2d of these UNets (1x1 and 3x3 convs, attention projections) is converted
        assert report.counts() == {backend: unet_export["n_layers"]} and report.fake == {}
        assert sum(isinstance(m, RuntimeLayer) for m in rt.modules()) == unet_export["n_layers"]
        y, checked = _check_layers_against_fake(rt, fake, lambda m: forward(m, batch), batch[1])
        assert checked == unet_export["n_layers"]
        eight_bit_fp8 = backend == "fp8" and unet_export["scheme"] == "W8A8"
        assert _rel(y, y_fake) <= (0.25 if eight_bit_fp8 else 0.05)


def test_unet_int4wo_against_the_weight_only_reference(unet_export) -> None:
    forward, batch = unet_export["forward"], unet_export["batch"]
    rt = load_for_inference(unet_export["out"], "int4wo")
    assert rt.runtime_report.counts() == {"int4wo": unet_export["n_layers"]}
    assert not qat.temporal_quantizers(rt)  # the activation quantizers are gone with the layers they fed
    ref = _weight_only_reference(qat.load_quantized(unet_export["out"]))
    with torch.no_grad():
        assert torch.equal(forward(rt, batch), forward(ref, batch))


def test_unet_timestep_tables_are_followed(unet_export) -> None:
    forward, batch = unet_export["forward"], unet_export["batch"]
    fake = qat.load_quantized(unet_export["out"])
    rt = load_for_inference(unet_export["out"], "int8")
    t1, t2 = torch.tensor(901), torch.tensor(401)  # rows 9 and 4 of the ascending grid
    rows = [q.step[[9, 4]] for q in qat.temporal_quantizers(rt)]
    assert rows and all(not torch.equal(r[0], r[1]) for r in rows)  # the two rows really differ
    outs = {}
    for t in (t1, t2):
        x = (batch[0], t.expand(2), *batch[2:])
        y, _ = _check_layers_against_fake(rt, fake, lambda m, x=x: forward(m, x), t)
        with torch.no_grad(), qat.timestep(fake, t):
            y_fake = forward(fake, x)
        assert _rel(y, y_fake) <= 0.05
        outs[int(t)] = (y, y_fake)
    (y1, f1), (y2, f2) = outs[901], outs[401]
    assert _rel(y1, y2) > 0.05  # another row, another output
    assert _rel(y1, f2) > 3 * _rel(y1, f1)  # and the runtime output at t1 is the fake one at t1, not at t2
    # the sampler-style hook reads the timestep argument and reaches the runtime layers' quantizers
    handle = qat.attach_timestep_hook(rt)
    try:
        with torch.no_grad():
            assert torch.equal(forward(rt, (batch[0], t1.expand(2), *batch[2:])), y1)
    finally:
        handle.remove()
        qat.clear_timestep(rt)


# -- coverage, report, errors ----------------------------------------------------------------------------------------
def _mixed() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0: W4A8 -> int8 / fp8 (im2col)
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # 1: grouped conv
        nn.Conv2d(8, 8, 1),  # 2: binary weights (BinaryDM)
        nn.Flatten(),  # 3
        nn.Linear(8 * 4 * 4, 24),  # 4: per-group weight steps
        nn.Linear(24, 20),  # 5: per-channel activation steps
        nn.Linear(20, 16),  # 6: dynamic per-token activations (QVGen)
        nn.Linear(16, 12),  # 7: weight-only W4
        nn.Linear(12, 10),  # 8: activation-only A8
        nn.Linear(10, 6),  # 9: full precision (not in the spec)
    )


MIXED_SPEC = QuantSpec(rules=[
    LayerRule(["0"], weight=LSQConfig(n_bits=4, granularity="channel"), act=LSQConfig(n_bits=8)),
    LayerRule(["1"], weight=LSQConfig(n_bits=4), act=LSQConfig(n_bits=4)),
    LayerRule(["2"], weight=BinaryConfig(num_bases=2), act=LSQConfig(n_bits=4)),
    LayerRule(["4"], weight=LSQConfig(n_bits=4, granularity="group", group_size=32), act=LSQConfig(n_bits=8)),
    LayerRule(["5"], weight=LSQConfig(n_bits=8), act=LSQConfig(n_bits=8, granularity="channel")),
    LayerRule(["6"], weight=LSQConfig(n_bits=4), act=DynamicTokenConfig(n_bits=4, clip_groups=1)),
    LayerRule(["7"], weight=LSQConfig(n_bits=4, granularity="channel")),
    LayerRule(["8"], act=LSQConfig(n_bits=8)),
])
FAKE_WHY = {  # module -> a phrase of its reason, per backend family
    "1": "grouped convolution", "2": "binary weight quantizer", "4": "per-group weight steps",
    "5": "per-channel activation steps", "6": "dynamic_token activation quantizer", "7": "no activation quantizer",
    "8": "no weight quantizer",
}


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    out = _export(_mixed(), MIXED_SPEC, [(x, torch.tensor(0))], lambda m, b: m(b[0]), SEQ_GRID,
                  tmp_path_factory.mktemp("mixed"))
    return dict(out=out, x=torch.randn(5, 3, 4, 4))


@pytest.mark.parametrize("backend", ["int8", "fp8"])
def test_report_lists_every_layer_left_on_the_fake_path(mixed_export, backend: str) -> None:
    rt = load_for_inference(mixed_export["out"], backend, model=_mixed())
    report = rt.runtime_report
    assert report.backend == backend and report.on(backend) == ["0"]
    assert set(report.fake) == set(FAKE_WHY)  # "9" is full precision: not a quantized layer, not reported
    for name, phrase in FAKE_WHY.items():
        assert phrase in report.fake[name], (name, report.fake[name])
        assert type(rt.get_submodule(name)) in (QuantConv2d, QuantLinear)  # untouched
    assert type(rt[9]) is nn.Linear and isinstance(rt[0], RuntimeLayer)
    text = str(report)
    assert all(name in text for name in FAKE_WHY) and f"requested '{backend}'" in text
    fake = qat.load_quantized(mixed_export["out"], model=_mixed())
    with torch.no_grad():  # the mixed model runs; the converted layer within its bound, the rest unchanged
        y, checked = _check_layers_against_fake(rt, fake, lambda m: m(mixed_export["x"]), torch.tensor(0))
        assert checked == 1 and y.shape == (5, 6)


def test_int4wo_covers_every_affine_weight(mixed_export) -> None:
    rt = load_for_inference(mixed_export["out"], "int4wo", model=_mixed())
    report = rt.runtime_report
    assert report.on("int4wo") == ["0", "1", "4", "5", "6", "7"]  # grouped conv, per-group steps included
    assert set(report.fake) == {"2", "8"}
    assert "binary" in report.fake["2"] and "no weight quantizer" in report.fake["8"]
    ref = _weight_only_reference(qat.load_quantized(mixed_export["out"], model=_mixed()))
    for name in report.on("int4wo"):
        assert torch.equal(rt.get_submodule(name).dequantized_weight(), ref.get_submodule(name).weight), name


def test_attention_matmul_quantizers_stay_fake_and_are_reported(tmp_path) -> None:
    torch.manual_seed(0)
    model, forward, make_batch = tiny_unet()
    spec = QuantSpec(rules=[LayerRule(["*"], weight=LSQConfig(n_bits=8, granularity="channel"),
                                      act=LSQConfig(n_bits=8))],
                     attention_patterns=["*.attentions.*"], attention_act=LSQConfig(n_bits=8, signed=True))
    report = qat.prepare(model, spec)
    qat.calibrate(model, [make_batch(torch.tensor([10, 500]))], forward, max_samples=256)
    model.eval()
    out = qat.export_quantized(model, tmp_path / "attn")
    rt = load_for_inference(out, "int8")
    processors = {f"{n}.processor" for n in report.attention}
    assert processors and set(rt.runtime_report.fake) == processors
    assert all("attention-matmul" in rt.runtime_report.fake[p] for p in processors)
    assert all(isinstance(rt.get_submodule(p), qat.QuantAttnProcessor) for p in processors)
    assert len(rt.runtime_report.on("int8")) == len(report.rows)


def test_fake_backend_changes_nothing_and_reports_every_layer(mlp_export) -> None:
    fake = qat.load_quantized(mlp_export["out"], model=_mlp())
    rt = load_for_inference(mlp_export["out"], "fake", model=_mlp())
    assert not any(isinstance(m, RuntimeLayer) for m in rt.modules())
    assert rt.runtime_report.fake == {n: "backend 'fake' requested" for n in ("0", "2", "4")}
    x = torch.randn(3, 12)
    with torch.no_grad(), qat.timestep(rt, 20), qat.timestep(fake, 20):
        assert torch.equal(rt(x), fake(x))


def test_unknown_backend_names_the_known_ones(mlp_export) -> None:
    assert BACKENDS == ("fake", "int8", "fp8", "int4wo")
    fake = qat.load_quantized(mlp_export["out"], model=_mlp())
    with pytest.raises(ValueError, match=rf"unknown backend 'int3'; known backends: {KNOWN}"):
        to_backend(fake, "int3")
    assert not any(isinstance(m, RuntimeLayer) for m in fake.modules())
    with pytest.raises(ValueError, match=rf"unknown backend 'INT8'; known backends: {KNOWN}"):
        load_for_inference(mlp_export["out"], "INT8", model=_mlp())


def test_models_that_are_not_a_reload_are_refused(tmp_path) -> None:
    torch.manual_seed(0)
    student = _mlp()
    qat.prepare(student, _scheme_spec(4, 4, False, 1))
    qat.calibrate(student, [(torch.randn(16, 12), None)], lambda m, b: m(b[0]))
    with pytest.raises(ValueError, match=r"not on its quantizer's grid"):  # float weights, never exported
        to_backend(student, "int8")
    assert not any(isinstance(m, RuntimeLayer) for m in student.modules())  # nothing swapped
    lora = _mlp()
    qat.prepare(lora, QuantSpec(rules=[LayerRule(["*"], weight=LSQConfig(n_bits=4), act=LSQConfig(n_bits=4),
                                                 lora=True)], lora_rank=2))
    with pytest.raises(ValueError, match=r"unmerged QALoRA adapters"):
        to_backend(lora, "int4wo")


def test_compute_dtype_keeps_the_quantizer_steps_in_float32(mlp_export) -> None:
    torch.manual_seed(3)
    x = torch.randn(6, 12)
    f32 = load_for_inference(mlp_export["out"], "int8", model=_mlp())
    b16 = load_for_inference(mlp_export["out"], "int8", dtype=torch.bfloat16, model=_mlp())
    assert all(q.step.dtype == torch.float32 for q in qat.temporal_quantizers(b16))
    assert all(m.w_scale.dtype == torch.float32 and m.bias.dtype == torch.bfloat16
               for m in b16.modules() if isinstance(m, Int8Layer))
    with torch.no_grad(), qat.timestep(f32, 20), qat.timestep(b16, 20):
        y32, y16 = f32(x), b16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert _rel(y16.float(), y32) <= 0.05  # bfloat16 inter-layer activations (2^-9) and rare code flips


def test_int8_codes_are_the_exported_codes(layer_case) -> None:
    """The int8 weight operand is the export file's codes: decoded here from the packed bytes with numpy."""
    from safetensors.torch import load_file

    rt = load_for_inference(layer_case["out"], "int8", model=layer_case["make"]())
    fake = qat.load_quantized(layer_case["out"], model=layer_case["make"]())
    wq = fake[0].weight_quantizer
    bits, signed = wq.config.n_bits, wq.config.signed
    shape = fake[0].weight.shape
    n, k = shape[0], fake[0].weight[0].numel()
    packed = load_file(str(layer_case["out"] / "diffusion_pytorch_model.safetensors"))["0.weight.packed"]
    stream = np.unpackbits(packed.numpy(), bitorder="little")[: n * k * bits].reshape(n * k, bits).astype(np.int64)
    q = (stream << np.arange(bits)).sum(axis=1).reshape(n, k) + qrange_ref(bits, signed)[0]
    centred = q - (qrange_ref(bits, signed)[0] + 2 ** (bits - 1))
    np.testing.assert_array_equal(rt[0].w_t[:k, :n].T.numpy().astype(np.int64), centred)
    assert not rt[0].w_t[k:].any() and not rt[0].w_t[:, n:].any()  # padding is zero
