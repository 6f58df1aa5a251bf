"""ORPO, DPO and the Bradley-Terry preference model (train/orpo.py) against float64 NumPy formulas."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from tests.helpers import jit, random_params, tiny
from train import data, objective, orpo
from train.objective import token_nll

S = 10


def np_log_odds(l):
    l = min(l, orpo.CLAMP)
    return l - math.log(1.0 - math.exp(l))


def np_dlog_odds(l):
    """d log_odds / dl (0 where the clamp holds l)."""
    return 0.0 if l > orpo.CLAMP else 1.0 / (1.0 - math.exp(l))


def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def soft(d, y):
    return -(y * math.log(sig(d)) + (1 - y) * math.log(sig(-d)))


def dsoft(d, y):
    return -(y * sig(-d)) + (1 - y) * sig(d)


def layout(segments, prompt):
    """segment_ids, positions, loss_mask [S] of a row: segment lengths, and prompt tokens per segment."""
    seg, pos, mask = [], [], []
    for s, (n, p) in enumerate(zip(segments, prompt), start=1):
        seg += [s] * n
        pos += list(range(n))
        mask += [0] * p + [1] * (n - p)
    pad = S - len(seg)
    return [np.array(a + [0] * pad, np.int32) for a in (seg, pos, mask)]


# Row 0: two packed pairs; row 1: one pair; row 2: padding only (all masked).
CHOSEN = [([4, 4], [2, 1]), ([6], [3]), ([], [])]
REJECTED = [([3, 6], [2, 1]), ([8], [3]), ([], [])]
LABELS = {(0, 1): 0.7, (0, 2): 1.0, (1, 1): 0.3}
REFS = {(0, 1): (-3.0, -2.5), (0, 2): (-1.0, -4.0), (1, 1): (-6.0, -6.5)}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    b = {}
    for side, rows in (("chosen", CHOSEN), ("rejected", REJECTED)):
        arrays = [layout(*r) for r in rows]
        b[side + "_segment_ids"], b[side + "_positions"], b[side + "_loss_mask"] = (
            np.stack([a[i] for a in arrays]) for i in range(3))
        b[side + "_inputs"] = rng.integers(3, 61, (3, S)).astype(np.int32)
        b[side + "_targets"] = rng.integers(3, 61, (3, S)).astype(np.int32)
    for key, values in (("label", {k: v for k, v in LABELS.items()}),
                        ("chosen_ref_logp", {k: v[0] for k, v in REFS.items()}),
                        ("rejected_ref_logp", {k: v[1] for k, v in REFS.items()})):
        f = np.zeros((3, S), np.float32)
        for (r, s), v in values.items():
            f[r][b["chosen_segment_ids"][r] == s] = v
        b[key] = f
    return b


def pairs(logp, batch, prompt=False):
    """[(key, label, (chosen sum, chosen count), (rejected sum, rejected count), chosen all-token sum, count)]."""
    logp = np.asarray(logp, np.float64)
    out = []
    for (r, s), y in LABELS.items():
        parts = []
        for i, side in enumerate(("chosen", "rejected")):
            where = batch[side + "_segment_ids"][r] == s
            m = batch[side + "_loss_mask"][r][where]
            parts.append((float(np.sum(logp[i * 3 + r][where] * m)), float(np.sum(m))))
        where = batch["chosen_segment_ids"][r] == s
        out.append(((r, s), y, parts[0], parts[1], float(np.sum(logp[r][where])), float(np.sum(where))))
    return out


def np_orpo(logp, batch, lam, prompt=False):
    """Summed ORPO loss and its gradient over logp [2 x 3, S], float64."""
    total, grad = 0.0, np.zeros((6, S))
    for (r, s), y, (cw, nw), (cl, nl), call, nall in pairs(logp, batch):
        lw, ll = cw / nw, cl / nl
        ratio = np_log_odds(lw) - np_log_odds(ll)
        nll = -call / nall if prompt else -lw
        total += nll + lam * soft(ratio, y)
        g = lam * dsoft(ratio, y)
        cw_where = batch["chosen_segment_ids"][r] == s
        grad[r] += cw_where * batch["chosen_loss_mask"][r] * g * np_dlog_odds(lw) / nw
        grad[r] += (cw_where / nall) * -1.0 if prompt else cw_where * batch["chosen_loss_mask"][r] * -1.0 / nw
        rw = batch["rejected_segment_ids"][r] == s
        grad[3 + r] += rw * batch["rejected_loss_mask"][r] * -g * np_dlog_odds(ll) / nl
    return total, grad


def np_dpo(logp, batch, beta):
    total, grad = 0.0, np.zeros((6, S))
    for (r, s), y, (cw, _), (cl, _), _, _ in pairs(logp, batch):
        rw, rl = REFS[(r, s)]
        margin = beta * ((cw - rw) - (cl - rl))
        total += soft(margin, y)
        g = dsoft(margin, y) * beta
        grad[r] += (batch["chosen_segment_ids"][r] == s) * batch["chosen_loss_mask"][r] * g
        grad[3 + r] += (batch["rejected_segment_ids"][r] == s) * batch["rejected_loss_mask"][r] * -g
    return total, grad


@functools.lru_cache(maxsize=None)
def orpo_summed(prompt):
    return summed(lambda lp, b: orpo.orpo_terms(lp, b, lam=0.5, nll_on_prompt=prompt))


def summed(terms):
    def f(logp, batch):
        per_pair, valid, sums = terms(logp, batch)
        return jnp.sum(per_pair * valid), (jnp.sum(valid), sums, valid)
    return jax.jit(jax.value_and_grad(f, has_aux=True))


@pytest.mark.parametrize("scale", [1.0, 1e-9])  # 1e-9: every l ~ -1e-9, past the clamp (l -> 0)
@pytest.mark.parametrize("prompt", [False, True])
def test_orpo_loss_and_gradient_match_numpy(batch, scale, prompt):
    logp = -scale * np.random.default_rng(1).uniform(0.05, 3.0, (6, S)).astype(np.float32)
    (loss, (n, sums, valid)), grad = orpo_summed(prompt)(logp, batch)
    want, want_grad = np_orpo(logp, batch, 0.5, prompt)
    assert float(n) == 3 and np.all(np.isfinite(grad))  # the all-padding row is no pair
    np.testing.assert_allclose(float(loss), want, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6 * np.abs(want_grad).max())
    ratios = sorted(np_log_odds(c / nc) - np_log_odds(l / nl) for _, _, (c, nc), (l, nl), _, _ in pairs(logp, batch))
    got = np.sort(np.asarray(sums["log_odds_ratio"])[np.asarray(valid) > 0])
    np.testing.assert_allclose(got, ratios, rtol=1e-5, atol=1e-5)


def test_log_odds_stable_near_zero():
    ls = np.array([0.0, -1e-12, -1e-7, -2e-6, -1e-3, -0.5, -math.log(2) + 1e-4, -math.log(2) - 1e-4, -3.0, -40.0],
                  np.float32)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(orpo.log_odds)))(ls)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    for l, value, grad in zip(ls, np.asarray(values), np.asarray(grads)):
        np.testing.assert_allclose(value, np_log_odds(float(l)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad, np_dlog_odds(float(l)), rtol=1e-4)


def test_dpo_and_bradley_terry_match_numpy(batch):
    logp = -np.random.default_rng(2).uniform(0.05, 3.0, (6, S)).astype(np.float32)
    (loss, (n, sums, valid)), grad = summed(lambda lp, b: orpo.dpo_terms(lp, b, beta=0.1))(logp, batch)
    want, want_grad = np_dpo(logp, batch, 0.1)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    # Bradley-Terry: rewards read at each response's last token.
    r = np.random.default_rng(3).normal(size=(6, S)).astype(np.float32)
    (loss, (n, sums, valid)), grad = summed(orpo.bt_terms)(r, batch)
    want, want_grad = 0.0, np.zeros((6, S))
    for (row, s), y in LABELS.items():
        idx = [np.flatnonzero(batch[side + "_segment_ids"][row] == s)[-1] for side in ("chosen", "rejected")]
        d = float(r[row, idx[0]]) - float(r[3 + row, idx[1]])
        want += soft(d, y)
        want_grad[row, idx[0]] += dsoft(d, y)
        want_grad[3 + row, idx[1]] -= dsoft(d, y)
    assert float(n) == 3
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def model_setup():
    cfg = tiny("transformer")
    return models.get("transformer"), cfg, random_params(cfg)


def test_model_log_probs_agree_with_token_nll_and_objectives_are_registered(model_setup, batch):
    model, cfg, params = model_setup
    b = {k: jnp.asarray(v) for k, v in batch.items()}

    @jit
    def run(params, b):
        logp, x, _ = orpo.pair_logps(model, cfg, params, b)
        both = orpo.both_sides(b)
        nll = token_nll(model, cfg, params, x, both["targets"], both["loss_mask"].astype(jnp.float32), per_row=True)
        return jnp.sum(logp * both["loss_mask"], axis=1), nll, orpo.orpo_loss(model, cfg, params, b, lam=0.1)

    row_logp, nll, out = run(params, b)
    np.testing.assert_allclose(np.asarray(row_logp), -np.asarray(nll), rtol=1e-5, atol=1e-5)
    assert float(out.weight) == 3 and np.isfinite(float(out.total))
    for name, cls in (("orpo", orpo.ORPO_LOGS), ("dpo", orpo.DPO_LOGS)):
        kwargs = {"lam": 0.1, "nll_on_prompt": False} if name == "orpo" else {"beta": 0.1}
        assert objective.OBJECTIVES[name](None, **kwargs).logs == cls
    assert objective.OBJECTIVES["dpo"](None, beta=0.1).batch_keys == data.PAIR_KEYS + data.preference.REFERENCE_FEATURES


def test_dpo_at_the_reference_is_log2_through_the_pipeline(model_setup, tmp_path):
    """Reference log-probs written into the JSONL by the reference pass, read back by the 'preference'
    source: with the policy equal to the reference every margin is 0 and the loss ln 2 per pair."""
    model, cfg, params = model_setup
    path, out_path = tmp_path / "pairs.jsonl", tmp_path / "ref.jsonl"
    rows = [{"prompt": f"Q{i}:", "chosen": "ab" * (i + 1), "rejected": "ba" * (i + 2), "label": 0.9} for i in range(5)]
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    tok = _Mod61()
    assert orpo.add_reference_logps(model, cfg, params, str(path), str(out_path), tok, 24, batch_size=4) == 5
    written = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert all(w["ref_chosen_logp"] < 0 and w["ref_rejected_logp"] < 0 and w["label"] == 0.9 for w in written)
    c = data.default_config()
    c.update(source="preference", paths=[str(out_path)], reference_logps=True, prefetch=0, packing=True)
    b = next(iter(data.make_dataset(c, tokenizer=tok, seq_len=24, batch_size=4, seed=0)))
    assert set(b) == set(data.batch_keys(c))
    out = jit(lambda p, b: orpo.dpo_loss(model, cfg, p, b, beta=0.1))(params, b)
    np.testing.assert_allclose(float(out.sums["loss"]) / float(out.weight), math.log(2), rtol=1e-5)
    np.testing.assert_allclose(float(out.sums["margin"]), 0.0, atol=1e-4)
    records = data.read_preference_jsonl([str(out_path)], reference=True)
    ev = orpo.evaluate_pairs(model, cfg, params, records, tok, 24, batch_size=4)
    want = np.mean([r.ref_chosen_logp / (len(tok.encode(r.chosen)) + 1) for r in records])  # + eos
    np.testing.assert_allclose(ev["chosen_logp"], want, rtol=1e-5)


class _Mod61(data.ByteTokenizer):
    """The byte tokenizer folded into the tiny model's 61-token vocabulary (ids 3..60)."""
    vocab_size = 61

    def encode(self, text):
        return [3 + (b % 58) for b in text.encode()]

    def decode(self, ids):
        return "".join(chr(97 + (i - 3) % 26) for i in ids if i >= 3)


