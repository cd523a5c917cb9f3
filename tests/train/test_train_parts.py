"""Training building blocks: recipes, schedule, sampler, per-sample seeding, vocabulary, label precision."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cxr_search.errors import ConfigError, DatasetError
from cxr_search.evaluation.retrieval_metrics import label_precision_at_k
from cxr_search.model import create_model
from cxr_search.tokenizer import TextTokenizer
from train.config import TrainConfig, get_recipe, list_recipes
from train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from train.sampling import SeededSamples, StepSampler, grouped_permutation
from train.trainer import _check_resume_config


# ------------------------------------------------------------------------------------ recipes
def test_recipes_cover_the_six_released_configurations_and_tiny_synth() -> None:
    names = list_recipes()
    for arch in ("r50", "swint"):
        for data, datasets in (("m", {"mimic-cxr"}), ("mc", {"mimic-cxr", "chexpert"}),
                               ("mcc", {"mimic-cxr", "chexpert", "chestxray14"})):
            cfg = get_recipe(f"{arch}-{data}")
            assert set(cfg.data.datasets) == datasets
            assert cfg.model == ("cxr-clip-r50" if arch == "r50" else "cxr-clip-swint")
            # The reference CXR-CLIP recipe (docs/compatibility.md section 4).
            o = cfg.optim
            assert (o.lr, o.weight_decay, o.epochs, o.warmup_epochs, o.min_lr_ratio, o.batch_size) == (
                5e-5, 1e-4, 15, 1.0, 0.0, 128)
            assert cfg.precision == "fp16" and cfg.seed == 1234
            assert (cfg.loss.icl_weight, cfg.loss.tcl_weight) == (1.0, 0.5)
            assert cfg.augment.scale == (0.8, 1.1) and cfg.augment.clahe_p == 0.5
            assert cfg.augment.jitter == (0.1, 0.2, 0.2, 0.1)
    assert "tiny-synth" in names and len(names) == 7


def test_recipe_overrides_and_unknown_keys() -> None:
    cfg = get_recipe("r50-m", optim={"lr": 1e-4}, init={"kind": "scratch"})
    assert cfg.optim.lr == 1e-4 and cfg.optim.epochs == 15 and cfg.init.kind == "scratch"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="optim.lrr"):
        get_recipe("r50-m", optim={"lrr": 1})
    with pytest.raises(ConfigError, match="unknown recipe"):
        get_recipe("r51-m")
    with pytest.raises(ConfigError, match="init.kind"):
        get_recipe("r50-m", init={"kind": "magic"})
    with pytest.raises(ConfigError, match="loss.label_weight"):
        get_recipe("r50-m", loss={"label_weight": -1.0})
    with pytest.raises(ConfigError, match="loss.icl_weight"):
        get_recipe("r50-m", loss={"icl_weight": float("nan")})


@pytest.mark.parametrize("section, expected", [
    ({"optim": {"lr": "abc"}}, "config key 'optim.lr': expected a number, got \"abc\""),
    ({"optim": {"epochs": 2.5}}, "'optim.epochs': expected an integer, got 2.5"),
    ({"data": {"label_groups": True}}, "'data.label_groups': expected an integer, got true"),
    ({"loss": {"label_within": 1}}, "'loss.label_within': expected true or false, got 1"),
    ({"loss": {"label_names": 3}}, "'loss.label_names': expected a list of strings, got 3"),
    ({"optim": {"betas": [0.9]}}, "'optim.betas': expected a list of 2 values, got [0.9]"),
])
def test_values_of_the_wrong_type_are_named(section, expected) -> None:
    # `--set optim.lr=abc` used to end in "'<=' not supported between instances of 'str' and 'int'".
    with pytest.raises(ConfigError) as err:
        get_recipe("tiny-synth", **section)
    assert expected in str(err.value)


def test_right_types_still_pass() -> None:
    cfg = get_recipe("tiny-synth", optim={"lr": 1, "betas": [0.8, 0.99]}, loss={"label_names": ["Edema"]},
                     data={"label_groups": 0})
    assert cfg.optim.lr == 1 and cfg.optim.betas == (0.8, 0.99) and cfg.loss.label_names == ("Edema",)


def test_released_recipes_use_the_reference_loss() -> None:
    """The six released configurations train CXR-CLIP's loss exactly: no label term."""
    for name in ("r50-m", "r50-mc", "r50-mcc", "swint-m", "swint-mc", "swint-mcc"):
        cfg = get_recipe(name)
        loss = cfg.loss
        assert (loss.icl_weight, loss.tcl_weight, loss.label_weight) == (1.0, 0.5, 0.0), name
        assert cfg.data.label_groups == 0, name  # the reference's plain shuffle


