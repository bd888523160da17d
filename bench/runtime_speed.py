"""Inference speed of exported W8A8 students on the real-kernel runtime, against the bf16 teacher and torchao.

    python bench/runtime_speed.py                                   # DiT-XL/2, SD 1.5 UNet, LDM-4; batch 1, 8, 32
    python bench/runtime_speed.py --models dit --batches 32 --rows bf16,ao_int8,int8 --profile
    python bench/runtime_speed.py --tiny --compile none             # tiny configs: checks the script on a CPU

Per model (random weights, published configs written in ``bench/family_throughput.py`` and
``bench/make_random_ldm4.py``; nothing is downloaded) the rows are:

* ``bf16``: the float model in bfloat16, the reference for speed.
* ``ao_int8`` / ``ao_fp8``: torchao's ``Int8DynamicActivationInt8WeightConfig`` and
  ``Float8DynamicActivationFloat8WeightConfig`` (per-row) applied with ``quantize_`` to the same bf16 model: dynamic
  post-training quantization of every ``nn.Linear`` (torchao does not quantize convolutions).
* ``fake``: DiffQAT's exact fake-quant reload of the W8A8 export (dequantized weights, activations quantized and
  dequantized in floating point), bf16.
* ``int8`` / ``fp8``: the same export on :mod:`qat.runtime`'s integer / float8 GEMMs with the static per-timestep
  activation steps (linears, 1x1 and k x k convs).
* ``int4wo``: a W4A8 export on the weight-only backend (packed 4-bit weights, bf16 activations).

The student is an EfficientDM W8A8 student (W4A8 for ``int4wo``) of the same float model, calibrated with min-max
ranges on one random batch and exported with :func:`qat.export_quantized` (the numbers are about speed; the
reported error against the reference says the kernels compute what the export holds, not that the student is good).
Every row is compiled the same way (``--compile``: ``blocks`` compiles each transformer block, or each UNet down /
mid / up block, with ``torch.compile``; ``full`` the whole denoiser; ``none`` eager), with
``torch._inductor.config.force_fuse_int_mm_with_mul`` on as torchao's docs advise, and dynamo is reset between rows.

Per row and batch: milliseconds per denoiser call (``--warmup`` untimed calls, compilation included, then the median
of ``--repeats`` timings of ``--steps`` calls each), images/s for a sampler of ``--sampling-steps`` calls per image
(``B / (steps * latency)``, no CFG), the peak memory of the timed calls (``max_memory_allocated``, weights
included), the compile time (the first denoiser invocation), and the relative L2 error of the output against its
reference in float32: the float32 float model for ``bf16`` / ``ao_*``, the float32 fake reload of the export for
DiffQAT's rows. ``--profile`` writes, per row at the largest batch, the profiler's kernel table (top CUDA time) to
``--out``'s folder. Rows print as they finish and are appended to ``--out`` (JSON lines).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for p in (REPO, BENCH):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import diffusers  # noqa: E402
from family_throughput import SPECS  # noqa: E402
from make_random_ldm4 import ldm4_unet  # noqa: E402

import qat  # noqa: E402
from qat.methods.efficientdm import EfficientDM, EfficientDMConfig  # noqa: E402
from qat.runtime import load_for_inference  # noqa: E402

ROWS = ("bf16", "ao_int8", "ao_fp8", "fake", "int8", "fp8", "int4wo")
OURS = ("fake", "int8", "fp8", "int4wo")
T_VALUE = 500  # the timestep of every timed call (one row of the temporal tables)


def build_float(name: str, tiny: bool) -> tuple[nn.Module, str]:
    """The float32 denoiser ``name`` (``dit``, ``sd15``, ``ldm4``) with random weights, and its family."""
    torch.manual_seed(0)
    if name == "ldm4":
        if tiny:
            return diffusers.UNet2DConditionModel(
                sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=1,
                norm_num_groups=8).eval(), "unet"
        return ldm4_unet().eval(), "unet"
    spec = SPECS["dit" if name == "dit" else "unet"]
    model = getattr(diffusers, spec.cls)(**(spec.tiny if tiny else spec.real))
    return model.eval(), spec.family


def make_inputs(model: nn.Module, name: str, batch: int, device: torch.device, dtype: torch.dtype,
                seed: int = 1) -> tuple[torch.Tensor, ...]:
    """``(x, t, cond)`` for one denoiser call: latents, a ``(B,)`` timestep, class labels or text states."""
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    t = torch.full((batch,), T_VALUE, dtype=torch.long)
    if name == "dit":
        cond = torch.randint(0, c.num_embeds_ada_norm, (batch,), generator=gen)
        return x.to(device, dtype), t.to(device), cond.to(device)
    tokens = 77 if name == "sd15" else 1
    cond = torch.randn(batch, tokens, c.cross_attention_dim, generator=gen)
    return x.to(device, dtype), t.to(device), cond.to(device, dtype)


def call(model: nn.Module, name: str, inputs: tuple) -> torch.Tensor:
    """One denoiser call (the timestep also selects the temporal activation rows of a quantized model)."""
    x, t, cond = inputs
    with qat.timestep(model, t):
        if name == "dit":
            return model(x, timestep=t, class_labels=cond).sample
        return model(x, t, encoder_hidden_states=cond).sample


def export_student(fp32: nn.Module, family: str, name: str, w_bits: int, a_bits: int, device: torch.device,
                   out: Path) -> Path:
    """An EfficientDM W{w_bits}A{a_bits} student of ``fp32``, min-max calibrated on one random batch, exported."""
    method = EfficientDM(EfficientDMConfig(family=family, weight_bits=w_bits, act_bits=a_bits, special_bits=8,
                                           num_timesteps=10, lora_rank=4, act_init="minmax"))
    student, _ = method.build_student(copy.deepcopy(fp32), family)
    student.to(device)
    qat.set_timestep_grid(student, torch.linspace(0, 999, 10).round())
    batch = make_inputs(fp32, name, 2, device, torch.float32, seed=7)
    qat.calibrate(student, [batch], lambda m, b: call(m, name, b), max_samples=1024)
    qat.export_quantized(student, out, model_card={"base_model": f"random {name}"}, convert_fn=method.convert)
    del student
    return out


def compile_model(model: nn.Module, how: str, mode: str) -> nn.Module:
    """``how``: ``none``, ``full`` or ``blocks`` (each transformer block, or each UNet down / mid / up block)."""
    if how == "none":
        return model
    kwargs = {} if mode == "default" else {"mode": mode}
    if how == "full":
        return torch.compile(model, **kwargs)
    blocks = (list(model.transformer_blocks) if hasattr(model, "transformer_blocks")
              else [*model.down_blocks, model.mid_block, *model.up_blocks])
    for block in blocks:
        block.compile(**kwargs)
    return model


def torchao_model(fp32: nn.Module, kind: str) -> nn.Module:
    """torchao's dynamic W8A8 (int8 or float8 per-row) on a bf16 copy of ``fp32``."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        quantize_,
    )

    model = copy.deepcopy(fp32).to(torch.bfloat16)
    config = (Int8DynamicActivationInt8WeightConfig() if kind == "ao_int8"
              else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    quantize_(model, config)
    return model


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def timed(fn: Callable[[], Any], warmup: int, steps: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first invocation of ``fn``, median seconds per invocation over ``repeats`` timings of
    ``steps`` invocations)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    sync()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        runs.append((time.perf_counter() - start) / steps)
    return first, statistics.median(runs)


def row_model(row: str, fp32: nn.Module, exports: dict[str, Path], device: torch.device) -> nn.Module:
    """The model of ``row`` on ``device`` (bf16 compute)."""
    if row == "bf16":
        return copy.deepcopy(fp32).to(torch.bfloat16)
    if row.startswith("ao_"):
        return torchao_model(fp32, row)
    path = exports["w4a8" if row == "int4wo" else "w8a8"]
    return load_for_inference(path, backend=row, device=device, dtype=torch.bfloat16)


def profile_row(model: nn.Module, fn: Callable[[], Any], path: Path) -> None:
    """The profiler's kernel table of 3 calls, top CUDA time first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


def measure_model(name: str, args: argparse.Namespace, device: torch.device, out: Path | None) -> None:
    fp32, family = build_float(name, args.tiny)
    fp32.to(device)
    rows = args.rows.split(",")
    exports: dict[str, Path] = {}
    tmp = Path(tempfile.mkdtemp(prefix="diffqat-runtime-"))
    start = time.perf_counter()
    if any(r in ("fake", "int8", "fp8") for r in rows):
        exports["w8a8"] = export_student(fp32, family, name, 8, 8, device, tmp / "w8a8")
    if "int4wo" in rows:
        exports["w4a8"] = export_student(fp32, family, name, 4, 8, device, tmp / "w4a8")
    print(f"[{name}] exports built in {time.perf_counter() - start:.1f} s", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    refs: dict[tuple[str, int], torch.Tensor] = {}
    with torch.no_grad():
        for b in batches:  # float32 references: the float model and the fake reload of each export
            inputs = make_inputs(fp32, name, b, device, torch.float32)
            refs[("fp", b)] = call(fp32, name, inputs).float().cpu()
            for key, path in exports.items():
                fake = qat.load_quantized(path, device)
                refs[(key, b)] = call(fake, name, inputs).float().cpu()
                del fake
    for row in rows:
        try:
            model = row_model(row, fp32, exports, device)
        except (AssertionError, RuntimeError, NotImplementedError) as e:  # e.g. torchao's float8 needs sm_89+
            print(f"[{name}] {row}: not available here: {str(e).splitlines()[0]}", flush=True)
            continue
        n_runtime = len(model.runtime_report.on(row)) if row in OURS and row != "fake" else None
        for b in batches:
            torch._dynamo.reset()
            m = compile_model(model, args.compile, args.compile_mode)
            inputs = make_inputs(fp32, name, b, device, torch.bfloat16)
            fn = functools.partial(call, m, name, inputs)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                try:
                    first, sec = timed(fn, args.warmup, args.steps, args.repeats, device)
                    y = fn()
                except Exception as e:  # noqa: BLE001 - one failing row (out of memory, a kernel refused) is a row
                    print(f"[{name}] {row} batch {b}: failed: {type(e).__name__}: {str(e).splitlines()[0]}",
                          flush=True)
                    continue
                ref = refs[("w4a8" if row == "int4wo" else "w8a8", b) if row in OURS else ("fp", b)]
                err = rel_l2(y.cpu(), ref)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                if args.profile and device.type == "cuda" and b == max(batches) and out is not None:
                    profile_row(m, fn, out.parent / f"profile_{name}_{row}_b{b}.txt")
            result = {"model": name, "row": row, "batch": b, "ms": sec * 1e3,
                      "images_per_s": b / (args.sampling_steps * sec), "peak_gib": peak, "compile_s": first,
                      "rel_err": err, "runtime_layers": n_runtime, "compile": args.compile,
                      "compile_mode": args.compile_mode, "device": str(device),
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "date": datetime.date.today().isoformat()}
            print(f"[{name}] {row:8s} B={b:3d} {sec * 1e3:9.2f} ms  {result['images_per_s']:8.2f} img/s  "
                  f"peak {peak if peak is None else round(peak, 2)} GiB  first {first:6.1f} s  rel err {err:.2e}"
                  + (f"  runtime layers {n_runtime}" if n_runtime is not None else ""), flush=True)
            if out is not None:
                with out.open("a") as f:
                    f.write(json.dumps(result) + "\n")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dit,sd15,ldm4", help="comma list of dit, sd15, ldm4")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--compile", default="blocks", choices=["none", "full", "blocks"])
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a CPU check of the script)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", help="JSON lines file the rows are appended to")
    args = parser.parse_args()
    for row in args.rows.split(","):
        if row not in ROWS:
            parser.error(f"--rows: unknown row {row!r}; known rows: {', '.join(ROWS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.config.cache_size_limit = 256  # one graph per block shape and batch
    torch._inductor.config.force_fuse_int_mm_with_mul = True
    out = Path(args.out) if args.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        measure_model(name, args, device, out)


if __name__ == "__main__":
    main()
