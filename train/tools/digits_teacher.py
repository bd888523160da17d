"""Train the embedded default teacher: a tiny class-conditional pixel-space diffusion model on sklearn digits.

The teacher is a diffusers ``UNet2DConditionModel`` conditioned through cross-attention on a one-token
``ClassEmbedder`` context, i.e. the same block family and conditioning path as CompVis LDM-4 (ImageNet), scaled
down so that it trains in minutes on a laptop CPU and samples 64 digits in seconds. It exists so that every
quantization method in DiffQAT can be run end to end (and tested) without downloading any weights.

Regenerate the shipped artifacts with::

    python -m train.tools.digits_teacher --output assets/digits_teacher --seed 0

Data: the 1797 8x8 images of ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download), scaled
from ``[0, 16]`` to ``[-1, 1]`` and bilinearly upscaled to 16x16 so that the UNet has two resolutions to work with.

Objective: epsilon prediction with the MSE loss of DDPM (Ho et al., 2020) on a linear-beta ``DDPMScheduler`` with
1000 training steps; the label is replaced by the null class with probability ``--label-dropout`` so the same
network learns the unconditional model used by classifier-free guidance (Ho & Salimans, 2022). The saved weights
are an exponential moving average of the trained ones, which gives visibly cleaner samples after a short run.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from qat.sampling import cfg_combine
from train.eval.digits import load_digits_tensor
from train.models.class_embedder import ClassEmbedder

__all__ = [
    "EMBED_DIM",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "build_scheduler",
    "build_unet",
    "main",
    "sample_digits",
    "save_grid",
    "train",
]

NUM_CLASSES = 10
IMAGE_SIZE = 16
EMBED_DIM = 64


def build_unet(embed_dim: int = EMBED_DIM, sample_size: int = IMAGE_SIZE) -> UNet2DConditionModel:
    """Build the (untrained) teacher UNet: LDM-4's block family at toy width.

    Args:
        embed_dim: Cross-attention context width; must equal ``ClassEmbedder.embed_dim``.
        sample_size: Side length of the square 1-channel input.

    Returns:
        A ``UNet2DConditionModel`` mapping ``(B, 1, S, S)`` noisy images, ``(B,)`` timesteps and a
        ``(B, 1, embed_dim)`` context to ``(B, 1, S, S)`` predicted noise.
    """
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=embed_dim,
        attention_head_dim=8,  # 64 channels -> 8 heads of width 8 at the 8x8 resolution
    )


def build_scheduler() -> DDPMScheduler:
    """The training noise schedule: DDPM, 1000 steps, linear betas 1e-4 .. 2e-2, epsilon prediction.

    ``clip_sample`` stays on (range 1) because the data lives in ``[-1, 1]``.
    """
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=2e-2,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
    )


@torch.no_grad()
def sample_digits(
    unet: UNet2DConditionModel,
    embedder: ClassEmbedder,
    scheduler: DDPMScheduler | DDIMScheduler,
    labels: Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 2.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample digits with DDIM (eta = 0) and classifier-free guidance.

    Guidance follows LDM: ``eps = eps_null + s * (eps_cond - eps_null)``, so ``s = 1`` is plain conditional
    sampling. Both branches run in one batch of size ``2B``.

    Args:
        unet: Teacher UNet.
        embedder: Class embedder whose ``null_label`` gives the unconditional branch.
        scheduler: Any scheduler with the training config; a ``DDIMScheduler`` is built from its config.
        labels: Requested classes, shape ``(B,)``.
        num_inference_steps: Number of DDIM steps.
        guidance_scale: CFG scale ``s``.
        generator: Source of the initial noise (CPU generator).

    Returns:
        Images of shape ``(B, 1, S, S)`` in ``[-1, 1]``.
    """
    device = unet.device
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_inference_steps)
    batch = labels.shape[0]
    size = unet.config.sample_size
    x = torch.randn((batch, unet.config.in_channels, size, size), generator=generator).to(device)
    context = embedder(torch.cat([embedder.null_labels(batch, device), labels.to(device)]))
    for t in ddim.timesteps:
        eps_null, eps_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        eps = cfg_combine(eps_null, eps_cond, guidance_scale)
        x = ddim.step(eps, t, x).prev_sample
    return x.clamp(-1.0, 1.0)


def save_grid(images: Tensor, path: str | Path, nrow: int, scale: int = 4) -> None:
    """Write images as a PNG grid (row-major), white digits on black, nearest-neighbour upscaled.

    Args:
        images: Shape ``(B, 1, S, S)`` in ``[-1, 1]``; ``B`` must be a multiple of ``nrow``'s row length.
        path: Output PNG path.
        nrow: Number of images per row.
        scale: Integer upscaling factor per pixel, so 16x16 digits are large enough to read.
    """
    from PIL import Image

    b, _, s, _ = images.shape
    rows = math.ceil(b / nrow)
    pad = 1
    canvas = torch.full((rows * (s + pad) + pad, nrow * (s + pad) + pad), 0.5)
    pixels = (images[:, 0].detach().cpu().float() + 1.0) / 2.0
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[pad + r * (s + pad) : pad + r * (s + pad) + s, pad + c * (s + pad) : pad + c * (s + pad) + s] = pixels[
            i
        ]
    array = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array, mode="L")
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - decay)


