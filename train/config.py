"""Run configuration: a dataclass schema (the source of truth), YAML recipes and ``key=value`` overrides.

``load_config(["config=efficientdm_digits.yaml", "trainer.max_steps=20"])`` merges, in order, the schema defaults,
the recipe (found in ``configs/`` by name, or by path) and the overrides, then validates everything before any
model is built. Every error names the full key and the allowed values.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from qat.methods.efficientdm import FAMILY_RULES, EfficientDMConfig

__all__ = [
    "ConfigError",
    "RunConfig",
    "TeacherConfig",
    "TrajectoryConfig",
    "CalibrationConfig",
    "OptimConfig",
    "TrainerConfig",
    "MonitorConfig",
    "EvalConfig",
    "load_config",
    "find_config",
    "CONFIG_DIR",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message names the full key and what is allowed."""


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")


@dataclass
class TeacherConfig:
    """The frozen full-precision teacher: a local diffusers model directory.

    Args:
        path: directory holding the subfolders below (relative paths are resolved against the repository root
            when they do not exist relative to the working directory).
        unet_subfolder: subfolder of the denoiser (``from_pretrained(path, subfolder=...)``; ``transformer`` for
            the transformer families).
        scheduler_subfolder: subfolder of the scheduler config.
        conditioning: ``class`` (labels -> ``class_embedder`` -> cross-attention context, null class for CFG; DiT
            embeds labels itself), ``prompt_embeds`` (a safetensors file of precomputed text embeddings),
            ``prompts`` (a prompt file, encoded once at load by the local text encoder) or ``none``.
        class_embedder_subfolder: subfolder of the :class:`train.models.class_embedder.ClassEmbedder` (``class``
            conditioning).
        prompt_embeds_path: safetensors file with ``prompt_embeds (N, L, D)`` and ``negative_prompt_embeds (1, L, D)``
            (optional ``prompt_attention_mask (N, L)`` and ``negative_prompt_attention_mask (1, L)``).
        dtype: teacher precision, ``fp32`` or ``bf16``.
        vae_subfolder: subfolder of the latent decoder (``VQModel`` / ``AutoencoderKL``) of latent models, used
            only to decode evaluation samples to images; None for pixel-space models.
        family: denoiser family (``unet``, ``dit``, ``pixart``, ``cogvideox``, ``wan``; see
            :mod:`train.models.families`); None detects it from the model class in ``<unet_subfolder>/config.json``.
        sample_shape: one sample in the family's layout and latent units, e.g. ``[16, 13, 60, 104]`` (Wan
            ``C, F, H, W``); None reads it from the model config (Wan's config has none: required there).
        prompt_file: text file with one prompt per line (``prompts`` conditioning; blank lines are skipped).
        negative_prompt: the unconditional prompt of classifier-free guidance (``prompts`` conditioning).
        text_encoder_subfolder / tokenizer_subfolder: the local transformers text encoder and tokenizer.
        max_sequence_length: tokens per prompt; None uses the family's convention (CLIP 77, PixArt-alpha 120,
            CogVideoX ``max_text_seq_length``, Wan 512).
        prompt_embeds_cache: safetensors file where the encoded prompts are stored and reused (by later runs and the
            other processes) while prompts, negative prompt, length and encoder are unchanged; None: no cache.
    """

    path: str = MISSING
    unet_subfolder: str = "unet"
    scheduler_subfolder: str = "scheduler"
    conditioning: str = "class"
    class_embedder_subfolder: str = "class_embedder"
    prompt_embeds_path: str | None = None
    dtype: str = "fp32"
    vae_subfolder: str | None = None
    family: str | None = None
    sample_shape: list[int] | None = None
    prompt_file: str | None = None
    negative_prompt: str = ""
    text_encoder_subfolder: str = "text_encoder"
    tokenizer_subfolder: str = "tokenizer"
    max_sequence_length: int | None = None
    prompt_embeds_cache: str | None = None


