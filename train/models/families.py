"""Model families: how each kind of diffusers denoiser is called, what one sample looks like, how it is conditioned.

Every part of the trainer (trajectories, the Lightning system, calibration, the sampling pipeline, evaluation, the
export check) calls a denoiser through one function, :func:`denoise`::

    eps = denoise(model, x, t, context)      # x: one batch in the family's layout, eps: the same shape as x

and the family adapter turns that into the model's own forward arguments. The registry is one explicit dict
(:data:`FAMILIES`, name -> :class:`Family`):

=========== ================================== ============= ======================================================
name        diffusers classes                  sample        condition (``context``)
=========== ================================== ============= ======================================================
unet        UNet2DConditionModel, UNet2DModel  (C, H, W)     ``(B, L, D)`` cross-attention states, or None
dit         DiTTransformer2DModel              (C, H, W)     class labels ``(B,)`` -> ``class_labels``
pixart      PixArtTransformer2DModel           (C, H, W)     ``(B, L, D [+1])`` text states [+ mask feature]
cogvideox   CogVideoXTransformer3DModel        (F, C, H, W)  ``(B, L, D)`` text states, L = max_text_seq_length
wan         WanTransformer3DModel              (C, F, H, W)  ``(B, L, D)`` text states
=========== ================================== ============= ======================================================

Outputs with learned variance (DiT, PixArt: ``2C`` channels) are cut to the first ``C`` channels (the noise
prediction). The timestep always goes in as the ``timestep`` keyword, so :func:`qat.attach_timestep_hook` sets
temporal quantizers from it whatever the positional order of the model's forward (PixArt's second positional
argument is ``encoder_hidden_states``).

Why the PixArt mask travels inside the context: every code path passes one context tensor per batch (it is
concatenated for CFG, indexed by prompt, moved between devices, checkpointed with the trajectory state), so a
separate mask would have to follow it through all of them. PixArt contexts therefore carry the encoder attention
mask (1 keep, 0 padding) as one extra last feature, ``(B, L, D + 1)``; the adapter splits it off again.

The family is found from the model class (its MRO, so subclasses work), or given explicitly
(``teacher.family``), which :func:`set_family` records on the model instance (``diffqat_family``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qat.families import HEADS_KEY, apply_attention_heads

__all__ = ["Family", "TextConvention", "FAMILIES", "family_of", "family_for_class", "get_family", "set_family",
           "denoise", "model_dtype", "compile_repeated_blocks", "prefers_channels_last",
           "region_compile_kwargs", "HEADS_KEY", "apply_attention_heads"]

FAMILY_ATTR = "diffqat_family"
# set (True) on a model compiled with CUDA graphs (performance.compile_mode): it is then run eagerly outside autograd
CUDA_GRAPHS_ATTR = "diffqat_cuda_graphs"


@dataclass(frozen=True)
class TextConvention:
    """How a family's own diffusers pipeline turns prompts into the states its denoiser reads.

    Args:
        max_length: tokens per prompt; None reads ``length_key`` from the denoiser config, else the tokenizer's
            ``model_max_length`` (CLIP: 77).
        length_key: denoiser config key fixing the text length (CogVideoX: ``max_text_seq_length``).
        encoder_mask: pass the tokenizer's attention mask to the text encoder.
        zero_pad: zero the states of padding tokens after encoding (Wan).
        model_mask: the denoiser takes the attention mask too (PixArt ``encoder_attention_mask``).
    """

    max_length: int | None = None
    length_key: str | None = None
    encoder_mask: bool = False
    zero_pad: bool = False
    model_mask: bool = False


class Family:
    """One model family: sample layout, conditioning and the call of its denoiser (subclasses override)."""

    name: str = ""
    classes: tuple[str, ...] = ()
    channel_axis: int = 1  # axis of C in a batch
    class_labels: bool = False  # labels go into the model itself (no class embedder)
    text: TextConvention | None = None
    #: layout of one sample, for messages and ``teacher.sample_shape``
    layout: str = "(C, H, W)"
    #: classes of the repeated blocks that ``performance.compile_blocks`` compiles one by one
    repeated_blocks: tuple[str, ...] = ("BasicTransformerBlock",)

    def sample_shape(self, config: Any) -> tuple[int, ...]:
        """Shape of one sample in the model's layout, from its config."""
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        return int(config.in_channels), int(size), int(size)

    def num_classes(self, model: nn.Module) -> int:
        """Number of classes of a model that embeds labels itself (``class_labels``)."""
        raise NotImplementedError(f"family {self.name!r} does not embed class labels")

    def call_kwargs(self, model: nn.Module, x: Tensor, t: Tensor, context: Tensor | None) -> dict[str, Any]:
        """Keyword arguments of ``model.forward`` for batch ``x``, timesteps ``t (B,)`` and ``context``."""
        kwargs: dict[str, Any] = {"sample": x, "timestep": t}
        if context is not None:
            kwargs["encoder_hidden_states"] = context
        return kwargs

    def denoise(self, model: nn.Module, x: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
        """The model's prediction for ``x``, cut to ``x``'s channels (learned-variance outputs)."""
        out = model(**self.call_kwargs(model, x, t, context), return_dict=False)[0]
        c = x.shape[self.channel_axis]
        return out.narrow(self.channel_axis, 0, c) if out.shape[self.channel_axis] != c else out

    def as_images(self, x: Tensor) -> Tensor:
        """Samples as images ``(B, C, H, W')`` for grids and image metrics (video: frames side by side)."""
        return x


def _need(context: Tensor | None, family: str, what: str) -> Tensor:
    if context is None:
        raise ValueError(f"family {family!r} needs {what} (context was None); check teacher.conditioning")
    return context


class _UNet(Family):
    name = "unet"
    classes = ("UNet2DConditionModel", "UNet2DModel")
    # Every quantized layer of the down / mid / up blocks sits in one of these: the ResNet blocks hold most convs,
    # Transformer2DModel its attention blocks and proj_in / proj_out; a layer left outside runs eagerly, at the
    # eager step's host cost per layer (H200: W4A4 step 309 ms with BasicTransformerBlock regions, docs/performance.md)
    repeated_blocks = ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D")
    text = TextConvention()  # Stable Diffusion: CLIP last hidden state, 77 tokens, no attention mask


class _DiT(Family):
    name = "dit"
    classes = ("DiTTransformer2DModel",)
    class_labels = True

    def num_classes(self, model: nn.Module) -> int:
        # The null class (CFG) is row ``num_embeds_ada_norm`` of the label table, which exists when the model was
        # built with label dropout (diffusers' LabelEmbedding adds the row for dropout_prob > 0; DiT: 1000 + 1).
        return int(model.config.num_embeds_ada_norm)

    def call_kwargs(self, model: nn.Module, x: Tensor, t: Tensor, context: Tensor | None) -> dict[str, Any]:
        labels = _need(context, self.name, "class labels (teacher.conditioning=class)")
        # Contexts may arrive as floats (the system casts them to the input dtype); labels are small integers.
        return {"hidden_states": x, "timestep": t, "class_labels": labels.round().long()}


class _PixArt(Family):
    name = "pixart"
    classes = ("PixArtTransformer2DModel",)
    # PixArt-alpha: T5 states of 120 tokens (PixArt-Sigma: 300), mask to the encoder and to the transformer.
    text = TextConvention(max_length=120, encoder_mask=True, model_mask=True)
    #: pixels per latent pixel of the SD VAE that PixArt uses (resolution conditioning is in pixels)
    vae_scale_factor = 8

    def call_kwargs(self, model: nn.Module, x: Tensor, t: Tensor, context: Tensor | None) -> dict[str, Any]:
        context = _need(context, self.name, "text states (teacher.conditioning=prompts or prompt_embeds)")
        cfg = model.config
        width = cfg.caption_channels if cfg.caption_channels is not None else cfg.cross_attention_dim
        mask = None
        if context.shape[-1] == width + 1:  # the mask rides along as the last feature (see the module docstring)
            context, mask = context[..., :-1], context[..., -1]
        elif context.shape[-1] != width:
            raise ValueError(f"pixart: text states have {context.shape[-1]} features, the model takes {width} "
                             f"(caption_channels), or {width + 1} with the attention mask as last feature")
        b, _, h, w = x.shape
        if getattr(model, "use_additional_conditions", False):  # PixArt-alpha 1024: resolution + aspect ratio
            s = self.vae_scale_factor
            added = {"resolution": torch.tensor([[h * s, w * s]], dtype=x.dtype, device=x.device).expand(b, 2),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype, device=x.device).expand(b, 1)}
        else:
            added = {"resolution": None, "aspect_ratio": None}
        return {"hidden_states": x, "encoder_hidden_states": context, "timestep": t, "added_cond_kwargs": added,
                "encoder_attention_mask": mask}


