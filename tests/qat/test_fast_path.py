"""The fast paths (fused fake quantization, torch.compile) give the reference path's results.

The reference is the composite ``round_ste`` form of every quantizer run eagerly, chosen per model
(``qat.set_fast_path(reference, fused=False)``), so the reference and the fast model live side by side.
Tolerances: the fused backward computes ``dQ/dx`` as a mask (the composite form as ``(g s) / s``), so gradients
agree to float32 rounding (relative 1e-4); forward values are identical.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from qat_testutils import ddim_timesteps, tiny_unet_cond

import qat
from qat.methods.efficientdm import EfficientDM, EfficientDMConfig
from qat.nn.layers import QuantConv2d, QuantLinear
from qat.quantizers import AffineQuantizer, Quantizer


@pytest.fixture
def student() -> Iterator[tuple[torch.nn.Module, object, object, torch.Tensor]]:
    torch.manual_seed(0)
    model, forward, make_batch = tiny_unet_cond()
    method = EfficientDM(EfficientDMConfig(num_timesteps=10, act_init="minmax", lora_rank=4))
    student, _ = method.build_student(model, "unet")
    grid = ddim_timesteps(10)
    qat.set_timestep_grid(student, grid)

    def fwd(m: torch.nn.Module, batch: tuple) -> torch.Tensor:
        with qat.timestep(m, batch[1]):  # the model called (a compiled wrapper walks into its module; a copy: its own)
            return forward(m, batch)

    qat.calibrate(student, [make_batch(grid[torch.randint(0, 10, (4,))]) for _ in range(2)], fwd)
    for name, p in student.named_parameters():  # non-zero adapters, so the LoRA path is exercised too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    yield student, fwd, make_batch, grid


def _loss_and_grads(model: torch.nn.Module, student: torch.nn.Module, fwd, batch) -> tuple[torch.Tensor, dict]:
    student.zero_grad(set_to_none=True)
    out = fwd(model, batch)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _reference(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` on the composite path (every affine quantizer ``fused=False``); ``model`` is untouched."""
    ref = copy.deepcopy(model)
    n = qat.set_fast_path(ref, fused=False)
    assert n == len([m for m in ref.modules() if isinstance(m, Quantizer)]) > 0  # every quantizer is affine
    assert all(m.fused for m in model.modules() if isinstance(m, AffineQuantizer))
    return ref