def test_model_overrides_merge_deeply() -> None:
    """An override of one nested model key keeps the recipe's other nested keys (it used to drop them)."""
    base = get_recipe("tiny-synth")
    assert base.model_overrides["text"]["pooling"] == "mean"
    cfg = get_recipe("tiny-synth", model_overrides={"text": {"bert_config": {"vocab_size": 40}},
                                                    "preprocess": {"resize": 96}})
    assert cfg.model_overrides["text"] == {"bert_config": {"vocab_size": 40}, "pooling": "mean"}
    assert cfg.model_overrides["tokenizer"] == base.model_overrides["tokenizer"]
    assert cfg.model_overrides["preprocess"] == {"resize": 96, "crop_size": base.model_overrides["preprocess"]["crop_size"]}
    assert base.model_overrides["text"]["bert_config"] == {"vocab_size": 1000}  # the recipe is not mutated


def test_resume_refuses_changed_settings_but_allows_harmless_ones() -> None:
    a = get_recipe("tiny-synth").to_dict()
    _check_resume_config(a, get_recipe("tiny-synth", max_minutes=5, data={"num_workers": 0}).to_dict(), "out")
    _check_resume_config(a, get_recipe("tiny-synth", channels_last=not a["channels_last"]).to_dict(), "out")
    with pytest.raises(ConfigError, match="optim.batch_size"):
        _check_resume_config(a, get_recipe("tiny-synth", optim={"batch_size": 16}).to_dict(), "out")


# ------------------------------------------------------------------------------------ schedule
def test_lr_schedule_warmup_then_cosine_to_floor() -> None:
    warm, total = 10, 110
    f = [lr_factor(s, warm, total) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(f[:9], f[1:10], strict=False))  # linear warm-up
    assert all(b <= a for a, b in zip(f[10:], f[11:], strict=False))  # monotone decay
    assert f[60] == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(total, warm, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(total, warm, total, min_ratio=0.1) == pytest.approx(0.1)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=2.0)
    sched = build_scheduler(opt, warm, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, [2.0 * x for x in f], rtol=1e-12)


def test_no_decay_group_holds_biases_norms_and_logit_scale() -> None:
    model = create_model("tiny")
    groups = param_groups(model, 0.1, True)
    decay, no_decay = groups
    assert "logit_scale" in no_decay["names"] and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(("bias", "weight", "logit_scale")) for n in no_decay["names"])
    assert any("LayerNorm.weight" in n for n in no_decay["names"])
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(param_groups(model, 0.1, False)) == 1
    opt = build_optimizer(model, get_recipe("tiny-synth").optim)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable


# ------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_rank_and_micro_batches_tile_the_single_process_batches(world: int, accum: int) -> None:
    n, batch = 37, 8
    single = list(StepSampler(n, batch, seed=5, epoch=3))
    assert len(single) == n // batch and all(len(b) == batch for b in single)
    flat = [k for b in single for k in b]
    assert len(set(flat)) == len(flat) and all(e == 3 for e, _ in flat)
    per_rank = [list(StepSampler(n, batch, seed=5, epoch=3, rank=r, world_size=world, accum_steps=accum))
                for r in range(world)]
    for step, full in enumerate(single):
        rebuilt = []
        for a in range(accum):  # micro-batch a of step: rank slices in rank order
            for r in range(world):
                rebuilt.extend(per_rank[r][step * accum + a])
        assert rebuilt == full


