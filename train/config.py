"""Run configuration: a dataclass schema (the source of truth), YAML recipes and ``key=value`` overrides.

``load_config(["config=efficientdm_digits.yaml", "trainer.max_steps=20"])`` merges, in order, the schema defaults,
the recipe (found in ``configs/`` by name, or by path) and the overrides, then validates everything before any
model is built. The schema is :class:`RunConfig` plus two sections chosen by the config itself:

* ``method: <name>`` selects a registered method (:mod:`qat.methods`); its own config dataclass types the section
  of the same name (``efficientdm: {weight_bits: 4, ...}``), so a new method needs no edit here;
* ``losses: {<name>: {weight: ..., ...}}`` adds registered loss terms (:mod:`qat.losses`), each typed by its own
  config dataclass; ``output_mse`` (weight 1) is always there unless its weight is set to 0.

Every error names the full key and the allowed values, and all errors of one config are reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from qat.checks import ConfigProblems
from qat.losses import LOSSES, build_loss
from qat.methods import METHODS, Method
from qat.runtime import BACKENDS

__all__ = [
    "ConfigError",
    "RunConfig",
    "TeacherConfig",
    "TrajectoryConfig",
    "CalibrationConfig",
    "OptimConfig",
    "TrainerConfig",
    "PerformanceConfig",
    "MonitorConfig",
    "EvalConfig",
    "load_config",
    "find_config",
    "build_method",
    "to_yaml",
    "resolve_path",
    "CONFIG_DIR",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_METHOD = "efficientdm"
#: keys of older configs that moved (old full key -> new full key); methods list their own in ``moved_keys``
MOVED_KEYS = {"trajectories.loss_target": "losses.output_mse.target"}


class ConfigError(ValueError):
    """Configuration problems; the message names each full key and what is allowed.

    Attributes:
        errors: one message per problem.
    """

    def __init__(self, errors: str | list[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            super().__init__(self.errors[0])
        else:
            super().__init__(f"{len(self.errors)} problems in the config:\n" + "\n".join(f"  - {e}"
                                                                                           for e in self.errors))


def _one_of(key: str, value: Any, allowed: tuple) -> list[str]:
    return [] if value in allowed else [f"{key}: {value!r} is not allowed; choose one of {list(allowed)}"]


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
        num_steps: DDIM steps of a trajectory; also the rows of per-timestep tables (e.g. EfficientDM's).
        eta: DDIM eta (1.0: stochastic, as EfficientDM).
        guidance_scale: classifier-free guidance scale ``w`` (``eps_u + w (eps_c - eps_u)``).
        batch_size: trajectories walked together (online) / samples per update (cached).
        seed: base seed; trajectory ``i`` uses noise from ``seed + i`` streams, ranks get disjoint ranges.
        num_trajectories: trajectories generated for ``cached`` mode.
        shard_size: trajectories per cache shard.
        cache_dir: where shards go; default ``<output_dir>/trajectories``.
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
    """AdamW over the method's parameter groups (their learning rates are the method's settings, e.g.
    ``efficientdm.lora_lr``); linear warm-up, then linear decay to 0.

    Args:
        warmup_steps: linear warm-up steps before the linear decay.
        betas: AdamW betas.
    """

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
    """Speed and memory settings; none changes results beyond floating-point rounding
    (``tests/qat/test_fast_path.py``, ``tests/train/test_qvgen_train.py``).

    Args:
        gradient_checkpointing: recompute the student's blocks in backward instead of keeping their activations
            (diffusers' ``enable_gradient_checkpointing``): what a full-size video student needs to fit one GPU,
            at about one more forward per step. The timestep stays set on the student through the backward, so the
            recomputed timestep-aware modules see the step's timestep.
        compile: ``torch.compile`` the student and the teacher denoisers in place (``nn.Module.compile``: the
            state-dict keys stay the same). The first steps are slow while it compiles.
        compile_backend: the ``torch.compile`` backend (``inductor``; ``aot_eager`` to debug).
        fused_fake_quant: quantizers run as one autograd node each (:func:`qat.ste.fake_quantize_ste`); false
            selects the composite reference form (slower, more memory; for debugging). Set on the student's
            quantizers with :func:`qat.set_fast_path`.
        compile_kernels: the fake-quant math of the fused quantizers compiled into one kernel per quantizer and
            pass (``qat.set_fast_path(student, compiled_kernels=True)``), the model itself eager: most of the gain on
            the quantizers without compiling the model (seconds, not minutes). Needs a C++ compiler (CPU) or Triton
            (GPU). No effect with ``fused_fake_quant=false``. Unset: on with ``compile``, ``compile_blocks`` and a
            CUDA-graph ``compile_mode``, where it speeds up the quantized layers outside the compiled blocks
            (``conv_in``, the time embedding, ``conv_out``: an LDM-4 W4A4 step of batch 32, 121.3 -> 118.8 ms on an
            H200, ``docs/performance.md``); off otherwise (without CUDA graphs that step is bound by the host, and no
            gain was measured).
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

    gradient_checkpointing: bool = False
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
        keep_checkpoints: the newest step checkpoints (``step=N.ckpt``) kept beside ``last.ckpt``; a resume falls
            back to them when ``last.ckpt`` is damaged.
        timestep_buckets: buckets of the per-timestep loss curves.
    """

    sample_every_n_steps: int = 500
    sample_labels: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    sample_steps: int = 50
    telemetry_every_n_steps: int = 100
    checkpoint_every_n_steps: int = 500
    keep_checkpoints: int = 2
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
        backend: what computes the evaluated student's quantized layers in ``evaluate.py`` (:mod:`qat.runtime`,
            ``docs/runtime.md``): ``fake`` (the fake-quant model, floating point), ``int8`` (exact integer GEMMs),
            ``fp8`` (float8 GEMMs of the same codes) or ``int4wo`` (packed weights, activations not quantized). An
            export is reloaded on it; a run, student or checkpoint is first exported as ``export.py`` would (into
            a temporary directory) and that reload is converted; with ``fake`` such a source is evaluated as
            trained. The PTQ baseline and the FP teacher are not affected; ``train.py`` accepts only ``fake``.
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
    backend: str = "fake"


@dataclass
class RunConfig:
    """Everything a run needs. Sections map one-to-one to the YAML recipes in ``configs/``; the method's section
    (named after ``method``) and ``losses`` are added by :func:`load_config` (see the module docstring).

    ``plugins``: Python modules imported before the config is read, so that the methods, quantizers, loss terms
    and module kinds they register can be named here (a method defined outside ``qat/methods``).
    ``export``: write the packed low-bit model (:mod:`train.export_run`) to ``<output_dir>/export`` at the end.
    ``resume``: ``last`` (``<output_dir>/checkpoints/last.ckpt``, which must exist), ``auto`` (``last`` if it exists,
    else a fresh start: the setting for requeued cluster jobs) or a checkpoint path; the config must match the run's
    saved one except in the keys :data:`train.rundir.MAY_CHANGE`.
    ``overwrite``: start afresh in an ``output_dir`` that holds a run, removing its outputs first (without it such a
    start stops before writing anything).
    """

    method: str = DEFAULT_METHOD
    plugins: list[str] = field(default_factory=list)
    output_dir: str = "runs/default"
    export: bool = True
    resume: str | None = None
    overwrite: bool = False
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    trajectories: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def method_config(self) -> Any:
        """The method's own section (an instance of its ``config_class``)."""
        return getattr(self, self.method)

    @property
    def loss_configs(self) -> list[Any]:
        """The loss terms of ``losses`` with a weight above 0 (instances of their config classes)."""
        losses = getattr(self, "losses", None)
        if losses is None:
            return []
        return [getattr(losses, f.name) for f in dataclasses.fields(losses) if getattr(losses, f.name).weight > 0]


def build_method(cfg: RunConfig) -> Method:
    """The run's :class:`qat.methods.Method` with its config section."""
    return METHODS.get(cfg.method)(cfg.method_config)


#: (method, its config class, (loss name, loss config class)...) -> schema class: one class per combination, so that
#: two loads of the same config compare equal (dataclass equality needs the same class)
_SCHEMAS: dict[tuple, type] = {}


def _run_schema(method: str | None, losses: list[str]) -> type:
    """:class:`RunConfig` with the method's section and a ``losses`` section of the named terms (``output_mse``
    first, the others in name order)."""
    names = ["output_mse", *sorted(n for n in losses if n != "output_mse")]
    method_cls = METHODS.get(method).config_class if method is not None else None
    key = (method, method_cls, *((n, LOSSES.get(n)[0]) for n in names))
    if key not in _SCHEMAS:
        losses_cls = make_dataclass("LossesConfig", [(n, c, field(default_factory=c)) for n, c in key[2:]])
        fields: list[tuple] = [("losses", losses_cls, field(default_factory=losses_cls))]
        if method_cls is not None:
            fields.insert(0, (method, method_cls, field(default_factory=method_cls)))
        _SCHEMAS[key] = make_dataclass(f"RunConfig_{method or 'unknown'}", fields, bases=(RunConfig,))
    return _SCHEMAS[key]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes whose compiled graphs are CUDA graphs
_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true")


def validate(cfg: RunConfig) -> list[str]:
    """Value ranges and impossible combinations across sections; one message per problem, naming the full key."""
    t, tr, p = cfg.teacher, cfg.trajectories, cfg.performance
    errors = _teacher_problems(t)
    errors += _one_of("trajectories.mode", tr.mode, ("online", "cached"))
    if not 0.0 <= tr.eta <= 1.0:
        errors.append(f"trajectories.eta: {tr.eta} is outside [0, 1]")
    for key, value in (("trajectories.num_steps", tr.num_steps), ("trajectories.batch_size", tr.batch_size),
                       ("trajectories.num_trajectories", tr.num_trajectories),
                       ("trajectories.shard_size", tr.shard_size), ("trainer.max_steps", cfg.trainer.max_steps),
                       ("calibration.num_trajectories", cfg.calibration.num_trajectories),
                       ("calibration.max_batches", cfg.calibration.max_batches),
                       ("eval.num_trajectories", cfg.eval.num_trajectories),
                       ("eval.sampling_steps", cfg.eval.sampling_steps), ("eval.batch_size", cfg.eval.batch_size),
                       ("monitor.checkpoint_every_n_steps", cfg.monitor.checkpoint_every_n_steps),
                       ("monitor.keep_checkpoints", cfg.monitor.keep_checkpoints),
                       ("monitor.timestep_buckets", cfg.monitor.timestep_buckets)):
        if value < 1:
            errors.append(f"{key}: must be >= 1, got {value}")
    if tr.guidance_scale != 1.0 and t.conditioning == "none":
        errors.append("trajectories.guidance_scale: classifier-free guidance needs conditioning; set "
                      "trajectories.guidance_scale=1.0 or teacher.conditioning to 'class' / 'prompt_embeds' / "
                      "'prompts'")
    errors += _one_of("trainer.precision", str(cfg.trainer.precision), _PRECISIONS)
    errors += _one_of("trainer.profiler", cfg.trainer.profiler, (None, "simple", "advanced", "pytorch"))
    if p.compile_blocks and not p.compile:
        errors.append("performance.compile_blocks: compiles blocks instead of the whole model, so it needs "
                      "performance.compile=true")
    errors += _one_of("performance.compile_backend", p.compile_backend,
                      ("inductor", "aot_eager", "eager", "cudagraphs"))
    errors += _one_of("performance.compile_mode", p.compile_mode, COMPILE_MODES)
    if p.compile_mode != "default" and not (p.compile and p.compile_backend == "inductor"):
        errors.append(f"performance.compile_mode: {p.compile_mode!r} is a mode of the inductor backend for the "
                      "compiled student: it needs performance.compile=true and performance.compile_backend=inductor")
    if len(cfg.optim.betas) != 2:
        errors.append(f"optim.betas: needs two values, got {list(cfg.optim.betas)}")
    if cfg.optim.warmup_steps < 0:
        errors.append(f"optim.warmup_steps: must be >= 0, got {cfg.optim.warmup_steps}")
    errors += _eval_problems(cfg.eval)
    for loss in cfg.loss_configs:
        try:
            build_loss(loss)
        except ConfigProblems as err:
            errors += [f"losses.{loss.name}.{key}: {msg}" for key, msg in err.problems]
    errors += _hardware_problems(cfg.trainer)
    if cfg.overwrite and cfg.resume is not None:
        errors.append(f"overwrite: true removes the run that resume={cfg.resume!r} would continue; use one of them")
    if cfg.resume not in (None, "last", "auto") and not Path(cfg.resume).is_file():
        errors.append(f"resume: {cfg.resume!r} is neither 'last', 'auto' nor an existing checkpoint file")
    return errors


def _hardware_problems(t: TrainerConfig) -> list[str]:
    """An accelerator that this machine does not have (found at load, not after calibration)."""
    import torch

    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return [f"trainer.accelerator: {t.accelerator!r} but this machine has no CUDA device that torch can use "
                f"(torch {torch.__version__}); use trainer.accelerator=auto or cpu"]
    return []


def _teacher_problems(t: TeacherConfig) -> list[str]:
    from train.models.families import FAMILIES

    errors = _one_of("teacher.conditioning", t.conditioning, ("class", "prompt_embeds", "prompts", "none"))
    errors += _one_of("teacher.dtype", t.dtype, ("fp32", "bf16"))
    if t.family is not None:
        errors += _one_of("teacher.family", t.family, tuple(FAMILIES))
    if t.conditioning == "prompt_embeds" and not t.prompt_embeds_path:
        errors.append("teacher.prompt_embeds_path: required when teacher.conditioning is 'prompt_embeds'")
    if t.conditioning == "prompts" and not t.prompt_file:
        errors.append("teacher.prompt_file: required when teacher.conditioning is 'prompts' (a text file with "
                      "one prompt per line)")
    if t.sample_shape is not None and (len(t.sample_shape) not in (3, 4) or min(t.sample_shape) < 1):
        errors.append(f"teacher.sample_shape: {list(t.sample_shape)} must be 3 or 4 positive sizes, e.g. "
                      "[C, H, W] or [C, F, H, W] (Wan)")
    if t.max_sequence_length is not None and t.max_sequence_length < 1:
        errors.append(f"teacher.max_sequence_length: must be >= 1, got {t.max_sequence_length}")
    return errors


def _eval_problems(ev: EvalConfig) -> list[str]:
    from train.models.schedulers import scheduler_class

    errors = []
    try:
        scheduler_class(ev.scheduler)
    except ValueError as err:
        errors.append(str(err))
    errors += _one_of("eval.features", ev.features, ("digits", "inception", "none"))
    errors += _one_of("eval.backend", ev.backend, BACKENDS)
    if ev.num_samples < 2:
        errors.append(f"eval.num_samples: must be >= 2 (distribution statistics need two samples), got "
                      f"{ev.num_samples}")
    if not 0.0 <= ev.eta <= 1.0:
        errors.append(f"eval.eta: must be in [0, 1], got {ev.eta}")
    if ev.grid_size < 0:
        errors.append(f"eval.grid_size: must be >= 0, got {ev.grid_size}")
    if ev.features == "inception":
        for key in ("inception_path", "reference_path"):
            if not getattr(ev, key):
                errors.append(f"eval.{key}: required when eval.features is 'inception' (local Inception-V3 weights "
                              "and an ADM-layout .npz of real images; nothing is downloaded); or set "
                              "eval.features=none")
    return errors


def find_config(name: str) -> Path:
    """A recipe by path, or by name in ``configs/`` (with or without ``.yaml``)."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config: {name!r} is neither a file nor a recipe in {CONFIG_DIR}; known recipes: {known}")


def _leaves(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of nested dicts (lists and empty dicts are leaves)."""
    if isinstance(data, dict) and (data or not prefix):
        return [leaf for k, v in data.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, data)]


