"""Layer roles per model family: the one place every method reads to decide which layers keep higher precision.

A family (``unet``, ``dit``, ``pixart``, ``cogvideox``, ``wan``; the names of the trainer's call adapters in
:mod:`train.models.families`) lists its layers by role, as module-name patterns (:func:`qat.prepare.match`):

* ``edges``: the model's first and last layers and the embedders that see only the timestep or the condition
  (patch embedding, final projection, timestep MLP, label / resolution / text-input projections). Low-bit methods
  keep them at higher precision (EfficientDM: W8A8; BinaryDM: 8 bit or full precision).
* ``modulation``: the timestep / condition modulation linears (UNet ResBlock ``time_emb_proj``, DiT adaLN).
* ``shortcuts``: residual-shortcut convolutions (UNet ``conv_shortcut``).
* ``downsamplers``: resampling convolutions (UNet ``downsamplers``).

and :func:`block_outputs` names the units whose outputs feature-distillation methods compare (the diffusers
counterpart of LDM's ``TimestepEmbedSequential`` units; transformer blocks).

Always full precision, whatever a method says: norms, embedding tables, position tables, ``scale_shift_table``
parameters, and layer types without a quantized version (Wan's ``nn.Conv3d`` patch embedding).

Role choices for the transformer families (how they map onto the LDM-4 layer map of the papers):

* ``edges`` = the patch embedding (``pos_embed.proj``, CogVideoX ``patch_embed.proj``), the final projection
  (``proj_out`` / DiT ``proj_out_2``), the timestep MLP (``*timestep_embedder.linear_{1,2}``,
  ``time_embedding.linear_{1,2}``, Wan ``condition_embedder.time_embedder``) and the other condition-embedding MLPs
  that only see the condition (PixArt's resolution / aspect-ratio embedders). Beyond the papers: the text-input
  projections (PixArt ``caption_projection``, CogVideoX ``patch_embed.text_proj``, Wan
  ``condition_embedder.text_embedder``) are edges too: they are the first layer of the text stream, as the patch
  embedding is of the image stream, and read raw T5 states, which have a few channels of very large magnitude (the
  reason T5 overflows in fp16) that a 4-bit per-tensor activation grid would clip or resolve coarsely.
* ``modulation`` = adaLN modulation linears (``SiLU(c) -> shift, scale, gate``). They play the role of the UNet's
  per-ResBlock time projections and hold a large share of a DiT's weights (28 x 1152 x 6912 in DiT-XL/2, a third
  of the model); EfficientDM's reference code quantizes the UNet's, and QVGen every adaLN linear by default.
* the transformer families have no shortcut or downsample convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["FamilyRules", "FAMILY_RULES", "family_rules", "block_outputs"]


@dataclass(frozen=True)
class FamilyRules:
    """The layers of one model family by role (module-name patterns); see the module docstring."""

    edges: list[str]
    modulation: list[str]
    shortcuts: list[str] = field(default_factory=list)
    downsamplers: list[str] = field(default_factory=list)


#: family -> layer roles, for the diffusers denoisers of the trainer's families (same names).
FAMILY_RULES: dict[str, FamilyRules] = {
    # UNet2DConditionModel / UNet2DModel (LDM-4, Stable Diffusion 1.x / 2.x, DDPM-style UNets)
    "unet": FamilyRules(
        edges=["time_embedding.linear_1", "time_embedding.linear_2", "conv_in", "conv_out"],
        modulation=["*.time_emb_proj"],
        shortcuts=["*.conv_shortcut"],
        downsamplers=["*.downsamplers.*"],
    ),
    # DiTTransformer2DModel: every block has its own timestep + label embedding (norm1.emb) and adaLN-Zero linear.
    "dit": FamilyRules(
        edges=["pos_embed.proj", "*timestep_embedder.linear_1", "*timestep_embedder.linear_2", "proj_out_2"],
        modulation=["transformer_blocks.*.norm1.linear", "proj_out_1"],
    ),
    # PixArtTransformer2DModel (alpha / sigma): one shared adaLN-single linear, per-block scale_shift_table (FP).
    "pixart": FamilyRules(
        edges=["pos_embed.proj", "adaln_single.emb.*.linear_1", "adaln_single.emb.*.linear_2",
               "caption_projection.linear_1", "caption_projection.linear_2", "proj_out"],
        modulation=["adaln_single.linear"],
    ),
    # CogVideoXTransformer3DModel (2B): expert adaLN per block (norm1 / norm2), AdaLayerNorm before the output.
    "cogvideox": FamilyRules(
        edges=["patch_embed.proj", "patch_embed.text_proj", "time_embedding.linear_1", "time_embedding.linear_2",
               "proj_out"],
        modulation=["transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm2.linear", "norm_out.linear"],
    ),
    # WanTransformer3DModel (2.1 T2V): the patch embedding is an nn.Conv3d and stays full precision (no QuantConv3d).
    "wan": FamilyRules(
        edges=["condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
               "condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2",
               "proj_out"],
        modulation=["condition_embedder.time_proj"],
    ),
}


def family_rules(family: str) -> FamilyRules:
    """The rules of ``family``; raises ``ValueError`` listing the known families."""
    if family not in FAMILY_RULES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILY_RULES)}")
    return FAMILY_RULES[family]


def block_outputs(model: nn.Module, family: str) -> list[str]:
    """Names of the modules whose outputs are the model's block-level features, in forward order.

    UNets: ``conv_in``, then per down block each ResNet unit (its attention when it has one, else the ResNet) and
    the downsampler, the middle block, then per up block each unit, the last one of a level ending at the upsampler:
    the diffusers counterpart of LDM's ``TimestepEmbedSequential`` outputs (25 for LDM-4), which BinaryDM and BiDM
    distil. Transformer families: every block of ``transformer_blocks`` (and Wan's ``blocks``).
    """
    family_rules(family)
    if family != "unet":
        blocks = getattr(model, "transformer_blocks", None) or getattr(model, "blocks", None)
        prefix = "transformer_blocks" if hasattr(model, "transformer_blocks") else "blocks"
        return [f"{prefix}.{i}" for i in range(len(blocks or []))]
    names = ["conv_in"]
    for i, block in enumerate(model.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            names.append(f"down_blocks.{i}.attentions.{j}" if attentions else f"down_blocks.{i}.resnets.{j}")
        if getattr(block, "downsamplers", None):
            names.append(f"down_blocks.{i}.downsamplers.0")
    names.append("mid_block")
    for i, block in enumerate(model.up_blocks):
        attentions = getattr(block, "attentions", None)
        last = len(block.resnets) - 1
        for j in range(len(block.resnets)):
            if j == last and getattr(block, "upsamplers", None):
                names.append(f"up_blocks.{i}.upsamplers.0")
            else:
                names.append(f"up_blocks.{i}.attentions.{j}" if attentions else f"up_blocks.{i}.resnets.{j}")
    return names


# -- per-module attention head counts of converted CompVis UNets ----------------------------------------------------
#: config key of a converted CompVis UNet's per-module attention head counts (:func:`apply_attention_heads`)
HEADS_KEY = "_compvis_attention_heads"


def apply_attention_heads(unet: nn.Module) -> int:
    """Sets the head count of every attention module listed in ``unet.config[HEADS_KEY]``; returns how many.

    diffusers' ``UNet2DModel`` has one ``attention_head_dim`` for all blocks, while a CompVis UNet configured with
    ``num_heads`` keeps the head *count* fixed, so its head dim changes with the width of the level (LSUN churches
    LDM-8: 8 heads of 24..96 channels). Such a UNet is saved with an ``attention_head_dim`` that divides every width
    (so the projection shapes are right) and the true per-module head counts under :data:`HEADS_KEY`;
    ``from_pretrained`` / ``from_config`` keep that key in ``unet.config`` but do not apply it, so loaders must call
    this function after loading (a no-op for every other model; :func:`qat.load_quantized` calls it on the models it
    builds). The attention maths is then exactly CompVis'.
    """
    heads = dict(getattr(getattr(unet, "config", None), HEADS_KEY, None) or {})
    for name, count in heads.items():
        attn = unet.get_submodule(name)
        if attn.inner_dim % count:
            raise ValueError(f"{HEADS_KEY}: {name} has {attn.inner_dim} channels, not divisible by {count} heads")
        attn.heads = attn.sliceable_head_dim = int(count)
        attn.scale = (attn.inner_dim // count) ** -0.5
    return len(heads)
