"""Attention-map distillation (qat/losses/attention.py Eq. 1) against a naive loop over samples, heads and query
rows written from the formula, its gradients, query subsampling, and the term on a diffusers UNet's attention."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from qat.losses import AttentionKL, AttentionKLConfig, LossInputs, TopKLDSpec, attention_divergence, build_loss
from qat.taps import FeatureTaps
from tests.qat.qat_testutils import small_unet
from tests.qat.test_relation import _kl_loop, _softmax, _topk_loop


def _attention_loop(qs: torch.Tensor, ks: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor, heads: int, tau: float,
                    spec: TopKLDSpec | None, rows: list[int] | None = None) -> list[float]:
    """Eq. (1) per sample: head h uses channels [h d, (h + 1) d) of the projections; one softmax per query row."""
    d = qs.shape[-1] // heads
    out = []
    for n in range(qs.shape[0]):
        total, count = 0.0, 0
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for i in rows if rows is not None else range(qs.shape[1]):
                ls = [float(qs[n, i, cols] @ ks[n, j, cols]) / (math.sqrt(d) * tau) for j in range(ks.shape[1])]
                lt = [float(qt[n, i, cols] @ kt[n, j, cols]) / (math.sqrt(d) * tau) for j in range(kt.shape[1])]
                total += _kl_loop(_softmax(lt), _softmax(ls)) if spec is None else _topk_loop(lt, ls, spec)
                count += 1
        out.append(total / count)
    return out


def _projections(seed: int, n: int = 2, lq: int = 5, lk: int = 4, width: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, length, width, generator=gen, dtype=torch.float64) for length in (lq, lk, lq, lk)]


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("spec", [None, TopKLDSpec(k=2, alpha=0.3), TopKLDSpec(k=3, implicit_scope="tail",
                                                                                  explicit="forward")])
def test_attention_divergence_against_the_loop(heads: int, spec: TopKLDSpec | None) -> None:
    qs, ks, qt, kt = _projections(0)
    got = attention_divergence(qs, ks, qt, kt, heads, tau=0.8, spec=spec, chunk=2)
    assert got.shape == (2,)
    ref = torch.tensor(_attention_loop(qs, ks, qt, kt, heads, 0.8, spec), dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_long_sequences_compare_evenly_spaced_query_rows_over_every_key() -> None:
    qs, ks, qt, kt = _projections(1, lq=9, lk=7)
    got = attention_divergence(qs, ks, qt, kt, 2, max_queries=3)
    ref = torch.tensor(_attention_loop(qs, ks, qt, kt, 2, 1.0, None, rows=[0, 4, 8]), dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    every = attention_divergence(qs, ks, qt, kt, 2, max_queries=9)
    torch.testing.assert_close(every, attention_divergence(qs, ks, qt, kt, 2))


def test_every_key_in_the_top_k_with_forward_directions_is_the_plain_kl() -> None:
    qs, ks, qt, kt = _projections(2)
    plain = attention_divergence(qs, ks, qt, kt, 2)
    torch.testing.assert_close(attention_divergence(qs, ks, qt, kt, 2, spec=TopKLDSpec(k=4, explicit="forward")),
                               plain)
    assert not torch.allclose(attention_divergence(qs, ks, qt, kt, 2, spec=TopKLDSpec(k=2)), plain)


@pytest.mark.parametrize("spec", [None, TopKLDSpec(k=2), TopKLDSpec(k=2, implicit_scope="tail")])
def test_student_queries_and_keys_receive_gradients_and_the_teacher_none(spec: TopKLDSpec | None) -> None:
    qs, ks, qt, kt = (x.float().requires_grad_(True) for x in _projections(3))
    attention_divergence(qs, ks, qt, kt, 3, spec=spec, chunk=2).sum().backward()
    for x in (qs, ks):
        assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    assert qt.grad is None and kt.grad is None
    same = attention_divergence(qs.detach(), ks.detach(), qs.detach(), ks.detach(), 3, spec=spec)
    assert float(same.abs().max()) < 1e-6


def test_the_term_taps_the_projections_of_a_unet_attention_and_reads_its_heads() -> None:
    teacher = small_unet().eval()
    student = copy.deepcopy(teacher)
    attn = student.get_submodule("down_blocks.1.attentions.0")
    assert attn.heads == 4  # 16 channels, head dim 4
    term = build_loss(AttentionKLConfig(taps=["*.attentions.*"], topk=3))
    assert isinstance(term, AttentionKL)
    assert term.taps() == ["*.attentions.*.to_q", "*.attentions.*.to_k"]
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([10, 500])
    names = FeatureTaps(teacher, term.taps()).names
    assert len(names) == 2 * 4  # the lower down level, the mid block, the two resnets of the upper up level

    def inputs() -> LossInputs:
        with torch.no_grad(), FeatureTaps(teacher, names=names) as tt:
            teacher(x, t)
        with FeatureTaps(student, names=names) as ts:
            out = student(x, t).sample
        return LossInputs(out, out.detach(), t, False, 1.0, ts.features, tt.features, student=student)

    assert float(term(inputs()).abs().max()) < 1e-6  # identical models: identical maps
    with torch.no_grad():
        attn.to_k.weight.mul_(3.0)
    value = term(inputs())
    assert value.shape == (2,) and float(value.min()) > 0
    value.sum().backward()
    assert float(attn.to_k.weight.grad.abs().sum()) > 0


def test_config_and_lookup_errors_name_the_key() -> None:
    for bad, key in (({"heads": 0}, "heads"), ({"max_queries": 0}, "max_queries"), ({"query": ""}, "query"),
                     ({"topk": -1}, "topk"), ({"tau": 0.0}, "tau")):
        with pytest.raises(ValueError, match=key):
            AttentionKLConfig(taps=["a"], **bad)
    with pytest.raises(ValueError, match="taps"):
        AttentionKL(AttentionKLConfig())
    term = AttentionKL(AttentionKLConfig(taps=["a"]))
    f = {"a.to_q": torch.randn(1, 2, 4), "a.to_k": torch.randn(1, 2, 4)}
    out = torch.zeros(1)
    with pytest.raises(ValueError, match="heads"):  # no model to read the heads from
        term(LossInputs(out, out, torch.tensor([1]), False, 1.0, f, f))
    with pytest.raises(ValueError, match="to_k"):
        term(LossInputs(out, out, torch.tensor([1]), False, 1.0, {"a.to_q": f["a.to_q"]}, {"a.to_q": f["a.to_q"]}))
    fixed = AttentionKL(AttentionKLConfig(taps=["a"], heads=2))
    assert fixed(LossInputs(out, out, torch.tensor([1]), False, 1.0, f, f)).shape == (1,)