def _pop(data: dict, key: str) -> tuple[bool, Any]:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    if isinstance(node, dict) and parts[-1] in node:
        return True, node.pop(parts[-1])
    return False, None


def _put(data: dict, key: str, value: Any) -> None:
    node = data
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node.setdefault(key.split(".")[-1], value)


def _migrate(data: dict, moved: dict[str, str], source: str) -> None:
    """Moves old keys of ``data`` to their new place (the new key wins when both are set), with a warning."""
    for old, new in moved.items():
        found, value = _pop(data, old)
        if found:
            _put(data, new, value)
            warnings.warn(f"{old} (from {source}) is now {new}; update the config", stacklevel=3)


def _known_prefix(schema: DictConfig, key: str) -> tuple[str, str]:
    """``(longest existing prefix of key, first unknown segment)``."""
    node: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            return ".".join(parts[:i]), part
        node = node[part]
    return key, ""


def _explain(err: OmegaConfBaseException, key: str, schema: DictConfig, source: str, method: str | None) -> str:
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        prefix, leaf = _known_prefix(schema, key)
        node = OmegaConf.select(schema, prefix) if prefix else schema
        allowed = sorted(node.keys()) if isinstance(node, DictConfig) else []
        bad = f"{prefix}.{leaf}" if prefix else leaf
        msg = f"{bad}: unknown key (from {source}); allowed keys here: {allowed}"
        if not prefix and leaf in METHODS:
            msg += f"; it is the section of method {leaf!r}, but this run's method is {method!r}"
        hint = difflib.get_close_matches(leaf, allowed, n=1)
        return msg + (f"; did you mean {hint[0]!r}?" if hint else "")
    if isinstance(err, ValidationError):
        return f"{key}: {str(err.msg).splitlines()[0]} (from {source})"
    return f"{key}: {str(err).splitlines()[0]} (from {source})"


