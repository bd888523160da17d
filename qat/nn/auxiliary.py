"""QVGen's auxiliary low-rank branch: ``Phi = L C R`` added to the dequantized weight, removed by rank decay.

    y = f(Q_a(x), Q_w(W) + Phi) + b,     Phi = L C R,     C = A diag(gamma) B                                  (1)

``L (n x r0)`` and ``R (r0 x m)`` are trained parameters (``n`` output channels, ``m`` the fan-in of one output:
``in_features`` or ``C_in k_h k_w``), initialised from the rank-``r0`` SVD of the weight's quantization error
``W - Q_w(W) ~ U S V^T``: ``L = U sqrt(S)``, ``R = sqrt(S) V^T`` (QVGen Sec. 4.1). The branch sees the quantized
activation because it is added to the weight the layer multiplies by ``Q_a(x)``.

``C`` is an ``r0 x r0`` core held in buffers: ``gamma`` masks and anneals directions (QVGen Sec. 4.2's
``gamma = [1, .., 1, u, .., u, 0, .., 0]``), and ``A``, ``B`` are the change of basis of the last re-SVD. At a phase
boundary of the rank decay the ``k`` directions that survive are re-decomposed,

    (L A)[:, :k] (B R)[:k] = Q_1 R_1 R_2^T Q_2^T = (Q_1 U') S' (V'^T Q_2^T)       (thin QRs, SVD of the k x k core)

and ``A``, ``B`` are rewritten so that ``L A`` and ``B R`` become ``Q_1 U' sqrt(S')`` and ``sqrt(S') V'^T Q_2^T``:
orthogonal factors ordered by singular value again, so the next phase decays the smallest directions. QVGen's code
writes the re-decomposed factors into ``L`` and ``R`` in place; here the parameters are never edited: their
optimizer state stays valid (no moments of an old basis applied to a new one) and nothing depends on writing
parameters behind a sharded optimizer's back (DeepSpeed ZeRO-1/2 copy their own fp32 master weights into the
module after each step). The product, and so the forward, is the same as the code's at every boundary.

:class:`AuxBranchLayer` wraps a prepared quantized layer with its branch (:func:`add_aux`); :func:`remove_aux`
gives the plain quantized layer back, without ``Phi``, for export.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qat.nn.layers import QuantConv2d, QuantLinear

__all__ = ["AuxLowRank", "AuxBranchLayer", "aux_layers", "add_aux", "remove_aux"]


class AuxLowRank(nn.Module):
    """``Phi = L A diag(gamma) B R`` of Eq. (1) for an ``(n, m)`` weight (flattened fan-in), maximum rank ``r0``.

    Parameters ``left (n, r0)``, ``right (r0, m)``; buffers ``basis_left (r0, r0)`` (``A``), ``basis_right
    (r0, r0)`` (``B``), ``gamma (r0,)``, ``phase`` (the rank-decay phase the basis belongs to) and ``initialized``,
    all in the state dict, so that a resumed run continues with the same basis.

    Args:
        out_features: ``n``.
        in_features: ``m``.
        rank: ``r0``.
        device: where the tensors live.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, device: torch.device | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"AuxLowRank needs rank >= 1, got {rank}")
        self.rank0 = rank
        self.left = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.right = nn.Parameter(torch.zeros(rank, in_features, device=device))
        self.register_buffer("basis_left", torch.eye(rank, device=device))
        self.register_buffer("basis_right", torch.eye(rank, device=device))
        self.register_buffer("gamma", torch.ones(rank, device=device))
        self.register_buffer("phase", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("initialized", torch.tensor(False, device=device))
        self._ready = False  # the buffer read once per load, not on every forward (no device sync per call)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False

    @torch.no_grad()
    def initialize_(self, error: Tensor) -> None:
        """``L = U sqrt(S)``, ``R = sqrt(S) V^T`` from the SVD of ``error`` (the ``(n, m)`` quantization error
        ``W - Q_w(W)``), truncated to ``r0``; the basis is reset to the identity and ``gamma`` to ones."""
        with torch.autocast(self.left.device.type, enabled=False):  # the SVD in float32 even under bf16 autocast
            self._initialize(error.detach().float().reshape(self.left.shape[0], -1))

    def _initialize(self, e: Tensor) -> None:
        k = min(self.rank0, *e.shape)
        if min(e.shape) > 4 * self.rank0:  # randomised SVD: the top r0 directions of a large matrix in seconds
            u, s, v = torch.svd_lowrank(e, q=min(self.rank0 + 16, min(e.shape)), niter=4)
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(e, full_matrices=False)
        root = s[:k].sqrt()
        self.left.zero_()
        self.right.zero_()
        self.left[:, :k] = (u[:, :k] * root).to(self.left.dtype)
        self.right[:k] = (root[:, None] * vh[:k]).to(self.right.dtype)
        self.basis_left.copy_(torch.eye(self.rank0))
        self.basis_right.copy_(torch.eye(self.rank0))
        self.gamma.fill_(1.0)
        self.phase.zero_()
        self.initialized.fill_(True)
        self._ready = True

    def core(self) -> Tensor:
        """``C = A diag(gamma) B`` (``(r0, r0)``, float32)."""
        return (self.basis_left * self.gamma[None, :]) @ self.basis_right

    def delta(self) -> Tensor:
        """``Phi`` as an ``(n, m)`` float32 matrix."""
        if not self._ready:
            self._ready = bool(self.initialized)
        if not self._ready:
            raise RuntimeError("AuxLowRank is not initialised: run its initialize_(W - Q(W)) (the method's "
                               "initialize) before training")
        return self.left.float() @ (self.core() @ self.right.float())

    def effective_rank(self) -> int:
        """Directions with a non-zero ``gamma`` (0 when the branch contributes nothing)."""
        return int((self.gamma != 0).sum())

    @torch.no_grad()
    def rebasis_(self, keep: int) -> None:
        """Keeps the first ``keep`` directions of the current basis, re-decomposed (module docstring), and drops the
        rest (``keep = 0`` switches the branch off). Parameters are not modified; ``phase`` is advanced by one.

        The product of the kept directions, ``(L A)[:, :k] (B R)[:k]``, is unchanged (up to float rounding).
        """
        r0 = self.rank0
        k = max(0, min(keep, r0))
        a_new = torch.zeros(r0, r0, dtype=torch.float64, device=self.left.device)
        b_new = torch.zeros_like(a_new)
        if k > 0:
            self._rebasis(k, a_new, b_new)
        self.basis_left.copy_(a_new)
        self.basis_right.copy_(b_new)
        self.gamma.zero_()
        self.gamma[:k] = 1.0
        self.phase += 1

    def _rebasis(self, k: int, a_new: Tensor, b_new: Tensor) -> None:
        """Writes the re-decomposed first ``k`` directions into ``a_new``, ``b_new`` (float64)."""
        with torch.autocast(self.left.device.type, enabled=False):
            a, b = self.basis_left.double(), self.basis_right.double()
            le = self.left.double() @ a[:, :k]  # (n, k)
            re = b[:k] @ self.right.double()  # (k, m)
            q1, r1 = torch.linalg.qr(le)
            q2, r2 = torch.linalg.qr(re.T)
            u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
            root = s.sqrt()
            # L A_new[:, :k] = Q1 U sqrt(S) = le R1^+ U sqrt(S); B_new[:k] R = sqrt(S) V^T Q2^T = sqrt(S) V^T R2^+T re
            j = root.numel()  # min(k, n, m): a thin layer has fewer directions than k
            a_new[:, :j] = a[:, :k] @ (torch.linalg.pinv(r1) @ (u * root))
            b_new[:j] = ((root[:, None] * vh) @ torch.linalg.pinv(r2).T) @ b[:k]

    def extra_repr(self) -> str:
        n, r = self.left.shape
        return f"out={n}, in={self.right.shape[1]}, rank0={r}"


class AuxBranchLayer(nn.Module):
    """A quantized layer with the auxiliary branch of Eq. (1): ``base_layer`` (a
    :class:`~qat.nn.layers.QuantLinear` or :class:`~qat.nn.layers.QuantConv2d`, unchanged) and ``aux``.

    The wrapper adds the ``base_layer.`` prefix to the layer's keys while it exists (as peft's adapter layers do);
    :func:`remove_aux` puts the quantized layer back in its place, with the float layer's keys plus its quantizers'.

    Args:
        base: the prepared quantized layer.
        rank: ``r0``.
    """

    def __init__(self, base: QuantLinear | QuantConv2d, rank: int) -> None:
        super().__init__()
        if type(base) not in (QuantLinear, QuantConv2d):
            raise TypeError(f"AuxBranchLayer wraps a QuantLinear or QuantConv2d, not {type(base).__name__}")
        self.base_layer = base
        w = base.weight
        self.aux = AuxLowRank(w.shape[0], w[0].numel(), rank, device=w.device)

    @property
    def weight(self) -> nn.Parameter:
        """The latent weight ``W`` (of ``base_layer``)."""
        return self.base_layer.weight

    def quantization_error(self) -> Tensor:
        """``W - Q_w(W)`` (float32, the weight's shape): what ``Phi`` is initialised from."""
        with torch.no_grad():
            return self.base_layer.weight.float() - self.base_layer.quantized_weight().float()

    def branch_weight(self) -> Tensor:
        """``Q_w(W) + Phi`` in the weight's layout (Eq. 1)."""
        w = self.base_layer.quantized_weight()
        return w + self.aux.delta().reshape(w.shape).to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``base_layer`` on ``x`` with the weight ``Q_w(W) + Phi``; shapes as the base layer's."""
        return self.base_layer(x, quantized_weight=self.branch_weight())


def aux_layers(model: nn.Module) -> dict[str, AuxBranchLayer]:
    """Name -> layer for every layer of ``model`` with an auxiliary branch."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AuxBranchLayer)}


def add_aux(model: nn.Module, names: list[str], rank: int) -> int:
    """Wraps the quantized layers ``names`` (exact module names) of ``model`` in :class:`AuxBranchLayer`, in place
    (branches uninitialised). Returns the number of layers wrapped."""
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, AuxBranchLayer(getattr(owner, child), rank))
    return len(names)


def remove_aux(model: nn.Module) -> int:
    """Replaces every :class:`AuxBranchLayer` by its quantized layer (``Phi`` dropped), in place.

    Returns:
        the number of layers changed.
    """
    layers = aux_layers(model)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    return len(layers)