def _assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_student_equals_the_composite_reference(student) -> None:
    model, fwd, make_batch, grid = student
    batch = make_batch(grid[torch.tensor([0, 3, 3, 9])])  # mixed timesteps
    reference = _reference(model)
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    ref_layers = [m for m in reference.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert any(m._fused_input() for m in layers) and not any(m._fused_input() for m in ref_layers)
    ref = _loss_and_grads(reference, reference, fwd, batch)
    fused = _loss_and_grads(model, model, fwd, batch)
    assert torch.equal(fused[0], ref[0])
    _assert_same(fused, ref)
    # the step tables and the LoRA factors all receive gradients
    assert any("act_quantizer.step" in n for n in fused[1]) and any("lora_A" in n for n in fused[1])


def test_compiled_student_equals_eager_and_compiles_once_for_all_timesteps(student) -> None:
    model, fwd, make_batch, grid = student
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + AOTAutograd: the graph inductor would get
    for rows in ([0, 3, 3, 9], [5, 5, 5, 5], [9, 1, 0, 2]):  # mixed, single, mixed again
        batch = make_batch(grid[torch.tensor(rows)])
        _assert_same(_loss_and_grads(compiled, model, fwd, batch), _loss_and_grads(model, model, fwd, batch))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompilation, no graph break
    assert not torch._dynamo.utils.counters["graph_break"]


def test_regionally_compiled_student_equals_eager(student) -> None:
    """``performance.compile_blocks``: the repeated blocks compiled one by one (aot_eager), the rest eager."""
    from train.models.families import compile_repeated_blocks, family_of

    model, fwd, make_batch, grid = student
    batches = [make_batch(grid[torch.tensor(rows)]) for rows in ([0, 3, 3, 9], [5, 5, 5, 5])]
    eager = [_loss_and_grads(model, model, fwd, b) for b in batches]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    n = compile_repeated_blocks(model, backend="aot_eager")
    regions = [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(regions) == n > 0 and not any(a != b and b.startswith(a + ".") for a in regions for b in regions)
    assert set(family_of(model).repeated_blocks) >= {"ResnetBlock2D", "Transformer2DModel"}
    # every quantized layer of the down / mid / up blocks is inside a compiled region (eager layers cost host time)
    quantized = [name for name, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    inside = [q for q in quantized if any(q.startswith(r + ".") for r in regions)]
    in_blocks = [q for q in quantized if q.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")]
    assert in_blocks and all(q in inside for q in in_blocks)
    for b, ref in zip(batches, eager):
        _assert_same(_loss_and_grads(model, model, fwd, b), ref)
    assert 0 < torch._dynamo.utils.counters["stats"]["unique_graphs"] <= n  # blocks compiled, shared where alike


def test_regional_compilation_keeps_static_shapes(student) -> None:
    """Each shape variant of a block class gets its own static graph: no symbolic sizes (dynamo's automatic dynamic
    shapes would recompile the second variant of a class with them)."""
    from train.models.families import compile_repeated_blocks

    model, fwd, make_batch, grid = student
    symbolic: list[bool] = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        symbolic.append(any(isinstance(i, torch.SymInt) or (isinstance(i, torch.Tensor) and any(
            isinstance(s, torch.SymInt) for s in i.shape)) for i in inputs))
        return gm.forward

    torch._dynamo.reset()
    try:
        compile_repeated_blocks(model, backend=backend)
        _loss_and_grads(model, model, fwd, make_batch(grid[torch.tensor([0, 3, 3, 9])]))
    finally:
        torch._dynamo.reset()
    assert len(symbolic) >= 2 and not any(symbolic)  # several variants, each static


def test_compiled_kernels_give_the_eager_student(student, monkeypatch) -> None:
    """``qat.set_fast_path(model, compiled_kernels=True)``: that model's quantizer math through inductor (C++ here),
    the model eager. Forward values are bit-identical; gradients agree to float32 rounding (the step-size sums may be
    reduced in another order). Another model in the same process stays on the eager kernels."""
    model, fwd, make_batch, grid = student
    batch = make_batch(grid[torch.tensor([0, 3, 3, 9])])
    eager = _loss_and_grads(model, model, fwd, batch)
    fast = copy.deepcopy(model)
    assert qat.set_fast_path(fast, compiled_kernels=True) > 0
    assert all(m.compiled_kernels and m.fused for m in fast.modules() if isinstance(m, AffineQuantizer))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kernels = _loss_and_grads(fast, fast, fwd, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the forward and the backward math compiled
    assert torch.equal(kernels[0], eager[0])
    _assert_same(kernels, eager)
    # the first model, in the same process, still runs the eager kernels: count the compiled kernels' calls
    assert not any(m.compiled_kernels for m in model.modules() if isinstance(m, AffineQuantizer))
    assert qat.ste._kernel("value", False) is qat.ste._fq_value
    assert qat.ste._kernel("value", True) is not qat.ste._fq_value
    calls: list[str] = []
    for name, fn in list(qat.ste._COMPILED.items()):
        monkeypatch.setitem(qat.ste._COMPILED, name, lambda *a, _n=name, _f=fn: calls.append(_n) or _f(*a))
    again = _loss_and_grads(model, model, fwd, batch)
    assert calls == [] and torch.equal(again[0], eager[0])
    _assert_same(again, eager)
    _assert_same(_loss_and_grads(fast, fast, fwd, batch), kernels)
    assert {"value", "backward"} <= set(calls)  # while the fast model's quantizers call them


def test_compiled_kernels_serve_every_weight_shape_with_one_graph() -> None:
    """Weights are parameters, whose shapes dynamo keeps static: passed as such, every layer's weight shape compiled
    a graph of its own and the LDM-4 student hit the recompile limit (then ran eagerly). One graph serves them all."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for rows, cols in ((8, 4), (16, 4), (6, 10), (12, 3)):
            w = torch.nn.Parameter(torch.randn(rows, cols))
            step, zero = torch.nn.Parameter(torch.full((rows, 1), 0.1)), torch.zeros(rows, 1)
            out = qat.ste.fake_quantize_forward(w, step, zero, -8, 7, compiled=True)
            assert torch.equal(out, qat.ste._fq_value(w, step, zero, None, -8, 7))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["conv", "linear", "temporal_linear"])
def test_fused_quantized_layers_equal_the_composed_form_and_keep_only_the_input(kind: str, autocast: bool) -> None:
    from qat.nn import QuantConv2d, QuantLinear
    from qat.quantizers import LSQConfig, TemporalLSQConfig

    torch.manual_seed(3)
    act = (TemporalLSQConfig(n_bits=4, learn_offset=True, num_timesteps=3) if kind == "temporal_linear"
           else LSQConfig(n_bits=4, learn_offset=True))
    wcfg = LSQConfig(n_bits=4, granularity="channel")
    if kind == "conv":
        layer = QuantConv2d.from_float(torch.nn.Conv2d(6, 5, 3, stride=2, padding=1), wcfg, act)
        x0 = torch.randn(4, 6, 9, 9)
    else:
        layer = QuantLinear.from_float(torch.nn.Linear(6, 5), wcfg, act)
        x0 = torch.randn(4, 7, 6)
    layer.weight_quantizer.initialize_(layer.weight)
    layer.act_quantizer.initialize_(x0)
    if kind == "temporal_linear":
        layer.act_quantizer.set_timestep_index(torch.tensor([0, 2, 1, 2]))  # per-sample steps
    reference = copy.deepcopy(layer)
    assert qat.set_fast_path(reference, fused=False) == 2  # the weight and the input quantizer
    assert layer.weight_quantizer.fused and layer.act_quantizer.fused
    assert not reference._fused_input() and layer._fused_input()
    runs = []
    for m in (reference, layer):  # the composite reference, then the fused layer
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            if not isinstance(t, torch.nn.Parameter):
                saved.append(t.numel() * t.element_size())
            return t

        with torch.autocast("cpu", torch.bfloat16, enabled=autocast), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = m(x)
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        runs.append((y.detach().float(), x.grad.float(), grads, sum(saved)))
    (y_ref, gx_ref, g_ref, saved_ref), (y, gx, g, saved_fused) = runs
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-5}  # bf16: 8 mantissa bits
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    assert g.keys() == g_ref.keys() and {"act_quantizer.step", "weight"} <= g.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], **tol, msg=name)
    # the composed form keeps x (for the quantizer) and Q(x) (for the op); the fused node keeps x only
    assert saved_fused < saved_ref - 0.9 * x0.numel() * (2 if autocast else 4)


def _saved_bytes(model: torch.nn.Module, fwd, batch) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):  # parameters are kept anyway; count activation memory
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        fwd(model, batch)
    return sum(seen.values())


def test_the_quantized_student_keeps_about_what_its_fp_lora_step_keeps(student) -> None:
    # issue 8's memory target is <= 1.15x the FP LoRA step; the composed form keeps far more (x and Q(x), B A and the
    # quantizer intermediates). Device independent: the bytes autograd keeps for backward.
    model, fwd, make_batch, grid = student
    batch = make_batch(grid[torch.tensor([0, 3, 3, 9])])
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    for q in quantizers:
        q.enabled = False
    fp = _saved_bytes(model, fwd, batch)
    for q in quantizers:
        q.enabled = True
    fused = _saved_bytes(model, fwd, batch)
    composite = _saved_bytes(_reference(model), fwd, batch)
    assert fused <= 1.15 * fp < composite


def test_compiled_block_keeps_no_float32_x_over_s(student) -> None:
    """AOTAutograd's partitioner keeps, for backward, the quantizers' shared input rather than each quantizer's
    float32 ``x / s`` (to_q, to_k, to_v read one LayerNorm output: keeping ``x / s`` wrote and re-read three float32
    copies per step on the H200, docs/performance.md)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    model, fwd, make_batch, grid = student
    name = next(n for n, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock")
    block = model.get_submodule(name)
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.setdefault("in", (a, kw)), with_kwargs=True)
    batch = make_batch(grid[torch.tensor([0, 3, 3, 9])])
    with torch.no_grad():
        fwd(model, batch)
    handle.remove()
    args, kwargs = seen["in"]
    args = [a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    kept = []

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        kept.extend(n for n in out[1:] if isinstance(n, torch.fx.Node) and n.op == "call_function")
        return gm

    def backend(gm: torch.fx.GraphModule, example_inputs: list):  # noqa: ANN202 - dynamo's backend signature
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=lambda g, _: g,
                                     partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend, dynamic=False)
    with qat.timestep(model, batch[1]):
        out = compiled(*args, **kwargs)
    (out[0] if isinstance(out, tuple) else out).square().mean().backward()
    quantized = [m for m in block.modules() if isinstance(m, (QuantConv2d, QuantLinear)) and m._fused_input()]
    assert len(quantized) >= 3 and kept  # the block does run fused quantized layers and keeps tensors
    # x / s: an activation divided by a step tensor (divisions by a Python number, as diffusers' output rescaling,
    # are the FP block's too). A quantizer alone on its input may keep x / s instead of x (the same bytes); those
    # that share an input must not keep one each.
    x_over_s = [n for n in kept if n.target == torch.ops.aten.div.Tensor and isinstance(n.args[1], torch.fx.Node)
                and n.meta["val"].numel() > 64 * n.args[1].meta["val"].numel()]
    inputs = [n.args[0] for n in x_over_s]
    assert len(inputs) == len(set(inputs)), f"x / s kept {len(inputs)} times for {len(set(inputs))} inputs"