def _read(argv: list[str]) -> tuple[list[tuple[str, dict]], list[str]]:
    """``[(source, data)]`` of the recipe and the command line, and argument errors."""
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
    sources: list[tuple[str, dict]] = []
    if recipe is not None:
        path = find_config(recipe)
        try:
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except OmegaConfBaseException as err:
            raise ConfigError(f"config: {path} is not a valid YAML mapping: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a YAML mapping of sections, got {type(data).__name__}")
        sources.append((str(path), data))
    try:
        sources.append(("command line", OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=False)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"command line: {str(err).splitlines()[0]}") from None
    return sources, []


def _import_plugins(sources: list[tuple[str, dict]]) -> list[str]:
    """Imports the modules named by ``plugins`` (the last source that sets it wins); one error per failure."""
    import importlib

    plugins: Any = []
    where = "defaults"
    for source, data in sources:
        if "plugins" in data:
            plugins, where = data["plugins"], source
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        return [f"plugins: must be a list of module names, got {plugins!r} (from {where})"]
    errors = []
    for name in plugins:
        try:
            importlib.import_module(name)
        except Exception as err:  # any failure of a user's module is reported with its name
            errors.append(f"plugins: cannot import {name!r} (from {where}): {type(err).__name__}: {err}")
    return errors


def load_config(argv: list[str]) -> RunConfig:
    """Builds the validated :class:`RunConfig` from ``["config=<name or path>", "key=value", ...]``.

    ``config=`` is optional (schema defaults otherwise). Raises :class:`ConfigError` with every problem (unknown
    keys, wrong types, bad values, impossible combinations), each naming its full key.
    """
    sources, errors = _read(argv)
    errors += _import_plugins(sources)
    method: str | None = DEFAULT_METHOD
    for _, data in sources:
        method = data.get("method", method)
    if method not in METHODS:
        errors.append(f"method: {method!r} is not allowed; choose one of {METHODS.names()}")
        method = None
    moved = dict(MOVED_KEYS) | ({} if method is None else {
        old: f"{method}.{new}" for old, new in METHODS.get(method).moved_keys.items()})
    losses = ["output_mse"]
    for source, data in sources:
        _migrate(data, moved, source)
        requested = data.get("losses", {})
        if not isinstance(requested, dict):
            errors.append(f"losses: must be a mapping of loss names to their settings, e.g. "
                          f"{{output_mse: {{weight: 1.0}}}}, got {requested!r} (from {source})")
            data.pop("losses")
            continue
        for name in list(requested):
            if name not in LOSSES:
                errors.append(f"losses.{name}: unknown loss (from {source}); registered losses: {LOSSES.names()}")
                requested.pop(name)
            elif name not in losses:
                losses.append(name)
    schema_cls = _run_schema(method, losses)
    schema = OmegaConf.structured(schema_cls)
    merged = OmegaConf.structured(schema_cls)
    for source, data in sources:
        for key, value in _leaves(data):
            if method is None and key.split(".")[0] in METHODS:
                continue  # the section of an unknown method cannot be checked
            try:
                OmegaConf.update(merged, key, value, merge=True)
            except OmegaConfBaseException as err:
                errors.append(_explain(err, key, schema, source, method))
    missing = sorted(OmegaConf.missing_keys(merged))
    errors += [f"{key}: required but not set (the recipe leaves it to you); add {key}=<value> to the command line"
               for key in missing]
    sections = _sections(schema_cls, merged, schema, method, {m.split(".")[0] for m in missing}, errors)
    failed = {f.name for f in dataclasses.fields(schema_cls)} - set(sections)
    # Cross-section checks still run where sections failed (defaults stand in; their own findings are dropped),
    # so that one message reports every problem of the config.
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(schema_cls)
                if f.name in failed and f.default_factory is not dataclasses.MISSING}
    cfg = schema_cls(**sections, **defaults) if set(sections) | set(defaults) == {
        f.name for f in dataclasses.fields(schema_cls) if f.init} else None
    if cfg is not None:
        errors += [e for e in validate(cfg) if e.split(".")[0].split(":")[0] not in failed]
        if method is not None and method not in failed and not any(e.startswith(f"{method}.") for e in errors):
            built = build_method(cfg)
            errors += [f"{key}: {msg}" for key, msg in built.problems_with(cfg)]
            if not cfg.loss_configs and not any(t.config.weight > 0 for t in built.loss_terms()):
                errors.append("losses: every term has weight 0 and the method adds none; set e.g. "
                              "losses.output_mse.weight=1.0")
    if errors:
        raise ConfigError(errors)
    return cfg