@torch.no_grad()
def _eval_loss(
    unet: UNet2DConditionModel,
    embedder: ClassEmbedder,
    scheduler: DDPMScheduler,
    images: Tensor,
    labels: Tensor,
    seed: int,
) -> float:
    """Conditional eps-MSE over the whole dataset with fixed timesteps and noise, so runs are comparable."""
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(images.shape, generator=gen)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), generator=gen)
    device = unet.device
    total = 0.0
    for start in range(0, images.shape[0], 256):
        sl = slice(start, start + 256)
        noisy = scheduler.add_noise(images[sl], noise[sl], timesteps[sl]).to(device)
        pred = unet(noisy, timesteps[sl].to(device), encoder_hidden_states=embedder(labels[sl].to(device))).sample
        total += F.mse_loss(pred, noise[sl].to(device), reduction="sum").item()
    return total / noise.numel()


def _lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the base rate (the last steps polish, they do not stall)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def usable_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS / Windows
        return os.cpu_count() or 1


def machine_description() -> str:
    """CPU model, usable cores, GPU (if any) and torch version, for the READMEs of trained artifacts."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {usable_cpus()} usable logical CPU(s), {threads} torch thread(s){gpu}, "
            f"torch {torch.__version__}")


def train(args: argparse.Namespace) -> dict[str, float]:
    """Train the teacher and save it in diffusers format under ``args.output``.

    Args:
        args: Parsed command-line arguments (see ``_parse_args``).

    Returns:
        Summary metrics: ``params``, ``final_loss`` (mean training loss of the last 100 steps), ``eval_loss``
        (EMA weights, whole dataset, fixed noise) and ``wall_s``.
    """
    device = torch.device(args.device)
    if device.type == "cuda":
        # Required by cuBLAS for deterministic matmuls; must be set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(args.seed)
    # Bit-reproducible on a given machine and thread count; the kernels used here all have deterministic versions.
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits_tensor(IMAGE_SIZE)
    n = images.shape[0]

    unet = build_unet(EMBED_DIM).to(device)
    embedder = ClassEmbedder(num_classes=NUM_CLASSES, embed_dim=EMBED_DIM).to(device)
    scheduler = build_scheduler()
    params = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in embedder.parameters())

    # EMA copies are what gets saved; they trail the raw weights by roughly 1 / (1 - decay) steps.
    ema_unet, ema_embedder = copy.deepcopy(unet).eval(), copy.deepcopy(embedder).eval()
    trainable = list(unet.parameters()) + list(embedder.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    print(f"digits teacher: {n} images, {params:,} parameters, {args.steps} steps x batch {args.batch_size}")
    start_time = time.perf_counter()
    order = torch.randperm(n, generator=gen)
    cursor = 0
    recent: list[float] = []
    unet.train()
    embedder.train()
    for step in range(args.steps):
        # Epoch-wise shuffling without replacement: every image is seen once per pass.
        if cursor + args.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(y.shape, generator=gen) < args.label_dropout] = embedder.null_label
        # All randomness comes from one CPU generator, so the data stream does not depend on the device.
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        x0, y, noise, t = x0.to(device), y.to(device), noise.to(device), t.to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1.0 - a).sqrt() * noise

        pred = unet(noisy, t, encoder_hidden_states=embedder(y)).sample
        loss = F.mse_loss(pred, noise)

        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, args.steps, args.lr, args.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

        # Decay warm-up: early on the EMA follows the weights closely, so the random init is forgotten quickly.
        decay = min(args.ema_decay, (1.0 + step) / (10.0 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_embedder, embedder, decay)

        recent = (recent + [loss.item()])[-100:]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start_time
            print(
                f"step {step + 1:5d}/{args.steps}  loss {sum(recent) / len(recent):.4f} (mean of last {len(recent)})"
                f"  lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed:6.1f}s",
                flush=True,
            )
    wall_s = time.perf_counter() - start_time
    final_loss = sum(recent) / len(recent)
    eval_loss = _eval_loss(ema_unet, ema_embedder, scheduler, images, labels, args.seed)
    print(f"done in {wall_s:.1f}s: final training loss {final_loss:.4f}, EMA eval loss {eval_loss:.4f}")

    out = Path(args.output)
    ema_unet.save_pretrained(out / "unet")
    ema_embedder.save_pretrained(out / "class_embedder")
    scheduler.save_pretrained(out / "scheduler")
    metrics = {"params": float(params), "final_loss": final_loss, "eval_loss": eval_loss, "wall_s": wall_s}
    _write_readme(out, args, metrics, ema_unet)
    print(f"saved to {out}")

    if args.grid:
        grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(args.grid_per_class)
        samples = sample_digits(
            ema_unet,
            ema_embedder,
            scheduler,
            grid_labels,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator().manual_seed(args.seed),
        )
        save_grid(samples, args.grid, nrow=args.grid_per_class)
        print(f"wrote sample grid (one row per class 0..9) to {args.grid}")
    return metrics


def _write_readme(out: Path, args: argparse.Namespace, metrics: dict[str, float], unet: UNet2DConditionModel) -> None:
    size_mb = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 1e6
    cfg = unet.config
    text = f"""# DiffQAT default teacher: class-conditional digits diffusion model