@dataclass
class TrajectoryConfig:
    """Data-free training data: the teacher's own sampling trajectories (EfficientDM Sec. 3.4).

    Args:
        mode: ``online`` (walk each trajectory from high to low noise, one update per step, as EfficientDM) or
            ``cached`` (generate ``num_trajectories`` once into shards, then train on shuffled mixed-timestep batches).
        num_steps: DDIM steps of a trajectory; also the rows of the temporal quantizer tables.
        eta: DDIM eta (1.0: stochastic, as EfficientDM).
        guidance_scale: classifier-free guidance scale ``w`` (``eps_u + w (eps_c - eps_u)``).
        batch_size: trajectories walked together (online) / samples per update (cached).
        seed: base seed; trajectory ``i`` uses noise from ``seed + i`` streams, ranks get disjoint ranges.
        num_trajectories: trajectories generated for ``cached`` mode.
        shard_size: trajectories per cache shard.
        cache_dir: where shards go; default ``<output_dir>/trajectories``.
        loss_target: ``cfg`` (MSE of the CFG-combined eps, as EfficientDM) or ``branches`` (cond and uncond).
    """

    mode: str = "online"
    num_steps: int = 100
    eta: float = 1.0
    guidance_scale: float = 1.5
    batch_size: int = 2
    seed: int = 3407
    num_trajectories: int = 64
    shard_size: int = 16
    cache_dir: str | None = None
    loss_target: str = "cfg"


@dataclass
class CalibrationConfig:
    """PTQ initialisation inputs: teacher trajectories (EfficientDM: 250 DDIM steps, eta 1, CFG 1.5).

    Args:
        num_trajectories: trajectories sampled for calibration.
        num_steps: their DDIM steps.
        max_batches: calibration forwards used (spread evenly over the trajectory steps).
        per_timestep: also initialise every temporal table row from the inputs at that timestep.
        seed: seed of the calibration trajectories (disjoint from training seeds).
    """

    num_trajectories: int = 8
    num_steps: int = 100
    max_batches: int = 32
    per_timestep: bool = False
    seed: int = 12345


@dataclass
class OptimConfig:
    """AdamW over LoRA (scale-aware per-layer LR), weight steps and activation steps; linear decay to 0.

    Args:
        lora_lr: with ``scale_aware`` the factor ``c`` in ``lr = c * mean(s_w)`` (EfficientDM: 1/2500 = 4e-4),
            else the LoRA learning rate.
        scale_aware: EfficientDM's scale-aware LoRA optimisation (per-layer learning rates).
        weight_step_lr: learning rate of the weight steps (EfficientDM: 1e-6).
        act_step_lr: learning rate of the temporal activation steps and offsets (EfficientDM: 5e-4); with
            ``act_scale_aware`` the factor ``c`` in ``lr = c * mean(|s_a|)`` of each activation quantizer's steps.
        act_scale_aware: relative (scale-aware) activation-step learning rates, see :func:`qat.param_groups`;
            needed when one recipe serves 4- and 8-bit activations (a DiffQAT option, off in the paper recipe).
        quantizer_weight_decay: AdamW weight decay of quantizer parameters (default 0; the reference used 0.01).
        lora_weight_decay: AdamW weight decay of LoRA matrices.
        warmup_steps: linear warm-up steps before the linear decay.
        betas: AdamW betas.
    """

    lora_lr: float = 4e-4
    scale_aware: bool = True
    weight_step_lr: float = 1e-6
    act_step_lr: float = 5e-4
    act_scale_aware: bool = False
    quantizer_weight_decay: float = 0.0
    lora_weight_decay: float = 0.0
    warmup_steps: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class TrainerConfig:
    """Passed to ``lightning.Trainer`` as keyword arguments (names and meanings are Lightning's)."""

    max_steps: int = 16000
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    deterministic: bool = False
    # Lightning's profilers: "simple" (time per loop hook), "advanced" (cProfile per hook), "pytorch" (op-level
    # CPU / CUDA time); the summary is printed when training ends.
    profiler: str | None = None


