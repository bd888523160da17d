"""Relation distillation and TopKLD against naive per-element loops written from the formulas (qat/losses/relation.py
Eq. 1 and 2), their gradients, chunking and pooling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qat.losses import LossInputs, Relation, RelationConfig, TopKLDSpec, relation_divergence, topk_kl
from qat.losses.relation import relation_logits


def _kl_loop(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def _topk_loop(t: list[float], s: list[float], spec: TopKLDSpec) -> float:
    """Eq. (2) for one row, element by element."""
    order = sorted(range(len(t)), key=lambda j: -t[j])
    head = set(order[:spec.k])

    def part(idx: list[int], direction: str) -> float:
        if not idx:
            return 0.0
        pt, ps = _softmax([t[j] for j in idx]), _softmax([s[j] for j in idx])
        return _kl_loop(pt, ps) if direction == "forward" else _kl_loop(ps, pt)

    explicit = part(sorted(head), spec.explicit)
    rest = list(range(len(t))) if spec.implicit_scope == "full" else [j for j in range(len(t)) if j not in head]
    return spec.alpha * explicit + (1 - spec.alpha) * part(rest, spec.implicit)


def _relation_loop(student: torch.Tensor, teacher: torch.Tensor, tau: float, spec: TopKLDSpec | None) -> list[float]:
    """Eq. (1) per sample with explicit loops over positions (features ``(N, C, H, W)`` or ``(N, L, C)``)."""
    def vectors(f: torch.Tensor, n: int) -> list[list[float]]:  # unit vector per position (pixel or token)
        v = f[n].reshape(f.shape[1], -1).T if f.dim() == 4 else f[n]
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in v.tolist()]

    out = []
    for n in range(student.shape[0]):
        vs, vt = vectors(student, n), vectors(teacher, n)
        p = len(vs)
        total = 0.0
        for i in range(p):
            rs = [sum(a * b for a, b in zip(vs[i], vs[j])) / tau for j in range(p)]
            rt = [sum(a * b for a, b in zip(vt[i], vt[j])) / tau for j in range(p)]
            total += _kl_loop(_softmax(rt), _softmax(rs)) if spec is None else _topk_loop(rt, rs, spec)
        out.append(total / p)
    return out


@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (2, 5, 4)])
@pytest.mark.parametrize("spec", [None, TopKLDSpec(k=2, alpha=0.3), TopKLDSpec(k=3, implicit_scope="tail",
                                                                                  explicit="forward")])
def test_relation_divergence_against_the_loop(shape: tuple[int, ...], spec: TopKLDSpec | None) -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randn(*shape, generator=gen,
                                                                                 dtype=torch.float64)
    got = relation_divergence(s, t, tau=0.7, spec=spec or TopKLDSpec(), chunk=4)
    ref = _relation_loop(s, t, 0.7, spec)
    assert got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", [TopKLDSpec(k=1), TopKLDSpec(k=3, alpha=0.8, explicit="forward", implicit="reverse"),
                                  TopKLDSpec(k=2, implicit_scope="tail"), TopKLDSpec(k=5, implicit_scope="tail")])
def test_topk_kl_against_the_loop(spec: TopKLDSpec) -> None:
    gen = torch.Generator().manual_seed(1)
    t, s = torch.randn(4, 5, generator=gen) * 2, torch.randn(4, 5, generator=gen) * 2
    ref = torch.tensor([_topk_loop(t[i].tolist(), s[i].tolist(), spec) for i in range(4)])
    torch.testing.assert_close(topk_kl(t, s, spec), ref, rtol=1e-4, atol=1e-6)


def test_topk_kl_with_every_entry_and_forward_directions_is_the_plain_kl() -> None:
    gen = torch.Generator().manual_seed(2)
    t, s = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    plain = torch.tensor([_kl_loop(_softmax(t[i].tolist()), _softmax(s[i].tolist())) for i in range(3)])
    for spec in (TopKLDSpec(k=0), TopKLDSpec(k=6, alpha=0.3, explicit="forward"),
                 TopKLDSpec(k=60, alpha=0.9, explicit="forward")):
        torch.testing.assert_close(topk_kl(t, s, spec), plain, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(topk_kl(t, s, TopKLDSpec(k=6, explicit="reverse")), plain)  # reverse KL differs


@pytest.mark.parametrize("spec", [TopKLDSpec(), TopKLDSpec(k=3), TopKLDSpec(k=3, implicit_scope="tail")])
def test_student_features_receive_finite_nonzero_gradients_and_the_teacher_none(spec: TopKLDSpec) -> None:
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True)
    relation_divergence(s, t, spec=spec, chunk=2).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and float(s.grad.abs().sum()) > 0
    assert t.grad is None
    equal = s.detach().clone().requires_grad_(True)
    value = relation_divergence(equal, equal.detach(), spec=spec)
    assert float(value.abs().max()) < 1e-6  # identical relations: no divergence


def test_chunks_give_the_same_value_and_gradient() -> None:
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(2, 3, 4, 5, generator=gen)
    grads, values = [], []
    for chunk in (1, 7, 1000):
        s = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(5), requires_grad=True)
        v = relation_divergence(s, t, chunk=chunk)
        v.sum().backward()
        values.append(v.detach())
        grads.append(s.grad)
    for v, g in zip(values[1:], grads[1:]):
        torch.testing.assert_close(v, values[0])
        torch.testing.assert_close(g, grads[0])


def test_large_maps_are_pooled_to_max_positions() -> None:
    gen = torch.Generator().manual_seed(6)
    f = torch.randn(1, 3, 8, 8, generator=gen)
    assert relation_logits(f, max_positions=16).shape == (1, 16, 16)
    pooled = F.adaptive_avg_pool2d(f, (4, 4))
    torch.testing.assert_close(relation_logits(f, max_positions=16), relation_logits(pooled))
    tokens = torch.randn(1, 10, 3, generator=gen)
    assert relation_logits(tokens, max_positions=5).shape == (1, 5, 5)


def test_the_term_averages_its_taps_and_validates_its_config() -> None:
    gen = torch.Generator().manual_seed(7)
    feats_s = {"a": torch.randn(2, 3, 2, 2, generator=gen), "b": torch.randn(2, 4, 3, generator=gen)}
    feats_t = {"a": torch.randn(2, 3, 2, 2, generator=gen), "b": torch.randn(2, 4, 3, generator=gen)}
    term = Relation(RelationConfig(taps=["a", "b"], tau=0.5))
    out = torch.zeros(2, 1)
    value = term(LossInputs(out, out, torch.tensor([1, 2]), False, 1.0, feats_s, feats_t))
    expected = (relation_divergence(feats_s["a"], feats_t["a"], 0.5) + relation_divergence(feats_s["b"],
                                                                                            feats_t["b"], 0.5)) / 2
    torch.testing.assert_close(value, expected)
    for bad, key in (({"tau": 0.0}, "tau"), ({"topk": -1}, "topk"), ({"explicit": "both"}, "explicit"),
                     ({"alpha": 1.5}, "alpha"), ({"implicit_scope": "head"}, "implicit_scope")):
        with pytest.raises(ValueError, match=rf"{key}"):
            RelationConfig(**bad)


def test_time_smoothing_averages_only_with_the_previous_step_of_the_same_trajectory() -> None:
    gen = torch.Generator().manual_seed(8)
    cur_t, prev_t, cur_s = (torch.randn(4, 3, 2, 2, generator=gen) for _ in range(3))  # guided: [uncond; cond]
    valid = torch.tensor([True, False])  # sample 1 is at its trajectory's first step
    term = Relation(RelationConfig(taps=["f"], smoothing_steps=2))
    assert term.previous_taps() == ["f"] and Relation(RelationConfig(taps=["f"])).previous_taps() == []
    out = torch.zeros(4, 1)
    value = term(LossInputs(out, out, torch.tensor([500, 999]), True, 1.5, {"f": cur_s}, {"f": cur_t},
                            previous_teacher_features={"f": prev_t}, previous_valid=valid))
    target = cur_t.clone()
    for row in (0, 2):  # sample 0's uncond and cond rows
        target[row] = (cur_t[row] + prev_t[row]) / 2
    torch.testing.assert_close(value, relation_divergence(cur_s, target))
    assert not torch.allclose(value[0], relation_divergence(cur_s, cur_t)[0])  # the smoothing changed sample 0
    with pytest.raises(ValueError, match="previous trajectory step"):
        term(LossInputs(out, out, torch.tensor([500, 999]), True, 1.5, {"f": cur_s}, {"f": cur_t}))