A tiny class-conditional diffusion model on scikit-learn's bundled handwritten digits
(`sklearn.datasets.load_digits`, 1797 images, 8x8 upscaled bilinearly to 16x16, 1 channel, values in [-1, 1]).
It has the architecture family of CompVis LDM-4 (ImageNet), shrunk to toy size, so that every quantization method
in DiffQAT can be run and tested end to end on a CPU without downloading any weights:

- `unet/`: diffusers `UNet2DConditionModel`, blocks `{tuple(cfg.down_block_types)}` /
  `{tuple(cfg.up_block_types)}` + `{cfg.mid_block_type}`, `block_out_channels={tuple(cfg.block_out_channels)}`,
  `layers_per_block={cfg.layers_per_block}`, `norm_num_groups={cfg.norm_num_groups}`,
  `cross_attention_dim={cfg.cross_attention_dim}`, `attention_head_dim={cfg.attention_head_dim}`;
  epsilon prediction. safetensors: {size_mb:.2f} MB (float32).
- `class_embedder/`: `train.models.class_embedder.ClassEmbedder(num_classes={NUM_CLASSES}, embed_dim={EMBED_DIM})`, key
  `embedding.weight` with {NUM_CLASSES + 1} rows; row {NUM_CLASSES} is the null class for classifier-free guidance.
  Its output `(B, 1, {EMBED_DIM})` is the UNet's `encoder_hidden_states`.
- `scheduler/`: the training `DDPMScheduler` (1000 steps, linear betas 1e-4..2e-2, `clip_sample=True`).
  Sample with `DDIMScheduler.from_config(...)`, 50 steps, guidance scale ~2
  (`train.tools.digits_teacher.sample_digits`). Scales of 1.5 to 2 give the cleanest digits; at 3 and above this small
  model is pushed off the data and many digits change shape, so do not use it as the reference setting.

Weights are the EMA of the trained weights, decay `min({args.ema_decay}, (1 + step) / (10 + step))` at each step.

## Loading

```python
from diffusers import DDPMScheduler, UNet2DConditionModel
from train.models.class_embedder import ClassEmbedder

unet = UNet2DConditionModel.from_pretrained("assets/digits_teacher", subfolder="unet")
embedder = ClassEmbedder.from_pretrained("assets/digits_teacher", subfolder="class_embedder")
scheduler = DDPMScheduler.from_pretrained("assets/digits_teacher", subfolder="scheduler")
```

## Regeneration

```bash
{_regeneration_command(args)}
```

| item | value |
| --- | --- |
| seed | {args.seed} |
| steps x batch size | {args.steps} x {args.batch_size} |
| optimizer | AdamW, lr {args.lr:g}, weight decay {args.weight_decay:g}, grad-norm clip 1.0 |
| learning-rate schedule | linear warm-up {args.warmup} steps, then cosine decay to 10 % |
| label dropout to null class | {args.label_dropout:g} |
| parameters (UNet + embedder) | {int(metrics["params"]):,} |
| final training loss (eps MSE, mean of last 100 steps) | {metrics["final_loss"]:.4f} |
| eval loss (EMA weights, whole dataset, fixed noise) | {metrics["eval_loss"]:.4f} |
| training wall time | {metrics["wall_s"]:.0f} s ({metrics["wall_s"] / args.steps:.2f} s/step) |
| machine | {machine_description()} |

Training is deterministic for a given machine and thread count; a different CPU or thread count can change the
last bits of the floating-point results and hence the weights.
"""
    (out / "README.md").write_text(text)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--output", default="assets/digits_teacher", help="directory for unet/, class_embedder/, scheduler/"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50, help="linear learning-rate warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--label-dropout", type=float, default=0.1, help="probability of training on the null class")
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=min(4, usable_cpus()), help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device; the shipped teacher was trained on cpu")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--grid", default=None, help="optional PNG path for a 10-row sample grid after training")
    parser.add_argument("--grid-per-class", type=int, default=8)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    return parser


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return _build_parser().parse_args(argv)


def _regeneration_command(args: argparse.Namespace) -> str:
    """The command line that reproduces ``args``' weights: output, seed and every non-default training option."""
    parts = ["python -m train.tools.digits_teacher", f"--output {args.output}", f"--seed {args.seed}"]
    parser = _build_parser()
    for name in ("steps", "batch_size", "lr", "warmup", "weight_decay", "label_dropout", "ema_decay", "device"):
        value = getattr(args, name)
        if value != parser.get_default(name):
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    args = _parse_args(argv)
    # Small convolutions do not scale past a few threads; more only adds contention.
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