@dataclass
class PerformanceConfig:
    """Speed settings; none changes results beyond floating-point rounding (``tests/qat/test_fast_path.py``).

    Args:
        compile: ``torch.compile`` the student and the teacher denoisers in place (``nn.Module.compile``: the
            state-dict keys stay the same). The first steps are slow while it compiles.
        compile_backend: the ``torch.compile`` backend (``inductor``; ``aot_eager`` to debug).
        fused_fake_quant: quantizers run as one autograd node each (:func:`qat.ste.fake_quantize_ste`); false
            selects the composite reference form (slower, more memory; for debugging).
        compile_kernels: the fake-quant math of the fused quantizers compiled into one kernel per quantizer and
            pass (:func:`qat.ste.use_compiled_kernels`), the model itself eager: most of ``compile``'s gain on the
            quantizers without compiling the model (seconds, not minutes). Needs a C++ compiler (CPU) or Triton
            (GPU). No effect with ``fused_fake_quant=false``. Unset: on with ``compile``, ``compile_blocks`` and a
            CUDA-graph ``compile_mode``, where it speeds up the quantized layers outside the compiled blocks
            (``conv_in``, the time embedding, ``conv_out``: an LDM-4 W4A4 step of batch 32, 121.3 -> 118.8 ms on an
            H200, ``docs/performance.md``); off otherwise (without CUDA graphs that step is bound by the host, and
            no gain was measured).
        compile_blocks: with ``compile``, compile the student's repeated blocks one by one (ResNet and transformer
            blocks; regional compilation) instead of the whole model: the compile time grows with the distinct
            block shapes, not with the depth (tested equal to eager); the teacher is still compiled whole. Each
            block is laid out channels-last where its convolutions make inductor prefer that for the float block
            (:func:`train.models.families.prefers_channels_last`; the quantizers' extra graph nodes made inductor
            skip it).
        compile_teacher: compile the teacher (in place); unset: as ``compile``. ``compile=false
            compile_teacher=true`` keeps the student eager (no minutes of compilation) and the teacher fast.
        compile_mode: the ``torch.compile`` mode of the student (inductor): ``default``; ``reduce-overhead``
            records each compiled graph as a CUDA graph and replays it in every step (the kernels launch without
            the host; with ``compile_blocks`` an LDM-4 W4A4 step of batch 32 went from 201 to 126 ms on an H200,
            ``docs/performance.md``); ``max-autotune`` (CUDA graphs and kernel autotuning: longer compiles) or
            ``max-autotune-no-cudagraphs``. The teacher keeps the default mode (its generation measured no gain
            from CUDA graphs). CUDA graphs take a memory pool of their own and record once per input shape; a
            student compiled with them is sampled and evaluated with its eager code (outside autograd the graphs
            of regionally compiled blocks would overwrite each other's outputs).
    """

    compile: bool = False
    compile_backend: str = "inductor"
    fused_fake_quant: bool = True
    compile_kernels: bool | None = None
    compile_blocks: bool = False
    compile_teacher: bool | None = None
    compile_mode: str = "default"


@dataclass
class MonitorConfig:
    """TensorBoard extras and checkpointing.

    Args:
        sample_every_n_steps: teacher-vs-student sample grids from fixed seeds (0: only at the end).
        sample_labels: class labels of the grid (class conditioning).
        sample_steps: DDIM steps of the grids.
        telemetry_every_n_steps: quantizer statistics (steps, fraction clipped) (0: off).
        checkpoint_every_n_steps: checkpoint interval; ``last.ckpt`` is always kept.
        timestep_buckets: buckets of the per-timestep loss curves.
    """

    sample_every_n_steps: int = 500
    sample_labels: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    sample_steps: int = 50
    telemetry_every_n_steps: int = 100
    checkpoint_every_n_steps: int = 500
    timestep_buckets: int = 10


