"""Converts CompVis latent-diffusion checkpoints into teacher directories in the diffusers layout that
:func:`train.models.teacher.load_teacher` reads, in one call: UNet, first stage, class embedder and scheduler.

    python -m train.tools.convert_compvis cin256-v2.safetensors teachers/ldm4-cin256 --layout cin256-v2
    python -m train.tools.convert_compvis bedrooms.safetensors teachers/ldm4-bedrooms --layout lsun_bedrooms-ldm-vq-4
    python -m train.tools.convert_compvis model.safetensors out/ --compvis-config configs/latent-diffusion/model.yaml

A layout is the ``model.params`` of a CompVis yaml (``unet_config``, ``first_stage_config``, ``cond_stage_config``,
``linear_start`` / ``linear_end`` / ``timesteps``); the diffusers configs and every key map are derived from it
(:mod:`train.tools.convert_compvis_unet`, :mod:`train.tools.convert_compvis_vae`), so any model of the same families
converts without a hand-written table. The EfficientDM layer map (:mod:`qat.methods.efficientdm`) is checked on the
converted UNet against the reference code's rule applied to the CompVis names (:func:`efficientdm_layer_check`).

Checkpoints are read with ``safetensors`` or, for ``.ckpt``, with ``torch.load(weights_only=True)`` only: pickles
that need arbitrary code are refused, never executed.

Output directory::

    <out>/unet/             UNet2DConditionModel (SpatialTransformer UNets) or UNet2DModel (legacy AttentionBlock)
    <out>/vqvae/ | vae/     VQModel (VQ first stage) or AutoencoderKL (KL first stage), scaling_factor = scale_factor
    <out>/class_embedder/   ClassEmbedder (train.models.class_embedder) from cond_stage_model.embedding.weight
                            (null class = last row)
    <out>/scheduler/        DDPMScheduler with LDM's "linear" betas (= diffusers "scaled_linear")
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from torch import Tensor, nn

from train.models.class_embedder import ClassEmbedder
from train.tools.convert_compvis_unet import (
    HEADS_KEY,
    build_unet,
    compvis_to_diffusers_unet_keys,
    compvis_unet_config,
    convert_unet_state_dict,
    diffusers_to_compvis_unet_keys,
    key_listing,
    qkv_order_of,
    unet_key_map,
)
from train.tools.convert_compvis_vae import build_vae, compvis_first_stage_config, convert_vae_state_dict

__all__ = [
    "CIN256_V2_UNET_CONFIG",
    "KL_F8_DDCONFIG",
    "LAYOUTS",
    "SCHEDULER_CONFIG",
    "VQ_F4_DDCONFIG",
    "LayerMapCheck",
    "TeacherSpec",
    "compvis_to_diffusers_unet_keys",
    "convert_checkpoint",
    "convert_unet_state_dict",
    "diffusers_to_compvis_unet_keys",
    "efficientdm_layer_check",
    "load_compvis_config",
    "load_compvis_state_dict",
    "main",
    "teacher_spec",
]

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
CLASS_EMBEDDING_KEY = "cond_stage_model.embedding.weight"
SCALE_FACTOR_KEY = "scale_factor"

# cin256-v2 (LDM-4 ImageNet): model_channels 192, channel_mult (1, 2, 3, 5), 2 res blocks, attention at
# resolutions 8/4/2 of the 64x64 latent = the three lower levels, one head whose dim is the channel count, context 512.
CIN256_V2_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 3, "out_channels": 3, "block_out_channels": (192, 384, 576, 960),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 512, "attention_head_dim": 1,
}

# LDM's "linear" schedule is linear in sqrt(beta), which diffusers calls "scaled_linear".
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "clip_sample": False,
}

# The first stages of the CompVis model zoo (configs/first_stage_models/{vq-f4,kl-f8}/config.yaml, ddconfig).
VQ_F4_DDCONFIG: dict[str, Any] = {
    "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
KL_F8_DDCONFIG: dict[str, Any] = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
_VQ_F4 = {"target": "ldm.models.autoencoder.VQModelInterface",
          "params": {"embed_dim": 3, "n_embed": 8192, "ddconfig": VQ_F4_DDCONFIG}}

#: Layout name (the CompVis yaml's file name) -> its ``model.params`` (configs/latent-diffusion/*.yaml).
LAYOUTS: dict[str, dict[str, Any]] = {
    "cin256-v2": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "conditioning_key": "crossattn",
        "unet_config": {"params": {
            "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_heads": 1,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512}},
        "first_stage_config": _VQ_F4,
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": 1001, "embed_dim": 512, "key": "class_label"}},
    },
    "lsun_bedrooms-ldm-vq-4": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
        "unet_config": {"params": {
            "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
            "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
            "num_head_channels": 32}},
        "first_stage_config": _VQ_F4,
        "cond_stage_config": "__is_unconditional__",
    },
    # LDM-8: 8 heads at every attention level (head dims 24..96), which a stock UNet2DModel config cannot express:
    # it converts with per_block_heads (--per-block-heads), and loaders must apply the heads (apply_attention_heads).
    "lsun_churches-ldm-kl-8": {
        "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "scale_by_std": True,
        "unet_config": {"params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
            "attention_resolutions": [1, 2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4, 4],
            "num_heads": 8, "use_scale_shift_norm": True, "resblock_updown": True}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": 4, "ddconfig": KL_F8_DDCONFIG}},
        "cond_stage_config": "__is_unconditional__",
    },
}

# First-stage tensors a teacher does not need: the training losses (LPIPS, discriminator) of a first-stage checkpoint.
_FIRST_STAGE_IGNORED = "first_stage_model.loss."
# Top-level tensors the converter reads (the schedule is checked, the latent scale copied); the rest is ignored.
_CONSUMED = ("betas", SCALE_FACTOR_KEY)


# ------------------------------------------------------------------------------------------------- layouts
@dataclass
class TeacherSpec:
    """What a CompVis ``model.params`` turns into (diffusers configs carry ``_class_name``).

    Args:
        unet_config: UNet kwargs, or None when the layout has no ``unet_config``.
        qkv_order: ``legacy`` / ``new`` (``use_new_attention_order``) for legacy attention blocks.
        vae_config: first-stage kwargs, or None.
        scheduler_config: ``DDPMScheduler`` kwargs.
        conditioning: ``class`` or ``none`` (the ``teacher.conditioning`` to use).
        scale_by_std: the latent scale is a checkpoint buffer (``scale_factor``), not a config value.
    """

    unet_config: dict[str, Any] | None
    qkv_order: str = "legacy"
    vae_config: dict[str, Any] | None = None
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER_CONFIG))
    conditioning: str = "none"
    scale_by_std: bool = False

    @property
    def vae_subfolder(self) -> str | None:
        """``vqvae`` for a VQModel, ``vae`` for an AutoencoderKL, None without a first stage."""
        if self.vae_config is None:
            return None
        return "vqvae" if self.vae_config.get("_class_name") == "VQModel" else "vae"


def _params(node: Any) -> dict[str, Any]:
    return dict(node.get("params", {})) if isinstance(node, Mapping) else {}


def teacher_spec(params: Mapping[str, Any], lazy_unet: bool = False, per_block_heads: bool = False) -> TeacherSpec:
    """The diffusers configs of a CompVis ``LatentDiffusion`` whose yaml ``model.params`` is ``params``.

    Args:
        params: e.g. ``LAYOUTS["cin256-v2"]`` or :func:`load_compvis_config` of a yaml.
        lazy_unet: leave ``unet_config`` None (the caller supplies its own; its translation errors do not apply).
        per_block_heads: see :func:`train.tools.convert_compvis_unet.compvis_unet_config`.

    Raises:
        ValueError: a schedule, parameterization, conditioning or model option the converter does not support.
    """
    p = dict(params)
    for key, value in (("beta_schedule", "linear"), ("parameterization", "eps"), ("given_betas", None)):
        if p.get(key, value) != value:
            raise ValueError(f"CompVis model.params {key}={p[key]!r} is not supported (only {value!r})")
    unet_params = _params(p.get("unet_config"))
    unet_config = None if lazy_unet or not unet_params else compvis_unet_config(unet_params, per_block_heads)
    spec = TeacherSpec(unet_config=unet_config, qkv_order=qkv_order_of(unet_params),
                       scale_by_std=bool(p.get("scale_by_std", False)))
    spec.scheduler_config = {**SCHEDULER_CONFIG, "num_train_timesteps": int(p.get("timesteps", 1000)),
                             "beta_start": float(p.get("linear_start", 0.0015)),
                             "beta_end": float(p.get("linear_end", 0.0195))}
    first = p.get("first_stage_config")
    if isinstance(first, Mapping):
        target, fp = str(first.get("target", "")), _params(first)
        if target.rsplit(".", 1)[-1] not in ("VQModelInterface", "VQModel", "AutoencoderKL"):
            raise ValueError(f"CompVis first_stage_config target {target!r} is not supported (VQModelInterface, "
                             "VQModel, AutoencoderKL)")
        n_embed = fp.get("n_embed") if "VQ" in target.rsplit(".", 1)[-1] else None
        spec.vae_config = compvis_first_stage_config(fp["ddconfig"], int(fp["embed_dim"]), n_embed,
                                                     float(p.get("scale_factor", 1.0)))
    cond = p.get("cond_stage_config")
    if isinstance(cond, Mapping):
        target = str(cond.get("target", ""))
        if target.rsplit(".", 1)[-1] != "ClassEmbedder" or p.get("conditioning_key", "crossattn") != "crossattn":
            raise ValueError(f"CompVis cond_stage_config {target!r} (conditioning_key "
                             f"{p.get('conditioning_key')!r}) is not supported: only a ClassEmbedder as "
                             "cross-attention context (cin256) or '__is_unconditional__'")
        spec.conditioning = "class"
    elif cond not in (None, "__is_unconditional__"):
        raise ValueError(f"CompVis cond_stage_config {cond!r} is not supported (a ClassEmbedder or "
                         "'__is_unconditional__')")
    return spec


def load_compvis_config(path: str | Path) -> dict[str, Any]:
    """``model.params`` of a CompVis yaml (``configs/latent-diffusion/*.yaml``) as a plain dict."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(str(path)), resolve=True)
    try:
        return dict(cfg["model"]["params"])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: expected a CompVis config with model.params (unet_config, first_stage_config, "
                         "...)") from None


# ---------------------------------------------------------------------------------------- EfficientDM layer map
#: CompVis modules the reference keeps at 8 bits: the first three and the last Conv2d/Linear in module order.
_REFERENCE_SPECIAL = ("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2")


@dataclass
class LayerMapCheck:
    """EfficientDM's treatment of every Conv2d/Linear of a converted UNet, two ways, by diffusers module name.

    ``reference``: the reference code's rule (ThisisBillhe/EfficientDM ``QuantModel_intnlora``) on the CompVis
    modules: every ``nn.Conv2d`` / ``nn.Linear`` whose attribute name contains neither ``skip`` nor ``op`` is
    quantized, the first three and the last at W8A8 without LoRA, the rest with QALoRA; ``Conv1d`` (the legacy
    ``AttentionBlock``'s ``qkv`` / ``proj_out``) is left in full precision. ``spec``: what
    ``qat.methods.efficientdm.build_student`` (``prepare``) does to the diffusers UNet with ``overrides``
    (``EfficientDMConfig`` fields). Roles: ``W8A8``, ``QALoRA``, ``FP``. ``fix``: the ``efficientdm.*`` overrides
    that make the two agree (checked), when they differ.
    """

    reference: dict[str, str]
    spec: dict[str, str]
    overrides: dict[str, list[str]] = field(default_factory=dict)
    fix: dict[str, list[str]] | None = None

    @staticmethod
    def counts(roles: Mapping[str, str]) -> dict[str, int]:
        """``{"W8A8": n, "QALoRA": m, "FP": k}``."""
        return {r: sum(1 for v in roles.values() if v == r) for r in ("W8A8", "QALoRA", "FP")}

    @property
    def mismatches(self) -> list[tuple[str, str, str]]:
        """``(module, reference role, spec role)`` where the two differ."""
        names = list(self.reference) + [n for n in self.spec if n not in self.reference]
        return [(n, self.reference.get(n, "-"), self.spec.get(n, "-")) for n in names
                if self.reference.get(n) != self.spec.get(n)]

    def __str__(self) -> str:
        ref, spec = self.counts(self.reference), self.counts(self.spec)
        head = (f"EfficientDM layer map: qat.methods.efficientdm{f' with {self.overrides}' if self.overrides else ''}"
                f" quantizes {spec['W8A8'] + spec['QALoRA']} layers ({spec['W8A8']} W8A8, {spec['QALoRA']} QALoRA, "
                f"{spec['FP']} FP); the reference rule on the CompVis names quantizes "
                f"{ref['W8A8'] + ref['QALoRA']} ({ref['W8A8']} W8A8, {ref['QALoRA']} QALoRA, {ref['FP']} FP)")
        bad = self.mismatches
        if not bad:
            return head + ": identical"
        lines = [head + f": {len(bad)} layers differ"] + [f"  {n}: reference {r}, here {s}" for n, r, s in bad[:6]]
        if len(bad) > 6:
            lines.append(f"  ... ({len(bad) - 6} more)")
        if any(".attentions." in n and r == "FP" for n, r, _ in bad):
            lines.append("  attentions: the legacy AttentionBlocks' projections are Conv1d in CompVis, which the "
                         "reference does not quantize")
        if any(".downsamplers." in n and s == "FP" and r != "FP" for n, r, s in bad):
            lines.append("  downsamplers: resblock_updown downsamples with ResBlocks, which the reference quantizes "
                         "(it only skips modules named 'op'); the family's '*.downsamplers.*' exclusion drops them")
        if self.fix:
            lines.append("  to match the reference, set " + " ".join(
                f"efficientdm.{k}={json.dumps(v)}" for k, v in self.fix.items()) + " (checked: identical)")
        return "\n".join(lines)


def _suggest(check: LayerMapCheck, unet: nn.Module) -> dict[str, list[str]]:
    """``EfficientDMConfig`` overrides addressing the known differences of :class:`LayerMapCheck`."""
    from qat.families import FAMILY_RULES
    from qat.prepare import match

    fix: dict[str, list[str]] = {}
    bad = check.mismatches
    if any(".attentions." in n and r == "FP" for n, r, _ in bad):
        fix["extra_exclude"] = ["*.attentions.*"]
    if any(".downsamplers." in n and s == "FP" and r != "FP" for n, r, s in bad):
        unet_rules = FAMILY_RULES["unet"]
        patterns = [p for p in unet_rules.shortcuts + unet_rules.downsamplers if p != "*.downsamplers.*"]
        if any(match(name, "*.downsamplers.*.conv") and isinstance(m, nn.Conv2d) for name, m in unet.named_modules()):
            patterns.append("*.downsamplers.*.conv")  # conv downsamplers (the CompVis 'op') stay excluded
        fix["exclude_patterns"] = patterns
    return fix


def efficientdm_layer_check(unet: nn.Module, extra_exclude: Sequence[str] = (),
                            exclude_patterns: Sequence[str] | None = None) -> LayerMapCheck:
    """Compares EfficientDM's layer treatment on a converted UNet with the reference code's rule (see
    :class:`LayerMapCheck`). ``prepare`` runs on a meta-device copy built from ``unet.config``: nothing is allocated
    and ``unet`` is not modified.

    Args:
        unet: a converted ``UNet2DConditionModel`` / ``UNet2DModel``.
        extra_exclude: ``efficientdm.extra_exclude`` patterns to apply (e.g. ``["*.attentions.*"]``).
        exclude_patterns: ``efficientdm.exclude_patterns`` (replaces the family's exclusions) or None.
    """
    from qat.methods.efficientdm import EfficientDMConfig, efficientdm_spec
    from qat.prepare import prepare

    mapping, conv_dims = unet_key_map(unet)
    modules = dict(unet.named_modules())
    reference: dict[str, str] = {}
    for key, target in mapping.items():
        if not key.endswith(".weight"):
            continue
        src = key[: -len(".weight")]
        for t in (target,) if isinstance(target, str) else target:
            dst = t[: -len(".weight")]
            if not isinstance(modules[dst], (nn.Conv2d, nn.Linear)):
                continue  # norms and embeddings are never quantized
            attr = src.rsplit(".", 1)[-1]
            if conv_dims.get(key) == 1 or "skip" in attr or "op" in attr:
                reference[dst] = "FP"  # Conv1d (legacy attention) or a name the reference filters out
            else:
                reference[dst] = "W8A8" if src in _REFERENCE_SPECIAL else "QALoRA"
    overrides: dict[str, list[str]] = {}
    if extra_exclude:
        overrides["extra_exclude"] = list(extra_exclude)
    if exclude_patterns is not None:
        overrides["exclude_patterns"] = list(exclude_patterns)
    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
    report = prepare(meta, efficientdm_spec(EfficientDMConfig(family="unet", **overrides)))
    spec = {name: "QALoRA" if rank else "W8A8" for name, _, _, _, rank, _ in report.rows}
    spec.update({name: "FP" for name in report.excluded})
    check = LayerMapCheck(reference=reference, spec=spec, overrides=overrides)
    if check.mismatches and not overrides:
        fix = _suggest(check, unet)
        if fix and not efficientdm_layer_check(unet, **fix).mismatches:
            check.fix = fix
    return check


# ---------------------------------------------------------------------------------------------------- checkpoints
def load_compvis_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a CompVis checkpoint (``.safetensors``, or ``.ckpt``/``.pt``/``.pth`` holding plain tensors).

    ``.ckpt`` files are opened with ``torch.load(weights_only=True)``: a pickle that needs anything beyond tensors and
    containers is refused (never executed). Non-tensor entries of ``state_dict`` are dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the pickle is not loadable safely, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise ValueError(
            f"{path}: refused to unpickle: the file holds objects other than tensors ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Loading it would execute arbitrary code. On a trusted "
            "machine, convert it to safetensors, e.g. safetensors.torch.save_file({k: v.contiguous() for k, v in "
            "torch.load(path, weights_only=False)['state_dict'].items() if isinstance(v, torch.Tensor)}, "
            "'model.safetensors'), and pass the .safetensors file instead."
        ) from err
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict' entry (CompVis checkpoint), got "
                         f"{type(obj).__name__}")
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path}: 'state_dict' holds no tensors")
    return tensors


@dataclass
class _Parts:
    unet: dict[str, Tensor] = field(default_factory=dict)
    first_stage: dict[str, Tensor] = field(default_factory=dict)
    class_table: Tensor | None = None
    cond_other: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _split(sd: Mapping[str, Tensor]) -> _Parts:
    """UNet / first-stage tensors without prefix, the class table, unsupported cond-stage keys, ignored keys."""
    parts = _Parts()
    for k, v in sd.items():
        if k.startswith(UNET_PREFIX):
            parts.unet[k[len(UNET_PREFIX):]] = v
        elif k.startswith(FIRST_STAGE_PREFIX) and not k.startswith(_FIRST_STAGE_IGNORED):
            parts.first_stage[k[len(FIRST_STAGE_PREFIX):]] = v
        elif k == CLASS_EMBEDDING_KEY:
            parts.class_table = v
        elif k.startswith(COND_STAGE_PREFIX):
            parts.cond_other.append(k)
        elif k not in _CONSUMED:  # schedule buffers, model_ema.*, logvar, first-stage losses
            parts.ignored.append(k)
    return parts


def _check_betas(betas: Tensor, scheduler: DDPMScheduler, source: str) -> None:
    # The CompVis checkpoint stores its schedule; a mismatch would silently change every denoising step.
    ours = scheduler.betas.to(torch.float64)
    theirs = betas.to(torch.float64).flatten()
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-7):
        raise ValueError(
            f"{source}: key 'betas' ({theirs.numel()} steps, {theirs[0].item():.6g}..{theirs[-1].item():.6g}) does "
            f"not match the scheduler ({ours.numel()} steps, {ours[0].item():.6g}..{ours[-1].item():.6g}); pass "
            "the layout of the checkpoint (--layout / --compvis-config: linear_start, linear_end, timesteps) or "
            "scheduler_config overrides that match")


def _check_class_table(table: Tensor, unet: nn.Module, source: str) -> None:
    if table.ndim != 2 or table.shape[0] < 2:
        raise ValueError(f"{source}: {CLASS_EMBEDDING_KEY} has shape {tuple(table.shape)}; expected "
                         "(num_classes + 1, context_dim) with the null class as last row")
    width = getattr(unet.config, "cross_attention_dim", None)
    if table.shape[1] != width:
        raise ValueError(f"{source}: {CLASS_EMBEDDING_KEY} has width {table.shape[1]} but the UNet's "
                         f"cross_attention_dim is {width}; fix the UNet config (context_dim)")


def _convert_first_stage(tensors: Mapping[str, Tensor], sd: Mapping[str, Tensor], vae_config: Mapping[str, Any],
                         spec: TeacherSpec, source: str) -> nn.Module:
    """The diffusers autoencoder of ``first_stage_model.*``, ``scaling_factor`` from the checkpoint if it has one."""
    cfg = dict(vae_config)
    if SCALE_FACTOR_KEY in sd:  # LatentDiffusion registers it as a buffer when scale_by_std is set
        cfg["scaling_factor"] = float(sd[SCALE_FACTOR_KEY].item())
    elif spec.scale_by_std:
        raise ValueError(f"{source}: the layout has scale_by_std=True but the checkpoint has no '{SCALE_FACTOR_KEY}' "
                         "tensor; pass the latent scale as vae_config scaling_factor")
    vae = build_vae(cfg).eval()
    vae.load_state_dict(convert_vae_state_dict(tensors, vae, source=source), strict=True)
    return vae


def convert_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, unet_config: dict[str, Any] | None = None,
                       scheduler_config: dict[str, Any] | None = None, *,
                       layout: str | Mapping[str, Any] = "cin256-v2", vae_config: dict[str, Any] | None = None,
                       check_layer_map: bool = True, per_block_heads: bool = False) -> Path:
    """Writes a DiffQAT teacher directory from a full CompVis ``LatentDiffusion`` checkpoint.

    Args:
        checkpoint_path: ``.safetensors`` or ``.ckpt`` with ``model.diffusion_model.*`` and optionally
            ``first_stage_model.*`` (written to ``vqvae/`` or ``vae/``) and ``cond_stage_model.embedding.weight``
            of shape ``(num_classes + 1, context_dim)`` (written to ``class_embedder/``).
        out_dir: directory to create or fill.
        unet_config: diffusers UNet kwargs overriding the layout's (``_class_name`` optional: cross-attention
            configs are ``UNet2DConditionModel``, others ``UNet2DModel``).
        scheduler_config: overrides of the layout's scheduler (``DDPMScheduler`` kwargs).
        layout: a name in :data:`LAYOUTS` or a CompVis ``model.params`` mapping (:func:`load_compvis_config`).
        vae_config: diffusers ``VQModel`` / ``AutoencoderKL`` kwargs overriding the layout's first stage.
        check_layer_map: log :func:`efficientdm_layer_check` of the converted UNet.
        per_block_heads: convert a ``num_heads`` legacy-attention UNet whose head dim changes per level (LSUN
            churches LDM-8) with per-module head counts in ``unet/config.json``; loaders must then call
            :func:`train.tools.convert_compvis_unet.apply_attention_heads` after ``from_pretrained``.

    Returns:
        ``out_dir`` as a Path (``teacher.path``; the log line says which conditioning and ``vae_subfolder`` to use).

    Raises:
        ValueError: missing UNet weights, unknown / missing / mis-shaped keys (named, with the config to fix), a
            class table that does not fit the UNet, betas that do not match the scheduler, a scale_by_std
            checkpoint without its scale, an unsupported layout, or an unsafe pickle.
    """
    path = Path(checkpoint_path)
    out = Path(out_dir)
    if isinstance(layout, str) and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)} (or pass the CompVis yaml's "
                         "model.params, --compvis-config)")
    params = LAYOUTS[layout] if isinstance(layout, str) else dict(layout)
    sd = load_compvis_state_dict(path)
    parts = _split(sd)
    if not parts.unet:
        raise ValueError(f"{path}: no '{UNET_PREFIX}*' keys; is this a CompVis LatentDiffusion checkpoint? "
                         f"first keys: {list(sd)[:5]}")
    if parts.cond_other:
        raise ValueError(f"{path}: cond_stage_model keys {key_listing(parts.cond_other)} are not supported: the "
                         f"converter handles a class table ({CLASS_EMBEDDING_KEY}) or no conditioning model")
    spec = teacher_spec(params, lazy_unet=unet_config is not None, per_block_heads=per_block_heads)
    unet = build_unet(unet_config if unet_config is not None else spec.unet_config).eval()
    if getattr(unet.config, HEADS_KEY, None):
        log.warning("%s: the UNet keeps CompVis' per-level head counts in unet/config.json (%s); from_pretrained "
                    "does not apply them: load it with train.tools.convert_compvis_unet.apply_attention_heads(unet) "
                    "after from_pretrained, or its attention is wrong", path, HEADS_KEY)
    unet.load_state_dict(convert_unet_state_dict(parts.unet, unet, source=str(path), qkv_order=spec.qkv_order),
                         strict=True)

    scheduler = DDPMScheduler(**{**spec.scheduler_config, **(scheduler_config or {})})
    if "betas" in sd:
        _check_betas(sd["betas"], scheduler, str(path))
    if parts.class_table is not None:
        _check_class_table(parts.class_table, unet, str(path))
    elif spec.conditioning == "class":
        log.warning("%s: the layout is class-conditional but the checkpoint has no %s; no class_embedder/ is "
                    "written", path, CLASS_EMBEDDING_KEY)

    vae = None
    vae_cfg = vae_config if vae_config is not None else spec.vae_config
    if parts.first_stage:
        if vae_cfg is None:
            raise ValueError(f"{path}: {len(parts.first_stage)} first_stage_model.* tensors but no first-stage "
                             "config; pass --layout / --compvis-config with a first_stage_config, or --vae-config")
        vae = _convert_first_stage(parts.first_stage, sd, vae_cfg, spec, str(path))
    elif vae_cfg is not None:
        log.warning("%s: no first_stage_model.* tensors; the teacher has no latent decoder (leave "
                    "teacher.vae_subfolder unset)", path)
    if parts.ignored:
        log.info("%s: ignored tensors outside the UNet / first stage / class table: %s", path,
                 key_listing(parts.ignored, 4))
    if check_layer_map:
        log.info("%s", efficientdm_layer_check(unet))

    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out / "unet"))
    scheduler.save_pretrained(str(out / "scheduler"))
    subfolder = None
    if vae is not None:
        subfolder = "vqvae" if type(vae).__name__ == "VQModel" else "vae"
        vae.save_pretrained(str(out / subfolder))
    if parts.class_table is not None:
        table = parts.class_table
        embedder = ClassEmbedder(num_classes=table.shape[0] - 1, embed_dim=table.shape[1])
        embedder.embedding.weight.data.copy_(table)
        embedder.save_pretrained(str(out / "class_embedder"))
    log.info("%s: teacher.path=%s teacher.conditioning=%s%s", out, out,
             "class" if parts.class_table is not None else "none",
             f" teacher.vae_subfolder={subfolder}" if subfolder else "")
    return out


# ------------------------------------------------------------------------------------------------------------ CLI
def _json_config(path: str) -> dict[str, Any]:
    """A diffusers config.json (or plain kwargs) as kwargs; ``_class_name`` is kept, other ``_*`` keys dropped."""
    raw = json.loads(Path(path).read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_") or k in ("_class_name", HEADS_KEY)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.tools.convert_compvis CHECKPOINT OUT_DIR [--layout NAME | --compvis-config YAML] [...]``."""
    parser = argparse.ArgumentParser(description="Convert a CompVis latent-diffusion checkpoint (UNet, first stage, "
                                                 "class embedder, schedule) into a DiffQAT teacher directory.")
    parser.add_argument("checkpoint", help=".safetensors (preferred) or .ckpt holding only tensors")
    parser.add_argument("out_dir")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="cin256-v2",
                        help="named CompVis model config of the checkpoint (default cin256-v2)")
    parser.add_argument("--compvis-config", help="CompVis yaml of the checkpoint (model.params; overrides --layout)")
    parser.add_argument("--unet-config", help="JSON of diffusers UNet kwargs (overrides the layout's UNet)")
    parser.add_argument("--vae-config", help="JSON of diffusers VQModel / AutoencoderKL kwargs (overrides the "
                                             "layout's first stage)")
    parser.add_argument("--per-block-heads", action="store_true",
                        help="store per-module head counts for num_heads UNets whose head dim changes per level "
                             "(LSUN churches LDM-8); loaders must apply them (apply_attention_heads)")
    parser.add_argument("--no-layer-check", action="store_true", help="skip the EfficientDM layer-map check")
    args = parser.parse_args(argv)
    layout: str | dict[str, Any] = load_compvis_config(args.compvis_config) if args.compvis_config else args.layout
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = convert_checkpoint(args.checkpoint, args.out_dir,
                             unet_config=_json_config(args.unet_config) if args.unet_config else None,
                             vae_config=_json_config(args.vae_config) if args.vae_config else None,
                             layout=layout, check_layer_map=not args.no_layer_check,
                             per_block_heads=args.per_block_heads)
    written = [p.name for p in sorted(out.iterdir()) if (p / "config.json").exists() or p.name == "scheduler"]
    print(f"wrote {out} ({', '.join(f'{w}/' for w in written)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