def _sections(schema_cls: type, merged: DictConfig, schema: DictConfig, method: str | None, skip: set[str],
              errors: list[str]) -> dict[str, Any]:
    """Each top-level field of ``merged`` as an object (dataclass sections through their ``__post_init__``
    checks, whose problems are added to ``errors`` with their full keys); sections in ``skip`` are left out."""
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(schema_cls):
        if f.name in skip:
            continue
        node = merged[f.name]
        if not isinstance(node, DictConfig):
            sections[f.name] = node
            continue
        try:
            if f.name == "losses":  # one term at a time, so that a term's problems name its full key
                terms = {}
                for name in node:
                    try:
                        terms[name] = OmegaConf.to_object(node[name])
                    except ConfigProblems as err:
                        errors += [f"losses.{name}.{key}: {msg}" for key, msg in err.problems]
                sections[f.name] = f.type(**terms) if len(terms) == len(node) else None
                if sections[f.name] is None:
                    del sections[f.name]
                continue
            sections[f.name] = OmegaConf.to_object(node)
        except ConfigProblems as err:
            errors += [f"{f.name}.{key}: {msg}" for key, msg in err.problems]
        except OmegaConfBaseException as err:
            errors.append(_explain(err, f.name, schema, "resolved config", method))
        except ValueError as err:
            errors.append(f"{f.name}: {err}")
    return sections


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved as ``config.yaml`` in the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def resolve_path(path: str) -> Path:
    """``path`` as given if it exists, else relative to the repository root (for the shipped assets)."""
    p = Path(os.path.expanduser(path))
    if p.exists() or p.is_absolute():
        return p
    return REPO_ROOT / p