@dataclass
class EvalConfig:
    """How a run measures its student against the teacher (``report.json``), before and after training.

    Args:
        enabled: run the evaluation (PTQ start, trained student, FP teacher).
        num_trajectories: held-out teacher trajectories for the per-step eps-MSE (seeds never used in training).
        num_steps: DDIM steps of the held-out trajectories.
        seed: seed of the held-out trajectories and of the evaluation samples (sample ``i`` uses ``seed + i``).
        num_samples: samples per variant for sample fidelity and distribution metrics (labels balanced over
            classes, the ADM protocol).
        scheduler: diffusers scheduler of the sampling pipeline: ``ddim``, ``ddpm``, ``pndm``, ``dpmsolver``,
            ``unipc``, ``euler``, ``euler_a``, ``heun`` or any diffusers scheduler class name.
        sampling_steps: sampler steps (temporal quantizers are remapped to the sampler's timesteps).
        guidance_scale: CFG scale of the samples; None uses ``trajectories.guidance_scale``.
        eta: DDIM eta of the samples (0: deterministic).
        batch_size: samples per pipeline call.
        features: distribution metrics: ``digits`` (FD-digits and class accuracy with the shipped digits
            classifier), ``inception`` (FID, sFID, IS, precision/recall; needs ``inception_path`` and
            ``reference_path``) or ``none``.
        classifier_path: digits classifier directory (``features=digits``).
        inception_path: local Inception-V3 weights file (``features=inception``); nothing is downloaded.
        reference_path: real reference images, ADM-layout ``.npz`` (``arr_0`` uint8 NHWC); for ``digits`` the
            embedded real digits when None.
        stats_cache_dir: where reference statistics are cached (None: ``<output_dir>/eval_cache``).
        save_npz: write each variant's samples as ADM-layout ``samples/<variant>.npz``.
        grid_size: samples per variant in the side-by-side PNG grid.
    """

    enabled: bool = True
    num_trajectories: int = 16
    num_steps: int = 100
    seed: int = 999_999
    num_samples: int = 100
    scheduler: str = "ddim"
    sampling_steps: int = 20
    guidance_scale: float | None = None
    eta: float = 0.0
    batch_size: int = 64
    features: str = "none"
    classifier_path: str | None = None
    inception_path: str | None = None
    reference_path: str | None = None
    stats_cache_dir: str | None = None
    save_npz: bool = True
    grid_size: int = 20


@dataclass
class RunConfig:
    """Everything a run needs. Sections map one-to-one to the YAML recipes in ``configs/``.

    ``export``: write the packed low-bit model (:mod:`train.export_run`) to ``<output_dir>/export`` at the end.
    ``resume``: ``last`` (``<output_dir>/checkpoints/last.ckpt``, which must exist), ``auto`` (``last`` if it exists,
    else a fresh start: the setting for requeued cluster jobs) or a checkpoint path.
    """

    method: str = "efficientdm"
    output_dir: str = "runs/default"
    export: bool = True
    resume: str | None = None
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # "auto": the quantization rules of the teacher's family (train.models.families); recipes may name one explicitly
    efficientdm: EfficientDMConfig = field(default_factory=lambda: EfficientDMConfig(family="auto"))
    trajectories: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes whose compiled graphs are CUDA graphs
_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true")