@pytest.mark.timeout(120)
def test_orpo_runs_through_the_trainer(tmp_path):
    """experiments/orpo_arith.py at the tiny size through the one trainer: finite, falling loss and ORPO's logs."""
    from experiments import orpo_arith
    from train import metrics, trainer

    c = orpo_arith.get_config()
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, dtype="float32")
    c.data.max_steps = 2
    c.train.update(steps=6, batch_size=8, seq_len=48, log_every=1, eval_every=0, eval_batches=1, exact_match_every=0,
                   ckpt_every=0, progress=False, orpo_lambda=1.0)
    c.optim.update(warmup_steps=1, lr=1e-2)
    # Started from given parameters (train.init_from: here a model.safetensors file), e.g. a previous stage's.
    from train import compress
    model, mcfg = models.get("transformer"), models.get("transformer").from_config(c.model)
    rng = np.random.default_rng(0)
    start = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype),
                         jax.eval_shape(lambda: model.init(mcfg, jax.random.PRNGKey(0))))
    compress.save(tmp_path / "start", start, mcfg, {"method": "none"})
    c.train.init_from = str(tmp_path / "start" / "model.safetensors")
    tmp_path = tmp_path / "run"
    first = next(iter(data.make_dataset(c.data, tokenizer=data.make_tokenizer(c.data), seq_len=48, batch_size=8,
                                        seed=c.seed)))
    want = jit(lambda p, b: orpo.orpo_loss(model, mcfg, p, b, lam=1.0))(start, first)
    result = trainer.run(c, str(tmp_path))
    records = [r for r in metrics.read_jsonl(str(tmp_path)) if "loss" in r]
    np.testing.assert_allclose(records[0]["loss"], float(want.sums["loss"] / want.weight), rtol=1e-5)
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]
    assert result["pairs"] == 8 and 0 <= result["accuracy"] <= 1
    for key in orpo.ORPO_LOGS:
        assert np.isfinite(result[key])
    np.testing.assert_allclose(result["loss"], result["nll"] + result["or_loss"], rtol=1e-5)