def test_sampler_resumes_mid_epoch_and_epochs_differ() -> None:
    full = list(StepSampler(40, 8, seed=1, epoch=0))
    assert list(StepSampler(40, 8, seed=1, epoch=0, start_step=3)) == full[3:]
    assert len(StepSampler(40, 8, seed=1, epoch=0, start_step=3)) == 2
    other = [i for b in StepSampler(40, 8, seed=1, epoch=1) for _, i in b]
    assert other != [i for b in full for _, i in b]
    with pytest.raises(ConfigError, match="divisible"):
        StepSampler(40, 8, seed=1, epoch=0, world_size=3)
    with pytest.raises(DatasetError, match="batch_size"):
        StepSampler(5, 8, seed=1, epoch=0)


def _runs(order: list, keys: list) -> list:
    """(key, length) of each maximal run of equal keys along ``order``."""
    out: list = []
    for i in order:
        if out and out[-1][0] == keys[i]:
            out[-1][1] += 1
        else:
            out.append([keys[i], 1])
    return out


def test_grouped_permutation_keeps_label_mates_together() -> None:
    """Each key's studies come in runs of ``group_size`` (the last one shorter); unlabelled ones alone."""
    gen = torch.Generator().manual_seed(0)
    counts = {0: 9, 1: 5, 2: 2, 3: 1, 4: 4}  # key -> studies (key 3: a set no other study has)
    keys = [k for k, c in counts.items() for _ in range(c)] + [-1] * 6
    keys_t = torch.tensor(keys, dtype=torch.int64)[torch.randperm(len(keys), generator=gen)]
    keys = keys_t.tolist()
    for size in (2, 3):
        order = grouped_permutation(keys_t, size, torch.Generator().manual_seed(3)).tolist()
        assert sorted(order) == list(range(len(keys)))  # a permutation
        assert order == grouped_permutation(keys_t, size, torch.Generator().manual_seed(3)).tolist()
        assert order != grouped_permutation(keys_t, size, torch.Generator().manual_seed(4)).tolist()
        # Runs of one key may touch by chance (two groups of the same key side by side), so compare
        # the number of studies in runs of each key with the naive expectation: full groups + a rest.
        for key, n in counts.items():
            lengths = [length for k, length in _runs(order, keys) if k == key]
            assert sum(lengths) == n
            assert all(length % size == 0 or length % size == n % size for length in lengths), (key, lengths)
            assert len(lengths) <= -(-n // size)  # at most ceil(n / size) runs: members are never scattered
    # group_size 1 is a plain permutation; 0 is refused.
    assert sorted(grouped_permutation(keys_t, 1, gen).tolist()) == list(range(len(keys)))
    with pytest.raises(ValueError, match="group_size"):
        grouped_permutation(keys_t, 0, gen)


def test_grouped_sampler_tiles_ranks_resumes_and_puts_mates_in_one_batch() -> None:
    n, batch = 64, 16
    keys = torch.arange(n, dtype=torch.int64) // 2  # 32 label sets of two studies each
    kw = dict(seed=9, epoch=2, label_keys=keys, group_size=2)
    single = list(StepSampler(n, batch, **kw))
    for b in single:  # even batch size, pairs: every study meets its one label-mate in its batch
        ks = keys[[i for _, i in b]].tolist()
        assert all(ks.count(k) == 2 for k in ks)
    assert [i for b in single for _, i in b] != [i for b in StepSampler(n, batch, seed=9, epoch=2) for _, i in b]
    assert list(StepSampler(n, batch, start_step=2, **kw)) == single[2:]
    per_rank = [list(StepSampler(n, batch, rank=r, world_size=2, **kw)) for r in range(2)]
    assert [a + b for a, b in zip(*per_rank, strict=False)] == single
    with pytest.raises(ValueError, match="label key"):
        StepSampler(n, batch, seed=9, epoch=0, group_size=2)
    with pytest.raises(ConfigError, match="data.label_groups"):
        get_recipe("tiny-synth", data={"label_groups": -1})
    with pytest.raises(ConfigError, match="loss.label_names"):
        get_recipe("tiny-synth", loss={"label_names": ["Edema", ""]})
    with pytest.raises(ConfigError, match="loss.label_uncertain"):
        get_recipe("tiny-synth", loss={"label_uncertain": "ones"})


class _RandomDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(3)


def test_seeded_samples_depend_only_on_the_key_and_keep_the_global_rng() -> None:
    ds = SeededSamples(_RandomDataset(), seed=7)
    a = [ds[(0, i)] for i in range(5)]
    b = [ds[(0, i)] for i in reversed(range(5))][::-1]
    for x, y in zip(a, b, strict=False):
        torch.testing.assert_close(x, y)
    assert not torch.equal(ds[(0, 1)], ds[(1, 1)])  # another epoch, another augmentation
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    ds[(0, 3)]
    torch.testing.assert_close(torch.rand(2), expected)


# ------------------------------------------------------------------------------------ vocabulary
_VOCAB_SCRIPT = """
import sys
from cxr_search.tokenizer import TextTokenizer
corpus = ["Small right pleural effusion.", "No pneumothorax.", "Mild cardiomegaly, no effusion.",
          "Left lower lobe atelectasis.", "Stable cardiomegaly."] * 3 + ["pleural thickening"] * 2
print(TextTokenizer.train(corpus, vocab_size=int(sys.argv[1])).sha256())
"""


@pytest.mark.slow
def test_learnt_vocabulary_is_identical_across_processes() -> None:
    # Hash-map order differs between processes, so determinism must be checked across two of them.
    runs = {subprocess.run([sys.executable, "-c", _VOCAB_SCRIPT, "90"], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)}
    assert len(runs) == 1
    tok = TextTokenizer.train(["Small right pleural effusion."] * 2 + ["rare word"], vocab_size=200)
    assert "effusion" in tok.vocab and "rare" not in tok.vocab  # below min_frequency
    assert tok.tokenize("rare effusion")[1:-1] == ["r", "##a", "##r", "##e", "effusion"]
    with pytest.raises(Exception, match="vocab_size"):
        TextTokenizer.train(["abcdefghij"] * 2, vocab_size=10)


# ------------------------------------------------------------------------------------ label precision
def test_label_precision_matches_a_naive_loop() -> None:
    rng = np.random.default_rng(0)
    # On a 1/8 grid every product and partial sum of these dot products is exact in float32, so the matrix
    # product and the loop agree whatever the BLAS kernel's summation order or SIMD lanes: the ranking,
    # the c[10] = c[11] tie included, cannot depend on the CPU.
    q = (np.round(rng.normal(size=(30, 8)) * 8) / 8).astype(np.float32)
    c = (np.round(rng.normal(size=(50, 8)) * 8) / 8).astype(np.float32)
    c[10] = c[11]  # a tie: broken by candidate order
    ql = [frozenset(rng.choice(["a", "b", "c"], size=rng.integers(0, 3), replace=False)) for _ in range(30)]
    cl = [frozenset(rng.choice(["a", "b", "c"], size=rng.integers(0, 3), replace=False)) for _ in range(50)]
    for k in (1, 5, 10):
        naive = []
        for i in range(30):
            sims = [float(np.dot(q[i], c[j])) for j in range(50)]
            order = sorted(range(50), key=lambda j: (-sims[j], j))[:k]
            naive.append(sum(cl[j] == ql[i] for j in order) / k)
        assert label_precision_at_k(q, c, ql, cl, k, batch_size=7) == pytest.approx(float(np.mean(naive)))
    with pytest.raises(ValueError):
        label_precision_at_k(q, c, ql[:3], cl, 10)
    unit = c[12:] / np.linalg.norm(c[12:], axis=1, keepdims=True)  # no duplicated rows
    assert math.isclose(label_precision_at_k(unit, unit, cl[12:], cl[12:], 1), 1.0)  # each query finds itself first