class _CogVideoX(Family):
    name = "cogvideox"
    classes = ("CogVideoXTransformer3DModel",)
    repeated_blocks = ("CogVideoXBlock",)
    channel_axis = 2
    layout = "(F, C, H, W)"
    text = TextConvention(length_key="max_text_seq_length")  # T5 states padded to 226, no mask anywhere

    def sample_shape(self, config: Any) -> tuple[int, ...]:
        frames = (int(config.sample_frames) - 1) // int(config.temporal_compression_ratio) + 1
        return frames, int(config.in_channels), int(config.sample_height), int(config.sample_width)

    def call_kwargs(self, model: nn.Module, x: Tensor, t: Tensor, context: Tensor | None) -> dict[str, Any]:
        context = _need(context, self.name, "text states (teacher.conditioning=prompts or prompt_embeds)")
        cfg = model.config
        if cfg.use_rotary_positional_embeddings:
            raise NotImplementedError("cogvideox: models with rotary position embeddings (CogVideoX-5B, 1.5) are not "
                                      "supported yet (the rotary tables are not computed); CogVideoX-2B uses "
                                      "sin-cos position embeddings and is")
        if context.shape[1] != cfg.max_text_seq_length:
            # the joint sin-cos table places the video tokens after max_text_seq_length text tokens
            raise ValueError(f"cogvideox: text states have {context.shape[1]} tokens, the model's position table "
                             f"expects max_text_seq_length={cfg.max_text_seq_length}; encode prompts padded to that "
                             "length (teacher.max_sequence_length)")
        return {"hidden_states": x, "encoder_hidden_states": context, "timestep": t}

    def as_images(self, x: Tensor) -> Tensor:
        b, f, c, h, w = x.shape  # frames side by side: (B, C, H, F * W)
        return x.permute(0, 2, 3, 1, 4).reshape(b, c, h, f * w)


