"""Low-rank representation mimicking: the principal directions against numpy's eigendecomposition, the loss against
its formula, a checkpoint round trip, and the same projection on two processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qat.checks import ConfigProblems
from qat.losses import LossInputs, LowRankMimicking, LowRankMimickingConfig
from qat.losses.lowrank import channel_rows


def _features(seed: int, channels: int = 8) -> torch.Tensor:
    """``(B, C, H, W)`` features with a known channel covariance: variances 8, 4, 2, 1, ... along random axes."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=torch.Generator().manual_seed(99)))
    scales = torch.tensor([2.0 ** (-(i - 3) / 2) for i in range(channels)])
    rows = (torch.randn(4 * 5 * 5, channels, generator=gen) * scales) @ q.t() + 3.0  # offset: centring matters
    return rows.reshape(4, 5, 5, channels).permute(0, 3, 1, 2).contiguous()


def _inputs(student: dict, teacher: dict) -> LossInputs:
    x = torch.zeros(1)
    return LossInputs(student_out=x, teacher_out=x, t=torch.zeros(1), guided=False, guidance=1.0,
                      student_features=student, teacher_features=teacher)


def test_bases_are_the_top_eigenvectors_of_the_centred_channel_covariance() -> None:
    f = _features(0)
    term = LowRankMimicking(LowRankMimickingConfig(taps=["blk"], rank_divisor=4))
    term.observe({"blk": f[:2], "other": f})  # a feature not matching the taps is ignored
    term.observe({"blk": f[2:]})
    term.fit_()
    e = term.basis("blk").double().numpy()
    assert e.shape == (8, 2) and set(dict(term.bases.named_buffers())) == {"blk"}
    rows = f.permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
    values, vectors = np.linalg.eigh(np.cov(rows, rowvar=False, bias=True))
    top = vectors[:, ::-1][:, :2]
    np.testing.assert_allclose(np.abs(top.T @ e), np.eye(2), atol=1e-6)  # the same directions, in order
    assert np.all(e[np.abs(e).argmax(0), [0, 1]] > 0)  # sign convention: largest entry positive
    assert values[-1] > 2 * values[-3]  # the test data really has a clear top-2 subspace


def test_loss_is_the_mean_over_taps_of_the_projected_mse() -> None:
    term = LowRankMimicking(LowRankMimickingConfig(taps=["a", "b"], rank_divisor=2))
    ta, tb = _features(1), _features(2, channels=6)[:, :, :2].flatten(2).transpose(1, 2)  # (B, C, H, W), (B, N, C)
    sa, sb = ta + 0.1 * torch.randn_like(ta), tb + 0.3 * torch.randn_like(tb)
    term.observe({"a": ta, "b": tb})
    term.fit_()
    value = float(term(_inputs({"a": sa, "b": sb}, {"a": ta, "b": tb})))
    by_hand = []
    for s, t, name in ((sa, ta, "a"), (sb, tb, "b")):
        d = (s - t).double().numpy()
        d = np.moveaxis(d, 1, -1).reshape(-1, d.shape[1]) if d.ndim == 4 else d.reshape(-1, d.shape[-1])
        by_hand.append(np.mean((d @ term.basis(name).double().numpy()) ** 2))
    assert math.isclose(value, float(np.mean(by_hand)), rel_tol=1e-5)
    assert term.basis("b").shape == (6, 3) and channel_rows(tb).shape == (4 * 10, 6)


def test_an_unfitted_term_fits_on_the_first_batch_and_a_checkpoint_restores_its_bases() -> None:
    t = _features(3)
    term = LowRankMimicking(LowRankMimickingConfig(taps=["down.*"]))
    value = term(_inputs({"down.0": t + 1.0}, {"down.0": t}))
    assert term.is_fitted and value > 0
    fresh = LowRankMimicking(LowRankMimickingConfig(taps=["down.*"]))
    fresh.load_state_dict(term.state_dict())  # strict: the fresh term creates the bases it has not fitted
    assert fresh.is_fitted and torch.equal(fresh.basis("down.0"), term.basis("down.0"))
    assert "bases.down-0" in term.state_dict()
    other = _features(4)  # a fitted term never refits on later batches
    assert torch.equal(fresh(_inputs({"down.0": other + 1.0}, {"down.0": other})),
                       term(_inputs({"down.0": other + 1.0}, {"down.0": other})))
    with pytest.raises(ConfigProblems, match="^taps: needs at least one"):
        LowRankMimicking(LowRankMimickingConfig())


def _rank_main(rank: int, init: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        t = _features(10 + rank)  # every process sees other features in its first batch
        term = LowRankMimicking(LowRankMimickingConfig(taps=["mid"]))
        term(_inputs({"mid": t + 1.0}, {"mid": t}))
        out[rank] = term.basis("mid").clone()
    finally:
        dist.destroy_process_group()


def test_two_processes_project_onto_rank_zero_bases(tmp_path) -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
        bases = dict(out)
    own = LowRankMimicking(LowRankMimickingConfig(taps=["mid"]))
    own.observe({"mid": _features(10)})
    own.fit_()
    assert torch.equal(bases[0], bases[1]) and torch.equal(bases[0], own.basis("mid"))
    other = LowRankMimicking(LowRankMimickingConfig(taps=["mid"]))
    other.observe({"mid": _features(11)})
    other.fit_()
    assert not torch.equal(other.basis("mid"), bases[1])  # rank 1 alone would have chosen another basis
