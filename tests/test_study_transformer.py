"""The transformer study: the chars corpus, the ``transformer`` model, the lm-train runner, the cards."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
import torch.nn.functional as TF

import normlab.nn as nl
from normlab.lab import data as labdata
from normlab.lab.data import CHARS_BLOCK, CHARS_SIZES, CHARS_VAL_EVERY, char_corpus, load_dataset
from normlab.lab.lm import lm_config, lm_train, lr_at
from normlab.lab.models import build_model, norm_layers
from normlab.lab.models.transformer import CausalSelfAttention
from normlab.lab.norms import get_norm
from normlab.lab.store import RunResult
from normlab.lab.studies import CARD_VERDICTS, Card, Figure, get_study
from normlab.lab.studies import transformer as study
from normlab.lab.studies.transformer import L0, Config, lr_sensitivity

V = 128


def _model(norm="ln", placement="pre", qk=None, **kw):
    torch.manual_seed(0)
    opts = {"d_model": 16, "n_layers": 2, "n_heads": 2, "placement": placement, "qk_norm": qk, **kw}
    return build_model("transformer", norm=norm, input_shape=(12,), num_classes=V, **opts)


# -- the corpus --------------------------------------------------------------------------------------
def test_chars_corpus_sizes_split_and_vocabulary():
    val = None
    for size, chars in CHARS_SIZES.items():
        c = char_corpus(size)
        assert c.train.shape == (chars // CHARS_BLOCK, CHARS_BLOCK) and c.train.dtype == torch.int64
        assert 0 <= int(c.train.min()) and int(c.train.max()) < V
        if val is not None:
            assert torch.equal(c.val, val)  # the same validation blocks for every size
        val = c.val
    assert CHARS_SIZES["large"] == 8 * CHARS_SIZES["small"] == 64 * CHARS_SIZES["tiny"]
    with pytest.raises(ValueError, match=r"^size: expected one of .*got 'huge'"):
        char_corpus("huge")


def test_chars_split_is_by_contiguous_blocks_without_overlap():
    text, _ = labdata._chars_text()
    codes = torch.tensor(list(text.encode("ascii", errors="replace")), dtype=torch.int64)
    n = len(codes) // CHARS_BLOCK
    blocks = codes[: n * CHARS_BLOCK].reshape(n, CHARS_BLOCK)
    every = char_corpus("all")
    val_idx = [i for i in range(n) if i % CHARS_VAL_EVERY == CHARS_VAL_EVERY - 1]
    train_idx = [i for i in range(n) if i not in set(val_idx)]
    assert torch.equal(every.val, blocks[val_idx]) and torch.equal(every.train, blocks[train_idx])
    assert not set(val_idx) & set(train_idx) and len(val_idx) + len(train_idx) == n
    # the sized corpora take whole training blocks, never a validation one
    train_rows = {tuple(r.tolist()) for r in every.train}
    val_rows = {tuple(r.tolist()) for r in every.val}
    for size in CHARS_SIZES:
        assert {tuple(r.tolist()) for r in char_corpus(size).train} <= train_rows - val_rows


def test_chars_corpus_is_deterministic_and_checksummed():
    a = char_corpus("small")
    labdata._chars_text.cache_clear()
    char_corpus.cache_clear()
    b = char_corpus("small")
    assert a is not b and torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    text, digest = labdata._chars_text()
    assert text.startswith("# ==== textwrap.py ====\n") and len(text) > 600_000
    assert labdata.data_identity("chars")["sha256"] == digest == a.sha256
    known = labdata.CHARS_SHA256.get(f"{sys.version_info[0]}.{sys.version_info[1]}")
    if known is None:
        pytest.skip(f"the chars text was checked on Python {sorted(labdata.CHARS_SHA256)} only")
    assert digest == known


def test_chars_dataset_is_next_character_windows():
    b = load_dataset("chars", size="tiny", context=16)
    c = char_corpus("tiny")
    per = CHARS_BLOCK // 17
    assert b.input_shape == (16, 1) and b.num_classes == V and b.kind == "sequence"
    assert b.n_train == per * len(c.train) and b.n_val == per * len(c.val)
    x, y = b.train.tensors
    assert torch.equal(x[0, :, 0].long(), c.train[0, :16]) and int(y[0]) == int(c.train[0, 16])
    assert torch.equal(x[1, :, 0].long(), c.train[0, 17:33])  # windows do not overlap
    again = load_dataset("chars", size="tiny", context=16)
    assert torch.equal(again.train.tensors[0], x) and torch.equal(again.val.tensors[1], b.val.tensors[1])
    with pytest.raises(ValueError, match=r"^context: expected at most 1023, got 1024"):
        load_dataset("chars", context=1024)


# -- the model --------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["pre", "post", "peri"])
@pytest.mark.parametrize("qk", [None, "ln"])
def test_transformer_is_causal(placement, qk):
    model = _model("ln", placement, qk).eval()
    x = torch.randint(V, (3, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 5) % V  # change one token
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)  # the past does not see it
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4  # the present and future do


def test_transformer_shapes_and_inputs():
    model = _model()
    x = torch.randint(V, (4, 12))
    assert model(x).shape == (4, 12, V)
    assert model(x[:, :5]).shape == (4, 5, V)
    torch.testing.assert_close(model(x.float()[..., None]), model(x))  # the chars data set's codes
    last = _model(head="last")
    assert last(x).shape == (4, V)
    torch.testing.assert_close(last(x), model(x)[:, -1])
    with pytest.raises(ValueError, match=r"^x: 13 tokens exceed the context of 12"):
        model(torch.randint(V, (1, 13)))


@pytest.mark.parametrize(("norm", "cls"), [("ln", nl.LayerNorm), ("rms", nl.RMSNorm),
                                           ("dyt", nl.DynamicTanh), ("derf", nl.DynamicErf)])
@pytest.mark.parametrize(("placement", "count"), [("pre", 5), ("post", 4), ("peri", 9)])
def test_each_norm_builds_with_the_expected_layers(norm, cls, placement, count):
    layers = norm_layers(_model(norm, placement))
    assert len(layers) == count  # 2 per block (4 for Peri-LN) + a final one unless Post-LN
    assert all(type(m) is cls for _, m in layers)
    qk = norm_layers(_model(norm, placement, qk="rms"))
    assert len(qk) == count + 4 and sum(type(m) is nl.RMSNorm for _, m in qk) >= 4


def test_no_norm_and_rejected_settings():
    assert norm_layers(_model("none")) == []
    with pytest.raises(ValueError, match=r"^norm: expected one of .*batch statistics.*got 'bn'"):
        _model("bn")
    with pytest.raises(ValueError, match=r"^qk_norm: expected one of .*got 'gn'"):
        _model(qk="gn")
    with pytest.raises(ValueError, match=r"^placement: expected one of \['pre', 'post', 'peri'\], got 'mid'"):
        _model(placement="mid")
    with pytest.raises(ValueError, match=r"^n_heads: 3 must divide d_model 16"):
        _model(n_heads=3)


def _zero_branches(model):
    with torch.no_grad():
        for block in model.blocks:
            for lin in (block.attn.proj, block.mlp[2]):
                lin.weight.zero_()
                lin.bias.zero_()


def test_pre_and_post_ln_orderings():
    """With the attention and MLP branches switched off, a Pre-LN block is the identity (the norm
    sits on the branch) and a Post-LN block is LayerNorm of its input (the norm sits on the sum)."""
    torch.manual_seed(1)
    h = 3.0 * torch.randn(2, 12, 16) + 1.0
    pre, post, peri = _model("ln", "pre"), _model("ln", "post"), _model("ln", "peri")
    for m in (pre, post, peri):
        _zero_branches(m)
    torch.testing.assert_close(pre.blocks[0](h), h)
    torch.testing.assert_close(peri.blocks[0](h), h)
    ref = TF.layer_norm(TF.layer_norm(h, (16,)), (16,))  # norm1 then norm2, γ = 1 and β = 0
    torch.testing.assert_close(post.blocks[0](h), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(post.norm_f, torch.nn.Identity) and isinstance(pre.norm_f, nl.LayerNorm)


def test_embed_scale_multiplies_the_embeddings():
    x = torch.randint(V, (2, 12))
    one, two = _model("none"), _model("none", embed_scale=2.0)
    for m in (one, two):
        _zero_branches(m)  # the blocks are then the identity: logits = head(scale · embedding)
    b = one.head.bias
    torch.testing.assert_close(two(x) - b, 2 * (one(x) - b))
    with pytest.raises(ValueError, match=r"^embed_scale: expected a finite number > 0, got 0"):
        _model(embed_scale=0)


def test_attention_with_qk_norm_matches_a_float64_reference():
    torch.manual_seed(2)
    attn = CausalSelfAttention(16, 2, get_norm("ln")).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    q, k, v = (attn.qkv(x).view(3, 7, 3, 2, 8)[:, :, i].transpose(1, 2) for i in range(3))
    q = TF.layer_norm(q, (8,), attn.q_norm.weight, attn.q_norm.bias, attn.q_norm.eps)
    k = TF.layer_norm(k, (8,), attn.k_norm.weight, attn.k_norm.bias, attn.k_norm.eps)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -math.inf)
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 7, 16))
    torch.testing.assert_close(attn(x), ref)


# -- the runner ---------------------------------------------------------------------------------------
def test_lr_schedule():
    kw = {"lr": 1.0, "steps": 11, "warmup": 4, "min_lr_ratio": 0.1}
    assert [lr_at(s, schedule="constant", **kw) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_at(s, schedule="cosine", **kw) for s in range(11)]
    assert cos[3] == 1.0 and math.isclose(cos[10], 0.1) and math.isclose(cos[4], 1.0)
    assert all(a >= b for a, b in zip(cos[4:], cos[5:]))
    assert lr_at(0, lr=2.0, steps=5, warmup=0, schedule="constant", min_lr_ratio=0.1) == 2.0


TINY = {"steps": 6, "batch_size": 4, "context": 16, "eval_every": 3, "val_windows": 8, "warmup": 2,
        "data_options": {"size": "tiny"}, "model_options": {"d_model": 16, "n_heads": 2, "context": 16}}


def test_lm_runner_on_a_tiny_budget():
    logs = []
    out = lm_train(lm_config(**TINY, norm="rms", timing=True, timing_repeats=2), lambda k, m: logs.append((k, m)))
    assert [k for k, _ in logs] == [0, 1, 2] and [m["step"] for _, m in logs] == [0, 3, 6]
    assert abs(logs[0][1]["val_bpc"] - L0) < 0.1  # a near-uniform guess at initialization
    assert out["steps"] == 6 and not out["diverged"] and math.isfinite(out["final_val_bpc"])
    assert out["final_val_bpc"] == logs[-1][1]["val_bpc"] and out["n_train_chars"] == CHARS_SIZES["tiny"]
    assert out["train_ratio_ln"] > 0 and out["train_step_s"] > 0
    again = lm_train(lm_config(**TINY, norm="rms"), lambda k, m: None)
    assert again["final_val_bpc"] == out["final_val_bpc"]  # deterministic (timing leaves the weights)


def test_lm_runner_rejects_bad_configs():
    with pytest.raises(ValueError, match=r"^lm config: unknown keys \['epochs'\]"):
        lm_config(epochs=3)
    with pytest.raises(ValueError, match=r"^schedule: expected one of \['cosine', 'constant'\], got 'step'"):
        lm_train(lm_config(**TINY, schedule="step"), lambda k, m: None)
    with pytest.raises(ValueError, match=r"^warmup: expected an int >= 0, got -1"):
        lm_train(lm_config(**{**TINY, "warmup": -1}), lambda k, m: None)
    with pytest.raises(ValueError, match=r"^warmup: expected fewer steps than steps=6, got 6"):
        lm_train(lm_config(**{**TINY, "warmup": 6}), lambda k, m: None)


# -- the study ---------------------------------------------------------------------------------------
def test_config_validation_and_profiles():
    st = get_study("transformer")
    full, quick = st.default_config(), st.default_config(quick=True)
    for cfg in (full, quick):
        st.validate(cfg)
        configs = st.runs(cfg)
        assert all(c["runner"] == "lm-train" for c in configs) and len(cfg.seeds) >= 3
        assert len({repr(sorted(c.items())) for c in configs}) == len(configs)  # shared arms once
    assert len(st.runs(full)) == 102 and len(st.runs(quick)) == 12
    for bad, match in [({"norms": ("bn", "ln")}, "norms"), ({"sizes": ("huge",)}, "sizes"),
                       ({"norms": ("rms",), "small_norms": ()}, "'ln' is the reference"),
                       ({"warmup": 300}, "warmup")]:
        with pytest.raises(ValueError, match=match):
            study.validate(dataclasses.replace(full, **bad))


def _fake(cfg: Config, arms: dict[tuple, float], *, spread: float = 0.01, ratio: dict[str, float] | None = None):
    """Finished runs whose final loss is ``arms[(norm, size, placement, warmup, qk)](lr)``."""
    out = []
    for c in study.runs(cfg):
        mo = c["model_options"]
        key = (c["norm"], c["data_options"]["size"], mo["placement"], c["warmup"], mo["qk_norm"])
        f = arms.get(key, arms.get(key[:2], 3.0))
        value = f(c["lr"]) if callable(f) else f
        final = {"final_val_bpc": value + spread * c["seed"], "diverged": False}
        if c["timing"]:
            final["train_ratio_ln"] = (ratio or {}).get(c["norm"], 1.0) * (1 + 0.01 * c["seed"])
            final["train_step_s"] = 0.01
        out.append(RunResult(run_id=str(len(out)), config=c, status="done", final=final))
    return out


def test_cards_follow_the_data_both_ways():
    cfg = Config(seeds=(0, 1, 2))
    big, small, W = "large", "small", cfg.warmup
    good = {("ln", big): 2.5, ("rms", big): 2.51, ("dyt", big): 2.8, ("derf", big): 2.6, ("none", big): 3.0,
            ("ln", small): 3.0, ("dyt", small): 2.8,
            ("ln", big, "post", W, None): 2.5, ("ln", big, "post", 0, None): 3.5, ("ln", big, "pre", 0, None): 2.52,
            ("ln", big, "pre", W, None): lambda lr: 2.5 if lr < 0.02 else L0,
            ("ln", big, "pre", W, "ln"): 2.5}
    cards = study.analyze(_fake(cfg, good, ratio={"rms": 0.8, "none": 0.7}), cfg)
    verdicts = [c.verdict for c in cards]
    assert all(isinstance(c, Card) and c.verdict in CARD_VERDICTS for c in cards)
    assert verdicts == ["answer", "supported", "supported", "not supported", "supported", "supported", "supported"]
    assert all(c.effect_label and "bits/char" in c.effect_label for c in cards)
    answer = cards[0]
    assert answer.question == study.QUESTION and "ln is best; rms within" in answer.measurement
    assert math.isclose(cards[1].effect.mean, 0.5)  # none − LN
    assert math.isclose(cards[4].effect.mean, 0.3 - (-0.2))  # DyT's gap at large − at small

    flipped = {("ln", big): 2.5, ("rms", big): 2.8, ("dyt", big): 2.5, ("derf", big): 2.6, ("none", big): 2.2,
               ("ln", small): 2.8, ("dyt", small): 3.0,
               ("ln", big, "post", W, None): 2.5, ("ln", big, "post", 0, None): 2.5, ("ln", big, "pre", 0, None): 3.0,
               ("ln", big, "pre", W, None): 2.5, ("ln", big, "pre", W, "ln"): lambda lr: 2.5 if lr < 0.02 else L0}
    cards = study.analyze(_fake(cfg, flipped, ratio={"rms": 1.3}), cfg)
    # each claim reversed (DyT now equals LN: "matches" holds where it failed above)
    assert [c.verdict for c in cards] == ["answer", "not supported", "not supported", "supported",
                                          "not supported", "not supported", "not supported"]
    assert "none is best" in cards[0].measurement


def test_diverged_runs_count_as_a_uniform_guess():
    cfg = Config()
    r = RunResult(run_id="x", config={}, status="done", final={"final_val_bpc": None, "diverged": True})
    assert study.capped_bpc(r) == L0
    assert study.capped_bpc(RunResult(run_id="y", config={}, status="done", final={"final_val_bpc": 9.0})) == L0
    assert lr_sensitivity({1e-3: 2.0, 1e-2: 2.5, 1e-1: 50.0}) == pytest.approx((0.0 + 0.5 + (L0 - 2.0)) / 3)
    assert cfg.sizes[-1] == "large"


def test_quick_profile_cards_and_nothing_finished(tmp_path):
    st = get_study("transformer")
    quick = st.default_config(quick=True)
    cards = st.analyze([], quick)
    assert cards[0].verdict == "answer" and all(c.verdict == "inconclusive" for c in cards[1:])
    assert sum("not tested at this profile" in c.measurement for c in cards) == 3  # DyT-vs-data, warm-up, QK (rms runs)
    figures = st.plot([], quick, tmp_path)
    assert len(figures) == 3 and all(f.path.exists() for f in figures)


@pytest.mark.slow
def test_tiny_profile_end_to_end_through_the_sweep_and_report(tmp_path):
    from normlab.lab.report.html import build_report
    from normlab.lab.store import Store
    from normlab.lab.studies import save_study_config
    from normlab.lab.sweep import run_sweep

    st = get_study("transformer")
    cfg = dataclasses.replace(
        st.default_config(quick=True), norms=("ln", "rms", "none"), lrs=(1e-2,), seeds=(0, 1), steps=8,
        batch_size=4, context=16, d_model=16, n_heads=2, eval_every=4, val_windows=16, sizes=("tiny",), warmup=2,
    )
    st.validate(cfg)
    configs = st.runs(cfg)
    results = run_sweep("transformer", configs, tmp_path / "run", workers=1, progress=False)
    assert not [r.error for r in results if not r.done]
    cards = st.analyze(results, cfg)
    assert len(cards) == 7 and cards[0].verdict == "answer" and cards[1].effect.n == 2
    assert cards[2].effect is not None and "RMS / LN" in cards[2].measurement
    figures = st.plot(results, cfg, tmp_path / "fig")
    assert all(isinstance(f, Figure) and f.path.stat().st_size > 1000 for f in figures)
    save_study_config(Store(tmp_path / "run" / "results.sqlite"), st, cfg, quick=True)
    index = build_report(tmp_path / "run")
    assert "Which normalization for transformers" in index.read_text()


def test_ranking_hook_gives_each_method_at_its_best_learning_rate():
    cfg = Config(seeds=(0, 1, 2))
    arms = {("ln", "large"): lambda lr: 2.5 if lr == 3e-3 else 2.9, ("rms", "large"): 2.6, ("dyt", "large"): 2.8,
            ("derf", "large"): 2.7, ("none", "large"): 3.1}
    (r,) = study.ranking(_fake(cfg, arms), cfg)
    assert r.question == "architecture" and r.lower_is_better and r.bounds == (0.0, L0)
    assert r.values["ln"] == pytest.approx([2.5, 2.51, 2.52])  # its best rate, per seed
    assert r.values["none"] == pytest.approx([3.1, 3.11, 3.12])


def test_embeddings_start_at_unit_scale():
    """With GPT-2's std 0.02 embeddings DyT stayed on the unigram plateau: the study gives every
    method unit-scale tokens (0.02 × embed_scale)."""
    cfg = Config()
    assert all(c["model_options"]["embed_scale"] == cfg.embed_scale for c in study.runs(cfg))
    assert 0.02 * cfg.embed_scale == pytest.approx(1.0)