class _Wan(Family):
    name = "wan"
    classes = ("WanTransformer3DModel",)
    repeated_blocks = ("WanTransformerBlock",)
    layout = "(C, F, H, W)"
    # umT5 states: 512 tokens, mask to the encoder, padding states zeroed; the transformer takes no mask.
    text = TextConvention(max_length=512, encoder_mask=True, zero_pad=True)

    def sample_shape(self, config: Any) -> tuple[int, ...]:
        raise ValueError("teacher.sample_shape: WanTransformer3DModel's config has no sample size; set "
                         "teacher.sample_shape=[C, F, H, W] in latent units, e.g. [16, 13, 60, 104] for 49 frames "
                         "at 480x832 (VAE: 4x in time, 8x in space)")

    def call_kwargs(self, model: nn.Module, x: Tensor, t: Tensor, context: Tensor | None) -> dict[str, Any]:
        context = _need(context, self.name, "text states (teacher.conditioning=prompts or prompt_embeds)")
        return {"hidden_states": x, "timestep": t, "encoder_hidden_states": context}

    def as_images(self, x: Tensor) -> Tensor:
        b, c, f, h, w = x.shape  # frames side by side: (B, C, H, F * W)
        return x.permute(0, 1, 3, 2, 4).reshape(b, c, h, f * w)


#: family name -> adapter. Names match the quantization rules of :data:`qat.methods.efficientdm.FAMILY_RULES`.
FAMILIES: dict[str, Family] = {f.name: f for f in (_UNet(), _DiT(), _PixArt(), _CogVideoX(), _Wan())}


