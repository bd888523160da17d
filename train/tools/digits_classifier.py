"""Trains the digits classifier behind the digits-domain metrics (:mod:`train.eval.digits`).

Inception-v3 weights (FID, Inception Score) are not available offline and are meaningless on 16x16 one-channel
digits anyway, so ``train.eval.metrics`` scores samples of the embedded digits teacher with this network instead:

- ``features(x)`` (the 64-d penultimate layer) feeds the Frechet distance "FD-digits" (FID with this net
  standing in for Inception);
- ``forward(x)`` logits give the class accuracy of class-conditional samples (does a "7" look like a 7?).

Regenerate the shipped artifacts with::

    python -m train.tools.digits_classifier --output assets/digits_classifier --seed 0

Data: ``train.eval.digits.load_digits_tensor(16)`` (sklearn's 1797 digits, 16x16, values in ``[-1, 1]``),
exactly the domain the teacher samples in. A seeded, stratified 20% split is held out and never trained on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.eval.digits import (
    CONFIG_NAME,
    DEFAULT_PATH,
    REGEN_COMMAND,
    WEIGHTS_NAME,
    DigitsClassifier,
    load_digits_tensor,
)
from train.tools.digits_teacher import machine_description

__all__ = ["main", "train"]



def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with background (-1).

    Teacher samples are not perfectly centred, so a little translation invariance keeps the classifier from
    penalising a well-formed but slightly offset digit.
    """
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = (model(images).argmax(1) == labels).float().mean().item()
    model.train(was_training)
    return acc


def train(args: argparse.Namespace) -> dict[str, float]:
    """Train on the stratified training split, save the artifacts, and return the metrics."""
    from safetensors.torch import save_file
    from sklearn.model_selection import train_test_split


    torch.manual_seed(args.seed)
    # One thread by default: at this size thread synchronisation costs more than it saves (measured ~8x slower
    # per step with 2 threads on a shared 2-core machine), and it makes the float reduction order reproducible.
    torch.set_num_threads(max(1, args.threads))
    images, labels = load_digits_tensor(16)
    idx = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(
        idx, test_size=args.test_fraction, stratify=labels.numpy(), random_state=args.seed
    )
    x_tr, y_tr = images[train_idx], labels[train_idx]
    x_te, y_te = images[test_idx], labels[test_idx]

    model = DigitsClassifier(channels=(args.c1, args.c2), feature_dim=args.feature_dim, dropout=args.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = (len(y_tr) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y_tr), generator=gen)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            b = perm[i : i + args.batch_size]
            x = _random_shift(x_tr[b], args.max_shift, gen)
            loss = F.cross_entropy(model(x), y_tr[b], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        if (epoch + 1) % 5 == 0 or epoch == args.epochs - 1:
            acc = _accuracy(model, x_te, y_te)
            print(f"epoch {epoch + 1:3d}  loss {total / len(y_tr):.4f}  held-out acc {acc:.4f}")
    wall = time.perf_counter() - start

    model.eval()
    metrics = {
        "heldout_accuracy": _accuracy(model, x_te, y_te),
        "train_accuracy": _accuracy(model, x_tr, y_tr),
        "all_accuracy": _accuracy(model, images, labels),
        "num_heldout": len(y_te),
        "num_train": len(y_tr),
        "train_seconds": wall,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"seed": str(args.seed)})
    (out / CONFIG_NAME).write_text(json.dumps(model.config, indent=2) + "\n")
    _write_readme(out, args, metrics)
    print(
        f"held-out accuracy {metrics['heldout_accuracy']:.4f} ({len(y_te)} images), "
        f"all 1797: {metrics['all_accuracy']:.4f}, {metrics['num_parameters']} parameters, {wall:.1f} s"
    )
    return metrics


def _write_readme(out: Path, args: argparse.Namespace, metrics: dict[str, float]) -> None:
    size_kb = (out / WEIGHTS_NAME).stat().st_size / 1024
    text = f"""# DiffQAT digits classifier (feature extractor for FD-digits)

A small CNN that classifies the 16x16, 1-channel, `[-1, 1]` digits of `train.eval.digits.load_digits_tensor`.
`train.eval.metrics` uses its 64-d penultimate layer (`features`) for the Frechet distance "FD-digits" (FID with this
network in place of Inception) and its logits for the class accuracy of class-conditional teacher/student samples.

Architecture (`train.eval.digits.DigitsClassifier`, see `config.json`):
`[conv3x3({args.c1}) ReLU] x2 -> maxpool2 -> [conv3x3({args.c2}) ReLU] x2 -> maxpool2 ->
linear({args.feature_dim}) ReLU -> dropout({args.dropout}) -> linear(10)`; {metrics['num_parameters']} parameters,
`model.safetensors` {size_kb:.0f} KB (float32). No normalisation layers: features do not depend on batch composition.

## Loading

```python
from train.eval.digits import load_digits_classifier

classifier = load_digits_classifier()  # eval mode, CPU; path defaults to assets/digits_classifier
```

## Regeneration

```bash
{REGEN_COMMAND}
```

| item | value |
| --- | --- |
| seed | {args.seed} |
| split | stratified `train_test_split(test_size={args.test_fraction}, random_state={args.seed})` (scikit-learn) |
| training images | {metrics['num_train']} |
| held-out images | {metrics['num_heldout']} |
| held-out accuracy | {metrics['heldout_accuracy']:.4f} |
| training-split accuracy | {metrics['train_accuracy']:.4f} |
| accuracy on all 1797 | {metrics['all_accuracy']:.4f} |
| epochs / batch size | {args.epochs} / {args.batch_size} |
| optimiser | AdamW, one-cycle lr (max {args.lr}), weight decay {args.weight_decay} |
| loss | cross-entropy, label smoothing {args.label_smoothing} |
| augmentation | random translation up to {args.max_shift} px (background fill) |
| wall time (training loop) | {metrics['train_seconds']:.1f} s ({args.threads} torch thread(s)) |
| machine | {machine_description()} |

Exact numbers can differ slightly across torch versions and CPU types (thread scheduling changes float reduction
order); the accuracy should not.
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=DEFAULT_PATH, help="directory for model.safetensors, config.json, README")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.05)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--max-shift", type=int, default=1, help="random translation in pixels (0 disables)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--c1", type=int, default=32)
    parser.add_argument("--c2", type=int, default=64)
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for training")
    return train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
