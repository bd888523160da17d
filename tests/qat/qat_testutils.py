"""Plain helpers of the ``qat`` tests (no pytest): an independent naive fake quantizer and tiny diffusers denoisers.

The naive reference (:func:`naive_fake_quant`) is a plain element-by-element loop over ``numpy.float32`` scalars of

    Q(x) = s * (clip(round(x / s) + z, q_min, q_max) - z)          (round: half to even, as ``torch.round``)

with its own parameter layout (tensor / channel / group), so it shares no code with ``qat``. With float32 scalar
arithmetic it reproduces IEEE float32 results exactly, so tests can compare with ``torch.equal``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel


def qrange_ref(n_bits: int, signed: bool) -> tuple[int, int]:
    """Integer range written out by hand (independent of ``qat.packing.qrange``)."""
    return (-(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1) if signed else (0, 2**n_bits - 1)


def param_key(idx: tuple[int, ...], shape: tuple[int, ...], granularity: str, channel_axis: int = 0,
              group_size: int | None = None) -> tuple[int, ...]:
    """Index into the ``(s, z)`` tensors for the element at ``idx`` of a tensor of ``shape`` (naive layout)."""
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return (idx[channel_axis % len(shape)],)
    # group: channel axis 0, the rest of each channel flattened and cut into consecutive groups of group_size
    flat = int(np.ravel_multi_index(idx[1:], shape[1:])) if len(shape) > 1 else 0
    return (idx[0], flat // group_size)


def element_params(shape: tuple[int, ...], step: torch.Tensor, zero: torch.Tensor, granularity: str,
                   channel_axis: int = 0, group_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-element ``(s, z)`` arrays of ``shape``, looked up element by element."""
    step_np = step.detach().float().numpy()
    zero_np = zero.detach().float().numpy()
    s = np.empty(shape, dtype=np.float32)
    z = np.empty(shape, dtype=np.float32)
    for idx in np.ndindex(*shape):
        key = param_key(idx, shape, granularity, channel_axis, group_size)
        s[idx] = step_np[key]
        z[idx] = zero_np[key]
    return s, z


def naive_fake_quant(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, q_min: int, q_max: int,
                     granularity: str = "tensor", channel_axis: int = 0,
                     group_size: int | None = None) -> torch.Tensor:
    """Element-by-element Eq. (1); the zero-point is rounded (half to even) first."""
    xs = x.detach().float().numpy()
    s, z = element_params(tuple(xs.shape), step, zero, granularity, channel_axis, group_size)
    out = np.empty_like(xs)
    for idx in np.ndindex(*xs.shape):
        si = np.float32(s[idx])
        zi = np.float32(np.round(z[idx]))
        q = np.float32(np.round(np.float32(xs[idx]) / si)) + zi
        q = np.float32(min(max(float(q), q_min), q_max))
        out[idx] = np.float32(q - zi) * si
    return torch.from_numpy(out)


def ddim_timesteps(n: int) -> torch.Tensor:
    """diffusers' DDIM grid with ``steps_offset=1`` and "leading" spacing (descending, e.g. 991, 981, ..., 1)."""
    sched = DDIMScheduler(num_train_timesteps=1000, steps_offset=1)
    sched.set_timesteps(n)
    return sched.timesteps.clone()


# -- tiny diffusers denoisers -----------------------------------------------------------------------------------------
# Each builder returns (model, forward(model, batch) -> output tensor, make_batch(timesteps) -> batch).


def tiny_unet_cond() -> tuple[torch.nn.Module, Callable, Callable]:
    model = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=8,
    )

    def forward(m, batch):
        return m(batch[0], batch[1], encoder_hidden_states=batch[2]).sample

    def make_batch(t: torch.Tensor):
        return torch.randn(len(t), 4, 8, 8), t, torch.randn(len(t), 3, 16)

    return model, forward, make_batch


def tiny_unet() -> tuple[torch.nn.Module, Callable, Callable]:
    model = UNet2DModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8, in_channels=3,
        out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
    )

    def forward(m, batch):
        return m(batch[0], batch[1]).sample

    def make_batch(t: torch.Tensor):
        return torch.randn(len(t), 3, 8, 8), t

    return model, forward, make_batch


def tiny_dit() -> tuple[torch.nn.Module, Callable, Callable]:
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8,
    )

    def forward(m, batch):
        return m(batch[0], timestep=batch[1], class_labels=batch[2]).sample

    def make_batch(t: torch.Tensor):
        return torch.randn(len(t), 4, 8, 8), t, torch.randint(0, 10, (len(t),))

    return model, forward, make_batch


TINY_MODELS: dict[str, Callable[[], tuple[torch.nn.Module, Callable, Callable]]] = {
    "unet_cond": tiny_unet_cond,
    "unet": tiny_unet,
    "dit": tiny_dit,
}


def small_unet() -> UNet2DModel:
    """Two levels, attention at the lower one: 9 block outputs (the digits teacher's shape)."""
    torch.manual_seed(0)
    return UNet2DModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8, in_channels=3,
        out_channels=3, attention_head_dim=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