def validate(cfg: RunConfig) -> None:
    """Value ranges and impossible combinations; raises :class:`ConfigError` naming the full key."""
    from qat.methods import METHODS

    _one_of("method", cfg.method, tuple(METHODS.names()))
    t, tr, e = cfg.teacher, cfg.trajectories, cfg.efficientdm
    _validate_teacher(t)
    _one_of("trajectories.mode", tr.mode, ("online", "cached"))
    _one_of("trajectories.loss_target", tr.loss_target, ("cfg", "branches"))
    if not 0.0 <= tr.eta <= 1.0:
        raise ConfigError(f"trajectories.eta: {tr.eta} is outside [0, 1]")
    for key, value in (("trajectories.num_steps", tr.num_steps), ("trajectories.batch_size", tr.batch_size),
                       ("trajectories.num_trajectories", tr.num_trajectories),
                       ("trajectories.shard_size", tr.shard_size), ("trainer.max_steps", cfg.trainer.max_steps),
                       ("calibration.num_trajectories", cfg.calibration.num_trajectories),
                       ("calibration.max_batches", cfg.calibration.max_batches),
                       ("eval.num_trajectories", cfg.eval.num_trajectories),
                       ("eval.sampling_steps", cfg.eval.sampling_steps), ("eval.batch_size", cfg.eval.batch_size)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if tr.guidance_scale != 1.0 and t.conditioning == "none":
        raise ConfigError("trajectories.guidance_scale: classifier-free guidance needs conditioning; set "
                          "trajectories.guidance_scale=1.0 or teacher.conditioning to 'class' / 'prompt_embeds' / "
                          "'prompts'")
    if e.num_timesteps != tr.num_steps:
        raise ConfigError(f"efficientdm.num_timesteps ({e.num_timesteps}) must equal trajectories.num_steps "
                          f"({tr.num_steps}): the temporal tables have one row per trajectory step")
    for key, bits in (("efficientdm.weight_bits", e.weight_bits), ("efficientdm.act_bits", e.act_bits),
                      ("efficientdm.special_bits", e.special_bits)):
        if not 2 <= bits <= 8:
            raise ConfigError(f"{key}: {bits} is outside [2, 8]")
    _one_of("efficientdm.family", e.family, (*sorted(FAMILY_RULES), "auto"))
    _one_of("efficientdm.act_init", e.act_init, ("mse", "minmax"))
    _one_of("efficientdm.weight_init", e.weight_init, ("mse", "minmax"))
    _one_of("trainer.precision", str(cfg.trainer.precision), _PRECISIONS)
    _one_of("trainer.profiler", cfg.trainer.profiler, (None, "simple", "advanced", "pytorch"))
    if cfg.performance.compile_blocks and not cfg.performance.compile:
        raise ConfigError("performance.compile_blocks: compiles blocks instead of the whole model, so it needs "
                          "performance.compile=true")
    _one_of("performance.compile_backend", cfg.performance.compile_backend,
            ("inductor", "aot_eager", "eager", "cudagraphs"))
    _one_of("performance.compile_mode", cfg.performance.compile_mode, COMPILE_MODES)
    if cfg.performance.compile_mode != "default" and not (
            cfg.performance.compile and cfg.performance.compile_backend == "inductor"):
        raise ConfigError(f"performance.compile_mode: {cfg.performance.compile_mode!r} is a mode of the inductor "
                          "backend for the compiled student: it needs performance.compile=true and "
                          "performance.compile_backend=inductor")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: needs two values, got {list(cfg.optim.betas)}")
    _validate_eval(cfg.eval)
    if cfg.resume not in (None, "last", "auto") and not Path(cfg.resume).is_file():
        raise ConfigError(f"resume: {cfg.resume!r} is neither 'last', 'auto' nor an existing checkpoint file")


def _validate_teacher(t: TeacherConfig) -> None:
    from train.models.families import FAMILIES

    _one_of("teacher.conditioning", t.conditioning, ("class", "prompt_embeds", "prompts", "none"))
    _one_of("teacher.dtype", t.dtype, ("fp32", "bf16"))
    if t.family is not None:
        _one_of("teacher.family", t.family, tuple(FAMILIES))
    if t.conditioning == "prompt_embeds" and not t.prompt_embeds_path:
        raise ConfigError("teacher.prompt_embeds_path: required when teacher.conditioning is 'prompt_embeds'")
    if t.conditioning == "prompts" and not t.prompt_file:
        raise ConfigError("teacher.prompt_file: required when teacher.conditioning is 'prompts' (a text file with "
                          "one prompt per line)")
    if t.sample_shape is not None and (len(t.sample_shape) not in (3, 4) or min(t.sample_shape) < 1):
        raise ConfigError(f"teacher.sample_shape: {list(t.sample_shape)} must be 3 or 4 positive sizes, e.g. "
                          "[C, H, W] or [C, F, H, W] (Wan)")
    if t.max_sequence_length is not None and t.max_sequence_length < 1:
        raise ConfigError(f"teacher.max_sequence_length: must be >= 1, got {t.max_sequence_length}")


def _validate_eval(ev: EvalConfig) -> None:
    from train.models.pipeline import scheduler_class

    try:
        scheduler_class(ev.scheduler)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _one_of("eval.features", ev.features, ("digits", "inception", "none"))
    if ev.num_samples < 2:
        raise ConfigError(f"eval.num_samples: must be >= 2 (distribution statistics need two samples), got "
                          f"{ev.num_samples}")
    if not 0.0 <= ev.eta <= 1.0:
        raise ConfigError(f"eval.eta: must be in [0, 1], got {ev.eta}")
    if ev.grid_size < 0:
        raise ConfigError(f"eval.grid_size: must be >= 0, got {ev.grid_size}")
    if ev.features == "inception":
        for key in ("inception_path", "reference_path"):
            if not getattr(ev, key):
                raise ConfigError(f"eval.{key}: required when eval.features is 'inception' (local Inception-V3 "
                                  "weights and an ADM-layout .npz of real images; nothing is downloaded); or set "
                                  "eval.features=none")


def find_config(name: str) -> Path:
    """A recipe by path, or by name in ``configs/`` (with or without ``.yaml``)."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config: {name!r} is neither a file nor a recipe in {CONFIG_DIR}; known recipes: {known}")


def _allowed_keys(schema: DictConfig, full_key: str) -> list[str]:
    parent = full_key.rpartition(".")[0]
    node = OmegaConf.select(schema, parent) if parent else schema
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        allowed = _allowed_keys(schema, key)
        leaf = key.rpartition(".")[2]
        hint = difflib.get_close_matches(leaf, allowed, n=1)
        msg = f"{key}: unknown key (from {source}); allowed keys here: {allowed}"
        return ConfigError(msg + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if isinstance(err, ValidationError):
        return ConfigError(f"{key}: {str(err.msg).splitlines()[0]} (from {source})")
    return ConfigError(f"{key}: {str(err).splitlines()[0]} (from {source})")


def load_config(argv: list[str]) -> RunConfig:
    """Builds the validated :class:`RunConfig` from ``["config=<name or path>", "key=value", ...]``.

    ``config=`` is optional (schema defaults otherwise). Raises :class:`ConfigError` on unknown keys, wrong types,
    bad values and impossible combinations, always naming the full key.
    """
    schema = OmegaConf.structured(RunConfig)
    recipe: str | None = None
    overrides: list[str] = []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value; usage: train.py config=<recipe> [key=value ...]")
        key, value = arg.split("=", 1)
        if key == "config":
            recipe = value
        else:
            overrides.append(arg)
    merged = schema
    try:
        if recipe is not None:
            path = find_config(recipe)
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise _explain(err, schema, str(path)) from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise _explain(err, schema, "command line") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{missing[0]}: required but not set (the recipe leaves it to you); add "
                          f"{missing[0]}=<value> to the command line" + (f"; also missing: {missing[1:]}"
                                                                          if missing[1:] else ""))
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, "resolved config") from None
    except ValueError as err:  # __post_init__ checks; EfficientDMConfig is the only schema section with them
        raise ConfigError(f"efficientdm.{err}") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved as ``config.yaml`` in the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def resolve_path(path: str) -> Path:
    """``path`` as given if it exists, else relative to the repository root (for the shipped assets)."""
    p = Path(os.path.expanduser(path))
    if p.exists() or p.is_absolute():
        return p
    return REPO_ROOT / p