def model_dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype of a model: diffusers' ``ModelMixin.dtype`` (which skips modules kept in fp32, e.g. Wan's
    norms and timestep MLP in a bf16 model), else the first floating-point parameter's.

    Cached per model: diffusers walks every module for casting hooks on each call (milliseconds for a large UNet,
    and it is asked on every sampler step). The cache is checked against the first parameter's dtype, so a model
    cast with ``.to(dtype)`` is looked up again.
    """
    first = next(model.parameters(), None)
    probe = None if first is None else first.dtype
    hit = _DTYPES.get(model)
    if hit is not None and hit[0] == probe:
        return hit[1]
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    _DTYPES[model] = (probe, dtype)
    return dtype


_DTYPES: weakref.WeakKeyDictionary[nn.Module, tuple[torch.dtype | None, torch.dtype]] = weakref.WeakKeyDictionary()


def _known() -> str:
    return ", ".join(f"{n} ({'/'.join(f.classes)})" for n, f in FAMILIES.items())


def get_family(name: str) -> Family:
    """The adapter registered as ``name``; raises ``ValueError`` listing the known families."""
    if name not in FAMILIES:
        raise ValueError(f"teacher.family: unknown family {name!r}; known: {_known()}")
    return FAMILIES[name]


def family_for_class(cls: type) -> Family | None:
    """The family of a model class (first match along its MRO), or None."""
    for klass in cls.__mro__:
        for fam in FAMILIES.values():
            if klass.__name__ in fam.classes:
                return fam
    return None


def set_family(model: nn.Module, name: str) -> None:
    """Records family ``name`` on ``model`` (kept by ``copy.deepcopy``, so a student inherits its teacher's)."""
    get_family(name)
    object.__setattr__(model, FAMILY_ATTR, name)


def family_of(model: nn.Module) -> Family:
    """The family recorded on ``model`` by :func:`set_family`, else the one of its class.

    Raises:
        ValueError: the class is no known family; the message lists the known ones and the fix.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: the family of the compiled model
    name = getattr(model, FAMILY_ATTR, None)
    if name is not None:
        return get_family(name)
    fam = family_for_class(type(model))
    if fam is None:
        raise ValueError(f"{type(model).__name__} is not a known denoiser family; known: {_known()}. For a "
                         "compatible custom class set teacher.family to the family whose call it shares")
    return fam


def denoise(model: nn.Module, x: Tensor, t: Tensor, context: Tensor | None, family: str | None = None) -> Tensor:
    """Prediction ``eps(x_t, t, c)`` of any supported denoiser, the same shape as ``x``.

    Args:
        model: a diffusers denoiser (teacher, fake-quantized student, or reloaded export).
        x: a batch in the family's layout, e.g. ``(B, C, H, W)``, ``(B, F, C, H, W)`` (CogVideoX).
        t: ``(B,)`` timesteps (integer DDPM steps, or float flow-matching times ``1000 * sigma``).
        context: the family's condition (see the module docstring), or None.
        family: the family name; None uses :func:`family_of`.

    Returns:
        the model output cut to ``x``'s channels (noise, ``v`` or flow velocity, whatever the model predicts).
    """
    fam = family_of(model) if family is None else get_family(family)
    if getattr(model, CUDA_GRAPHS_ATTR, False) and not torch.is_grad_enabled():
        # Without a pending backward, torch's CUDA-graph trees start a new generation at every compiled region, so
        # a later block's replay overwrites the earlier blocks' outputs that a UNet keeps as skip connections (on
        # the H200: "accessing tensor output of CUDAGraphs that has been overwritten"). Sampling and evaluation of
        # such a student run its eager code; training steps keep the graphs.
        with torch.compiler.set_stance("force_eager"):
            return fam.denoise(model, x, t, context)
    return fam.denoise(model, x, t, context)


def compile_repeated_blocks(model: nn.Module, *, layout_by_convolutions: bool = True, **compile_kwargs: Any) -> int:
    """Regional compilation: ``torch.compile`` of every repeated block of ``model`` in place (its family's
    ``repeated_blocks``), the rest eager; returns the number of blocks compiled.

    As diffusers' ``compile_repeated_blocks`` (which for UNets lists only the transformer blocks), with the ResNet
    blocks and resamplers added and whole ``Transformer2DModel`` regions, so that only the stem and head layers
    (``conv_in``, the time embedding, ``conv_out``) stay eager. Blocks of one class share compiled code, recompiled
    per shape and structure variant with static shapes (``dynamic=False`` unless ``compile_kwargs`` says otherwise:
    dynamo's automatic dynamic shapes would compile the second variant of a class for symbolic sizes, slower
    kernels, and inductor failed on such a block on the CPU); dynamo's recompile limit is raised so that no variant
    falls back to eager (an LDM-4 UNet has 19 ResNet-block variants per batch size and grad mode). Each block's
    inductor options come from :func:`region_compile_kwargs` (its memory layout decided by its convolutions);
    ``layout_by_convolutions=False`` leaves that decision to inductor alone (the comparison in ``bench/``).
    """
    import torch._dynamo

    names = family_of(model).repeated_blocks
    compile_kwargs.setdefault("dynamic", False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"performance.compile_blocks: no block of the classes {list(names)} in "
                         f"{type(model).__name__}; set performance.compile_blocks=false to compile the whole model")
    for block in blocks:
        block.compile(**(region_compile_kwargs(block, **compile_kwargs) if layout_by_convolutions else compile_kwargs))
    return len(blocks)


#: inductor's "small channel" bound of its layout heuristic (``GraphLowering.decide_layout_opt``)
_SMALL_CHANNELS = 64


def prefers_channels_last(block: nn.Module) -> bool:
    """Whether inductor's layout optimisation picks channels-last for ``block`` by its convolutions alone.

    Inductor (``torch._inductor.graph.GraphLowering.decide_layout_opt``) lays a graph out channels-last when it has
    convolutions, none grouped with more than one input channel per group, none ``k x k`` (``k > 1``) with at most
    half as many output as input channels, and not all of them with at most 64 channels; but it skips graphs with
    300 or more nodes per convolution ("only a few convs"). That last rule counts operations, not work: a
    fake-quantized ``Transformer2DModel`` region (two 1x1 convolutions, ``proj_in`` / ``proj_out``) traces to about
    790 forward nodes where its float version has about 310 (CPU trace of the LDM-4 layout), so the quantized
    student lost the channels-last layout the float one gets. Its residual stream then stays ``(B, C, H, W)``
    behind the ``(B, HW, C)`` view, and every LayerNorm backward reads it transposed (looped instead of persistent
    reductions on the H200, ``docs/performance.md``). This applies the first three rules (the structure) and leaves
    out the count; peft's adapter convolutions (``lora_A`` / ``lora_B``) are not counted, they are merged into a
    weight in the float graph.
    """
    convs = [m for name, m in block.named_modules() if isinstance(m, nn.Conv2d)
             and not any(part in ("lora_A", "lora_B") for part in name.split("."))]
    if not convs:
        return False
    for m in convs:
        in_per_group = m.in_channels // m.groups
        if m.groups > 1 and in_per_group > 1:
            return False  # grouped convolutions: channels-last measured much slower by inductor's authors
        if m.out_channels * 2 <= m.in_channels and m.kernel_size[0] > 1:
            return False
    return not all(m.out_channels <= _SMALL_CHANNELS and m.in_channels // m.groups <= _SMALL_CHANNELS
                   for m in convs)


def region_compile_kwargs(block: nn.Module, **compile_kwargs: Any) -> dict[str, Any]:
    """``compile_kwargs`` for one compiled region: inductor's layout optimisation forced on where
    :func:`prefers_channels_last` says so (static shapes and the inductor backend only), else unchanged.

    ``torch.compile`` takes a ``mode`` or ``options``, not both: a mode becomes its options
    (``torch._inductor.list_mode_options``, what inductor does with a mode) merged with the layout option.
    """
    if (compile_kwargs.get("backend", "inductor") != "inductor" or compile_kwargs.get("dynamic")
            or not prefers_channels_last(block)):
        return dict(compile_kwargs)
    from torch._inductor import list_mode_options

    kwargs = dict(compile_kwargs)
    mode = kwargs.pop("mode", None)
    options = dict(list_mode_options(mode, kwargs.get("dynamic")) if mode not in (None, "default") else {})
    kwargs["options"] = options | dict(kwargs.get("options") or {}) | {"force_layout_optimization": True}
    return kwargs
