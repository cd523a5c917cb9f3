"""CXR-CLIP losses against naive per-row loops (values and gradients)."""

from __future__ import annotations

import math
from typing import List, Sequence

import pytest
import torch
import torch.nn.functional as F

from train.losses import clip_term, contrastive_ce, cxr_clip_loss, label_targets, symmetric_ce


def unit(*shape: int, seed: int, dtype: torch.dtype = torch.float64, grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)
    return t.requires_grad_(grad)


def views_after_other_ranks(b: int, before: int, seed: int):
    """This rank's four [b, 4] views (seeds ``seed + i``) and a fake with-grad all-gather that puts
    ``before`` rows of the earlier ranks (seeds ``seed + 10 + i``) in front of each view."""
    views = [unit(b, 4, seed=seed + i, grad=True) for i in range(4)]
    others = {id(v): unit(before, 4, seed=seed + 10 + i) for i, v in enumerate(views)}

    def gather(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([others[id(t)], t])  # [before + b, 4]

    return views, gather


# ---------------------------------------------------------------- naive references (explicit loops)


def naive_ce(q: torch.Tensor, k: torch.Tensor, s: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Mean over rows of -log softmax(s * <q_i, k_j>)_{offset+i}, one scalar at a time."""
    total = 0
    for i in range(q.shape[0]):
        row = [s * sum(q[i, d] * k[j, d] for d in range(q.shape[1])) for j in range(k.shape[0])]
        denom = sum(torch.exp(x) for x in row)
        total = total + (torch.log(denom) - row[offset + i])
    return total / q.shape[0]


def naive_ce_math(q: torch.Tensor, k: torch.Tensor, s: float, offset: int = 0) -> float:
    """Same with Python floats and math (independent of torch ops)."""
    ql, kl = q.tolist(), k.tolist()
    losses = []
    for i, qi in enumerate(ql):
        row = [s * sum(a * b for a, b in zip(qi, kj, strict=False)) for kj in kl]
        losses.append(math.log(sum(math.exp(x) for x in row)) - row[offset + i])
    return sum(losses) / len(losses)


def naive_sym(a, b, s, a_all=None, b_all=None, offset=0):
    a_all = a if a_all is None else a_all
    b_all = b if b_all is None else b_all
    return (naive_ce(a, b_all, s, offset) + naive_ce(b, a_all, s, offset)) / 2


def naive_clip(images: Sequence, texts: Sequence, s, images_all=None, texts_all=None, offset=0):
    images_all = images if images_all is None else images_all
    texts_all = texts if texts_all is None else texts_all
    i2t: List = []
    t2i: List = []
    for img, img_all in zip(images, images_all, strict=False):
        for txt, txt_all in zip(texts, texts_all, strict=False):
            i2t.append(naive_ce(img, txt_all, s, offset))
            t2i.append(naive_ce(txt, img_all, s, offset))
    return (sum(i2t) / len(i2t) + sum(t2i) / len(t2i)) / 2


def grads(value: torch.Tensor, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return list(torch.autograd.grad(value, inputs))


# ---------------------------------------------------------------- contrastive_ce


def test_contrastive_ce_equals_naive_loop_with_offset_and_larger_keys() -> None:
    q = unit(3, 5, seed=0, grad=True)
    k = unit(7, 5, seed=1, grad=True)
    s = torch.tensor(3.7, dtype=torch.float64, requires_grad=True)
    for offset in (0, 2, 4):
        fast = contrastive_ce(q, k, s, offset)
        slow = naive_ce(q, k, s, offset)
        assert fast.dtype == torch.float64
        assert fast.item() == pytest.approx(slow.item(), abs=1e-12)
        assert fast.item() == pytest.approx(naive_ce_math(q.detach(), k.detach(), 3.7, offset), abs=1e-12)
        for gf, gs in zip(grads(fast, [q, k, s]), grads(slow, [q, k, s]), strict=False):
            torch.testing.assert_close(gf, gs, atol=1e-12, rtol=0)


def test_contrastive_ce_gradcheck() -> None:
    q = unit(3, 4, seed=2, grad=True)
    k = unit(6, 4, seed=3, grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, s: contrastive_ce(q, k, s, 3), (q, k, s))


def test_half_inputs_and_autocast_compute_in_float32() -> None:
    q32, k32 = unit(4, 8, seed=4, dtype=torch.float32), unit(4, 8, seed=5, dtype=torch.float32)
    s = torch.tensor(50.0)
    q16, k16 = q32.half(), k32.half()
    out = contrastive_ce(q16, k16, s)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(contrastive_ce(q16.float(), k16.float(), s).item(), abs=1e-6)
    # Under autocast the matmul would run in bf16; the loss disables it and matches exactly.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = contrastive_ce(q32, k32, s)
    assert under_amp.dtype == torch.float32
    assert under_amp.item() == pytest.approx(contrastive_ce(q32, k32, s).item(), abs=1e-6)


def test_python_float_scale_accepted() -> None:
    q, k = unit(3, 4, seed=6), unit(3, 4, seed=7)
    assert contrastive_ce(q, k, 2.5).item() == pytest.approx(naive_ce_math(q, k, 2.5), abs=1e-12)


@pytest.mark.parametrize(
    "q_shape,k_shape,offset,match",
    [
        ((3, 4), (3, 5), 0, "dim 4 but keys have dim 5"),
        ((3,), (3, 4), 0, "2-d"),
        ((3, 4), (4, 4), 2, "outside the 4 keys"),
        ((3, 4), (4, 4), -1, "outside"),
        ((0, 4), (4, 4), 0, "empty"),
    ],
)
def test_contrastive_ce_validates_shapes(q_shape, k_shape, offset, match) -> None:
    with pytest.raises(ValueError, match=match):
        contrastive_ce(torch.zeros(q_shape), torch.zeros(k_shape), torch.tensor(1.0), offset)


def test_scale_must_be_scalar() -> None:
    with pytest.raises(ValueError, match="scalar"):
        contrastive_ce(unit(2, 3, seed=0), unit(2, 3, seed=1), torch.ones(2))


# ---------------------------------------------------------------- symmetric_ce / clip_term


def test_symmetric_ce_equals_naive_single_and_gathered() -> None:
    a, b = unit(3, 4, seed=8, grad=True), unit(3, 4, seed=9, grad=True)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    fast, slow = symmetric_ce(a, b, s), naive_sym(a, b, s)
    assert fast.item() == pytest.approx(slow.item(), abs=1e-12)
    for gf, gs in zip(grads(fast, [a, b, s]), grads(slow, [a, b, s]), strict=False):
        torch.testing.assert_close(gf, gs, atol=1e-12, rtol=0)

    # "Rank 1 of 3": other processes' rows surround ours in the gathered tensor.
    others = {id(a): unit(6, 4, seed=10), id(b): unit(6, 4, seed=11)}

    def gather(t: torch.Tensor) -> torch.Tensor:
        o = others[id(t)]
        return torch.cat([o[:3], t, o[3:]])  # [9, 4]

    fast = symmetric_ce(a, b, s, gather=gather, offset=3)
    slow = naive_sym(a, b, s, gather(a), gather(b), offset=3)
    assert fast.item() == pytest.approx(slow.item(), abs=1e-12)
    for gf, gs in zip(grads(fast, [a, b, s]), grads(slow, [a, b, s]), strict=False):
        torch.testing.assert_close(gf, gs, atol=1e-12, rtol=0)


def test_symmetric_ce_rejects_mismatched_pairs() -> None:
    with pytest.raises(ValueError, match="same"):
        symmetric_ce(unit(3, 4, seed=0), unit(2, 4, seed=1), 1.0)


def test_clip_term_equals_naive_loop() -> None:
    views = [unit(3, 4, seed=20 + i, grad=True) for i in range(4)]
    images, texts = views[:2], views[2:]
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    fast, slow = clip_term(images, texts, s), naive_clip(images, texts, s)
    assert fast.item() == pytest.approx(slow.item(), abs=1e-12)
    for gf, gs in zip(grads(fast, [*views, s]), grads(slow, [*views, s]), strict=False):
        torch.testing.assert_close(gf, gs, atol=1e-12, rtol=0)
    # Unequal numbers of views are averaged over all pairs too.
    one = clip_term(images[:1], texts, s)
    assert one.item() == pytest.approx(naive_clip(images[:1], texts, s).item(), abs=1e-12)


def test_clip_term_validates() -> None:
    with pytest.raises(ValueError, match="at least one"):
        clip_term([], [unit(2, 3, seed=0)], 1.0)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        clip_term([unit(2, 3, seed=0)], [unit(2, 3, seed=1), unit(2, 4, seed=2)], 1.0)


# ---------------------------------------------------------------- cxr_clip_loss


def naive_cxr(i1, i2, t1, t2, s, icl_w=1.0, tcl_w=0.5, gathered=None, offset=0):
    g = gathered or {}
    ga = lambda x: g.get(id(x), x)  # noqa: E731
    clip = naive_clip([i1, i2], [t1, t2], s, [ga(i1), ga(i2)], [ga(t1), ga(t2)], offset)
    icl = naive_sym(i1, i2, s, ga(i1), ga(i2), offset)
    tcl = naive_sym(t1, t2, s, ga(t1), ga(t2), offset)
    return clip + icl_w * icl + tcl_w * tcl, clip, icl, tcl


def test_cxr_clip_loss_equals_naive_with_gradients() -> None:
    views = [unit(3, 4, seed=30 + i, grad=True) for i in range(4)]
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    out = cxr_clip_loss(*views, logit_scale.exp())
    loss, clip, icl, tcl = naive_cxr(*views, logit_scale.exp())
    for key, ref in (("loss", loss), ("clip", clip), ("icl", icl), ("tcl", tcl)):
        assert out[key].item() == pytest.approx(ref.item(), abs=1e-12), key
    assert out["loss"].item() == pytest.approx((clip + icl + 0.5 * tcl).item(), abs=1e-12)
    inputs = [*views, logit_scale]
    for gf, gs in zip(grads(out["loss"], inputs), grads(loss, inputs), strict=False):
        torch.testing.assert_close(gf, gs, atol=1e-12, rtol=0)


def test_cxr_clip_loss_with_gather_and_offset() -> None:
    views, gather = views_after_other_ranks(2, 4, seed=40)  # we are rank 2 of 3: [6, 4] gathered

    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    out = cxr_clip_loss(*views, s, icl_weight=0.3, tcl_weight=2.0, gather=gather, offset=4)
    gathered = {id(v): gather(v) for v in views}
    loss, clip, icl, tcl = naive_cxr(*views, s, 0.3, 2.0, gathered, offset=4)
    for key, ref in (("loss", loss), ("clip", clip), ("icl", icl), ("tcl", tcl)):
        assert out[key].item() == pytest.approx(ref.item(), abs=1e-12), key
    inputs = [*views, s]
    for gf, gs in zip(grads(out["loss"], inputs), grads(loss, inputs), strict=False):
        torch.testing.assert_close(gf, gs, atol=1e-12, rtol=0)


def test_zero_weight_terms_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    views = [unit(3, 4, seed=60 + i) for i in range(4)]
    calls = []

    def counting_gather(t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return t

    import train.losses as losses_mod

    real = losses_mod._symmetric
    sym_calls = []

    def spy(*args, **kwargs):
        sym_calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses_mod, "_symmetric", spy)
    out = cxr_clip_loss(*views, 3.0, icl_weight=0.0, tcl_weight=0.0, gather=counting_gather)
    assert sym_calls == []  # neither ICL nor TCL computed
    assert len(calls) == 4  # each embedding gathered once
    assert out["icl"].item() == 0.0 and out["tcl"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["clip"].item(), abs=1e-15)
    assert out["loss"].item() == pytest.approx(clip_term(views[:2], views[2:], 3.0).item(), abs=1e-12)
    only_icl = cxr_clip_loss(*views, 3.0, tcl_weight=0.0)
    assert only_icl["tcl"].item() == 0.0 and only_icl["icl"].item() > 0
    with pytest.raises(ValueError, match="icl_weight"):
        cxr_clip_loss(*views, 3.0, icl_weight=-1.0)


def test_cxr_clip_loss_rejects_mismatched_views() -> None:
    views = [unit(3, 4, seed=70 + i) for i in range(3)] + [unit(3, 5, seed=74)]
    with pytest.raises(ValueError, match="image1 and text2"):
        cxr_clip_loss(*views, 1.0)


def test_perfect_alignment_with_large_scale_is_near_zero() -> None:
    b = 6
    eye = torch.eye(b, 16)[:b]  # orthonormal rows
    out = cxr_clip_loss(eye, eye, eye, eye, torch.tensor(100.0))
    assert out["loss"].item() < 1e-6
    # Gathered keys from other "ranks" orthogonal to ours: still ~0 at the right offset.
    others = torch.eye(16)[b : 2 * b]
    gather = lambda t: torch.cat([others, t])  # noqa: E731
    assert cxr_clip_loss(eye, eye, eye, eye, 100.0, gather=gather, offset=b)["loss"].item() < 1e-6


def test_random_embeddings_give_log_batch() -> None:
    b = 64
    views = [unit(b, 512, seed=80 + i, dtype=torch.float32) for i in range(4)]
    out = cxr_clip_loss(*views, torch.tensor(1.0))
    for key in ("clip", "icl", "tcl"):
        assert out[key].item() == pytest.approx(math.log(b), abs=0.05), key
    assert out["loss"].item() == pytest.approx(2.5 * math.log(b), abs=0.1)


# ---------------------------------------------------------------- label term (cxr-search extension)


def naive_soft_ce(q: torch.Tensor, k: torch.Tensor, s, keys: Sequence[int], offset: int = 0) -> torch.Tensor:
    """Sum over labelled rows of -sum_j t_ij log softmax(s * <q_i, k_j>)_j / rows, t uniform over same-label keys."""
    total = 0
    for i in range(q.shape[0]):
        mine = keys[offset + i]
        if mine < 0:  # no labels: no target, no loss
            continue
        pos = [j for j in range(k.shape[0]) if keys[j] == mine]
        row = [s * sum(q[i, d] * k[j, d] for d in range(q.shape[1])) for j in range(k.shape[0])]
        log_denom = torch.log(sum(torch.exp(x) for x in row))
        total = total + sum(log_denom - row[j] for j in pos) / len(pos)
    return total / q.shape[0]


def naive_label_term(images, texts, s, keys, images_all=None, texts_all=None, offset=0):
    images_all = images if images_all is None else images_all
    texts_all = texts if texts_all is None else texts_all
    i2t, t2i = [], []
    for img, img_all in zip(images, images_all, strict=False):
        for txt, txt_all in zip(texts, texts_all, strict=False):
            i2t.append(naive_soft_ce(img, txt_all, s, keys, offset))
            t2i.append(naive_soft_ce(txt, img_all, s, keys, offset))
    return (sum(i2t) / len(i2t) + sum(t2i) / len(t2i)) / 2


def test_label_targets_are_uniform_over_same_label_studies() -> None:
    keys = torch.tensor([3, -1, 3, 8, -1, 3])
    t = label_targets(keys, offset=0, b=6)
    assert t.shape == (6, 6)
    torch.testing.assert_close(t.sum(1), torch.tensor([1.0, 0, 1, 1, 0, 1]))
    torch.testing.assert_close(t[0], torch.tensor([1 / 3, 0, 1 / 3, 0, 0, 1 / 3]))
    torch.testing.assert_close(t[1], torch.zeros(6))  # no labels: no target
    torch.testing.assert_close(t[3], torch.tensor([0.0, 0, 0, 1, 0, 0]))  # a label set nobody else has
    # Rank 1 of 2 (queries 3..5): the same rows as the single-process targets.
    torch.testing.assert_close(label_targets(keys, offset=3, b=3), t[3:])
    with pytest.raises(ValueError, match="outside"):
        label_targets(keys, offset=4, b=3)
    with pytest.raises(ValueError, match="1-d"):
        label_targets(keys[None], offset=0, b=1)


def test_label_term_equals_naive_loop_with_gradients() -> None:
    views = [unit(5, 4, seed=90 + i, grad=True) for i in range(4)]
    keys = [2, 7, 2, -1, 2]
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    out = cxr_clip_loss(*views, s, label_weight=0.6, label_keys=torch.tensor(keys))
    label = naive_label_term(views[:2], views[2:], s, keys)
    ref, _, _, _ = naive_cxr(*views, s)
    assert out["label"].item() == pytest.approx(label.item(), abs=1e-12)
    assert out["loss"].item() == pytest.approx((ref + 0.6 * label).item(), abs=1e-12)
    inputs = [*views, s]
    for gf, gs in zip(grads(out["loss"], inputs), grads(ref + 0.6 * label, inputs), strict=False):
        torch.testing.assert_close(gf, gs, atol=1e-12, rtol=0)


def test_label_term_with_gather_and_offset() -> None:
    views, gather = views_after_other_ranks(2, 3, seed=100)  # rank 1 of 2, three rows before ours

    keys = [4, -1, 9, 4, -1]  # query 3 shares its labels with gathered row 0
    s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    out = cxr_clip_loss(*views, s, label_weight=1.0, label_keys=torch.tensor(keys), gather=gather, offset=3)
    gathered = [gather(v) for v in views]
    label = naive_label_term(views[:2], views[2:], s, keys, gathered[:2], gathered[2:], offset=3)
    assert out["label"].item() == pytest.approx(label.item(), abs=1e-12)
    inputs = [*views, s]
    for gf, gs in zip(grads(out["label"], inputs), grads(label, inputs), strict=False):
        torch.testing.assert_close(gf, gs, atol=1e-12, rtol=0)


def test_label_term_within_modalities_equals_naive_loop_with_gather() -> None:
    """label_within: + icl_weight x image-image and tcl_weight x text-text soft-target CE, both directions."""
    views, gather = views_after_other_ranks(2, 3, seed=130)  # rank 1 of 2, three rows before ours

    keys = [4, -1, 9, 4, 9]
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    out = cxr_clip_loss(*views, s, icl_weight=0.7, tcl_weight=0.4, label_weight=2.0, label_keys=torch.tensor(keys),
                        label_within=True, gather=gather, offset=3)
    g = [gather(v) for v in views]
    i1, i2, t1, t2 = views
    icl = (naive_soft_ce(i1, g[1], s, keys, 3) + naive_soft_ce(i2, g[0], s, keys, 3)) / 2
    tcl = (naive_soft_ce(t1, g[3], s, keys, 3) + naive_soft_ce(t2, g[2], s, keys, 3)) / 2
    label = naive_label_term(views[:2], views[2:], s, keys, g[:2], g[2:], offset=3) + 0.7 * icl + 0.4 * tcl
    assert out["label"].item() == pytest.approx(label.item(), abs=1e-12)
    inputs = [*views, s]
    for gf, gs in zip(grads(out["label"], inputs), grads(label, inputs), strict=False):
        torch.testing.assert_close(gf, gs, atol=1e-12, rtol=0)
    # A zero ICL or TCL weight drops that part of the term too.
    no_icl = cxr_clip_loss(*views, s, icl_weight=0.0, tcl_weight=0.4, label_weight=2.0, label_keys=torch.tensor(keys),
                           label_within=True, gather=gather, offset=3)
    assert no_icl["label"].item() == pytest.approx((label - 0.7 * icl).item(), abs=1e-12)


def test_label_term_without_shared_labels_is_the_clip_term_and_without_labels_zero() -> None:
    views = [unit(4, 6, seed=120 + i) for i in range(4)]
    out = cxr_clip_loss(*views, 5.0, label_weight=2.0, label_keys=torch.tensor([1, 3, 4, 0]))
    assert out["label"].item() == pytest.approx(out["clip"].item(), abs=1e-12)
    # A batch without labels (e.g. a PACS export): the label term adds nothing, the loss is the reference.
    none = cxr_clip_loss(*views, 5.0, label_weight=2.0, label_keys=torch.tensor([-1, -1, -1, -1]))
    off = cxr_clip_loss(*views, 5.0)
    assert none["label"].item() == 0.0 and none["loss"].item() == pytest.approx(off["loss"].item(), abs=1e-12)
    assert off["label"].item() == 0.0
    assert out["loss"].item() == pytest.approx(off["loss"].item() + 2.0 * off["clip"].item(), abs=1e-12)
    with pytest.raises(ValueError, match="label_keys"):
        cxr_clip_loss(*views, 5.0, label_weight=1.0)
    with pytest.raises(ValueError, match="label_weight"):
        cxr_clip_loss(*views, 5.0, label_weight=-0.5, label_keys=torch.tensor([1, 2, 3, 4]))


def test_contrastive_ce_rejects_targets_of_the_wrong_shape() -> None:
    q, k = unit(3, 4, seed=130), unit(5, 4, seed=131)
    with pytest.raises(ValueError, match="targets must have shape"):
        contrastive_ce(q, k, 1.0, targets=torch.ones(3, 4) / 4)
