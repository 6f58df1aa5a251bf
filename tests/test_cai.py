"""Constitutional AI (train/cai.py) end to end with a scripted generator, and PPO's pieces (train/ppo.py)
against NumPy."""
import json
import math
import re

import jax
import numpy as np
import pytest

from train import cai, data, ppo

CONSTITUTION = {
    "principles": [
        {"name": f"p{i}", "critique": f"Critique under p{i}.", "revision": f"Revise under p{i}.",
         "feedback": f"Which response follows p{i}?"} for i in range(3)],
    "examples": [{"prompt": "2+2", "response": "5", "critique_request": "Is it right?", "critique": "No.",
                  "revision_request": "Fix it.", "revision": "4"}],
}


class Scripted:
    """Deterministic stand-in for a model: every output is a function of its prompt, every call recorded."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, sample, seed):
        self.calls.append(("generate", list(prompts), sample, seed))
        out = []
        for p in prompts:
            if p.endswith("Critique:"):
                out.append(" crit[" + re.findall(r"CritiqueRequest: (.*)\n", p)[-1] + "]")
            elif p.endswith("Revision:"):
                out.append(" rev(" + re.findall(r"Assistant: (.*)\n", p)[-1] + ")")
            elif p.endswith(cai.COT):
                out.append(" thinking")
            else:
                human = re.findall(r"Human: (.*)\n", p)[-1]
                out.append(f"{'sample' if sample else 'greedy'}{seed}:{human}")
        return out

    def option_logprobs(self, prompts, options):
        self.calls.append(("options", list(prompts), tuple(options)))
        # P(A) and P(B) from the prompt's number of characters: log p = -len % 5 - 1, -len % 3 - 1
        return np.array([[-(len(p) % 5) - 1.0, -(len(p) % 3) - 1.0] for p in prompts])


@pytest.fixture
def constitution_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(CONSTITUTION))
    return path


def test_constitution_files_and_errors_naming_the_record(tmp_path, constitution_file):
    c = cai.load_constitution(constitution_file)
    assert [p.name for p in c.principles] == ["p0", "p1", "p2"] and c.examples[0]["revision"] == "4"
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("principles:\n  - name: a\n    critique: Is it right?\n    revision: Fix it.\n")
    assert cai.load_constitution(yaml_path).principles == (cai.Principle("a", "Is it right?", "Fix it."),)
    bad = json.loads(json.dumps(CONSTITUTION))
    del bad["principles"][1]["revision"]
    with pytest.raises(ValueError, match=r"principles\[1\] \('p1'\) is missing field 'revision'"):
        cai.parse_constitution(bad, "c.json")
    bad = json.loads(json.dumps(CONSTITUTION))
    del bad["examples"][0]["critique"]
    with pytest.raises(ValueError, match=r"examples\[0\] is missing field 'critique'"):
        cai.parse_constitution(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a valid constitution file"):
        cai.load_constitution(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="'a' has no 'feedback' question"):
        cai.feedback_labels(["x"], cai.load_constitution(yaml_path), Scripted(), Scripted())


def test_sl_cai_rounds_fields_and_pairs_exactly(tmp_path, constitution_file):
    c = cai.load_constitution(constitution_file)
    prompts = [f"q{i}" for i in range(40)]
    gen = Scripted()
    records = cai.critique_revise(prompts, c, gen, rounds=2, seed=7)
    assert len(gen.calls) == 1 + 2 * 2 and all(call[2] is False for call in gen.calls)  # batched, greedy
    shots = cai.few_shot(c)
    assert shots.startswith("Human: 2+2\n\nAssistant: 5\n\nCritiqueRequest: Is it right?") and shots.endswith(" 4\n\n")
    for i, (p, rec) in enumerate(zip(prompts, records)):
        drawn = [cai.draw_principle(c, 7, "sl", i, k) for k in range(2)]
        response = f"greedy7:{p}"
        assert rec["human"] == p and rec["prompt"] == f"Human: {p}\n\nAssistant: " and rec["initial"] == response
        for k, (d, rnd) in enumerate(zip(drawn, rec["rounds"])):
            critique = f"crit[{d.critique}]"
            assert rnd == {"principle": d.name, "critique_request": d.critique, "critique": critique,
                           "revision_request": d.revision, "revision": f"rev({response})"}
            # the round's prompts: few-shot examples, the current response, the drawn principle's requests
            assert gen.calls[1 + 2 * k][1][i] == shots + cai.critique_prompt(p, response, d.critique)
            assert gen.calls[2 + 2 * k][1][i] == shots + cai.revision_prompt(p, response, d.critique, critique,
                                                                             d.revision)
            response = f"rev({response})"
        assert rec["completion"] == response == f"rev(rev(greedy7:{p}))"
    # principles are drawn uniformly and independently per prompt and round, the same on a rerun
    names = [r["principle"] for rec in records for r in rec["rounds"]]
    assert set(names) == {"p0", "p1", "p2"} and cai.critique_revise(prompts, c, Scripted(), rounds=2, seed=7) == records
    pairs = cai.revision_pairs(records)
    assert pairs[0] == {"prompt": "Human: q0\n\nAssistant: ", "chosen": "rev(rev(greedy7:q0))",
                        "rejected": "greedy7:q0", "label": 1.0, "origin": "revision_vs_initial"}
    # files the trainer's sources read as they are: SFT for 'jsonl', pairs for 'preference'
    assert cai.write_jsonl(tmp_path / "sft.jsonl", records) == 40 and cai.read_jsonl(tmp_path / "sft.jsonl") == records
    assert data.read_jsonl_records([str(tmp_path / "sft.jsonl")])[0] == (records[0]["prompt"], records[0]["completion"])
    cai.write_jsonl(tmp_path / "pairs.jsonl", pairs)
    got = data.read_preference_jsonl([str(tmp_path / "pairs.jsonl")])[0]
    assert got[:4] == ("Human: q0\n\nAssistant: ", "rev(rev(greedy7:q0))", "greedy7:q0", 1.0)


@pytest.mark.parametrize("cot", [False, True])
def test_rl_cai_labels_normalized_averaged_and_clamped(tmp_path, constitution_file, cot):
    c = cai.load_constitution(constitution_file)
    prompts = [f"question {i}" for i in range(12)]
    policy, feedback = Scripted(), Scripted()
    records = cai.feedback_labels(prompts, c, policy, feedback, seed=3, principles_per_pair=2, cot=cot)
    assert [call[2:] for call in policy.calls] == [(True, 3), (True, 4)]  # two samples per prompt
    scored = [call for call in feedback.calls if call[0] == "options"]
    assert len(scored) == 2 and all(call[2] == ("A", "B") for call in scored)
    for i, (p, rec) in enumerate(zip(prompts, records)):
        a, b = f"sample3:{p}", f"sample4:{p}"
        assert (rec["prompt"], rec["chosen"], rec["rejected"]) == (f"Human: {p}\n\nAssistant: ", a, b)
        want = []
        for k in range(2):
            d = cai.draw_principle(c, 3, "rl", i, k)
            text = cai.feedback_prompt(p, d.feedback, a, b)
            text += (cai.COT + " thinking\n" + cai.ANSWER) if cot else cai.ANSWER
            assert scored[k][1][i] == text and rec["principles"][k] == d.name
            la, lb = -(len(text) % 5) - 1.0, -(len(text) % 3) - 1.0
            p_a = math.exp(la) / (math.exp(la) + math.exp(lb))
            want.append(min(max(p_a, 0.4), 0.6) if cot else p_a)
        np.testing.assert_allclose(rec["p_a"], want, rtol=1e-12)
        np.testing.assert_allclose(rec["label"], np.mean(want), rtol=1e-12)
    labels = [r["label"] for r in records]
    assert (all(0.4 <= x <= 0.6 for x in labels) if cot else max(labels) > 0.6 or min(labels) < 0.4)
    cai.write_jsonl(tmp_path / "rl.jsonl", records)
    assert [r.label for r in data.read_preference_jsonl([str(tmp_path / "rl.jsonl")])] == labels


def np_gae(r, v, m, gamma, lam):
    b, t = r.shape
    adv = np.zeros((b, t))
    for i in range(b):
        idx = np.flatnonzero(m[i])
        nxt_v, nxt_a = 0.0, 0.0
        for j in idx[::-1]:
            delta = r[i, j] + gamma * nxt_v - v[i, j]
            adv[i, j] = delta + gamma * lam * nxt_a
            nxt_v, nxt_a = v[i, j], adv[i, j]
    return adv, (adv + v) * m


def test_ppo_pieces_match_numpy():
    rng = np.random.default_rng(0)
    b, t = 3, 9
    mask = np.zeros((b, t), np.float32)
    mask[0, 2:7], mask[1, 4:9], mask[2, 1:2] = 1, 1, 1  # prompt, response, padding; a 1-token response
    logp, logp_old, logp_ref = (rng.uniform(-3, -0.1, (b, t)).astype(np.float32) for _ in range(3))
    values, values_old = rng.normal(size=(b, t)).astype(np.float32), rng.normal(size=(b, t)).astype(np.float32)
    score = rng.normal(size=b).astype(np.float32)
    rewards, kl = jax.jit(ppo.kl_rewards, static_argnums=4)(logp_old, logp_ref, score, mask, 0.1)
    want = -0.1 * (logp_old - logp_ref) * mask
    for i in range(b):
        want[i, np.flatnonzero(mask[i])[-1]] += score[i]
    np.testing.assert_allclose(rewards, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(kl, np.sum((logp_old - logp_ref) * mask, 1), rtol=1e-6)
    adv, ret = jax.jit(ppo.gae, static_argnums=(3, 4))(rewards, values, mask, 0.99, 0.9)
    want_adv, want_ret = np_gae(np.float64(want), np.float64(values), mask, 0.99, 0.9)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)
    # clipped surrogate and clipped value loss, values and gradients
    a = np.float64(want_adv)
    (loss, stats), grad = jax.jit(jax.value_and_grad(ppo.policy_loss, has_aux=True), static_argnums=4)(
        logp, logp_old, adv, mask, 0.2)
    ratio = np.exp(np.float64(logp) - logp_old)
    surr = np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a)
    n = mask.sum()
    np.testing.assert_allclose(loss, -np.sum(surr * mask) / n, rtol=1e-5)
    active = np.where(ratio * a <= np.clip(ratio, 0.8, 1.2) * a, 1.0, 0.0)  # the unclipped term is the min
    np.testing.assert_allclose(grad, -active * ratio * a * mask / n, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats["clip_fraction"], np.sum((np.abs(ratio - 1) > 0.2) * mask) / n, rtol=1e-6)
    vl = jax.jit(ppo.value_loss, static_argnums=4)(values, values_old, ret, mask, 0.2)
    clipped = values_old + np.clip(np.float64(values) - values_old, -0.2, 0.2)
    want_vl = 0.5 * np.sum(np.maximum((values - want_ret) ** 2, (clipped - want_ret) ** 2) * mask) / n
    np.testing.assert_allclose(vl, want_vl, rtol=1e-5)


def test_arithmetic_constitution_checker_corpus_and_rollout_rows():
    from experiments.cai_run import CONSTITUTION

    c = cai.load_constitution(CONSTITUTION)
    problem = next(p for p in (data.training_problem(0, i) for i in range(10)) if p is not None and p.num_steps >= 2)
    responses = cai.flawed_responses(problem, 0)
    verdicts = {k: cai.check_response(problem, r) for k, r in responses.items()}
    assert verdicts == {"good": {"correct": True, "format": True}, "wrong": {"correct": False, "format": True},
                        "unformatted": {"correct": True, "format": False},
                        "both": {"correct": False, "format": False}}
    assert not cai.check_response(problem, responses["good"].replace("=", "=1", 1))["correct"]  # a wrong middle step
    rows = cai.format_corpus(c, 0, range(40))
    problems = {cai.human_text(p): p for p in (data.training_problem(0, i) for i in range(40)) if p is not None}
    kinds = {"response": 0, "critique": 0, "revision": 0, "comparison": 0}
    for r in rows:
        human = r["prompt"][r["prompt"].index("Human: ") + 7:].split("\n", 1)[0]
        p = problems[human]
        if r["prompt"].endswith(("Critique:", "Revision:")):
            response = r["prompt"].split("Assistant: ", 1)[1].split("\n\n", 1)[0]
            request = r["prompt"].split("CritiqueRequest: ", 1)[1].split("\n\n", 1)[0]
            name = next(q.name for q in c.principles if q.critique == request)
            critique = " " + cai.critique_text(name, cai.check_response(p, response))
        if r["prompt"].endswith("Critique:"):
            kinds["critique"] += 1
            assert r["completion"] == critique  # the program's verdict under the drawn principle
        elif r["prompt"].endswith("Revision:"):
            kinds["revision"] += 1
            assert r["prompt"].split("Critique:", 1)[1].startswith(critique + "\n\nRevisionRequest: ")
            assert r["completion"] == " " + p.cot and all(cai.check_response(p, p.cot).values())
        elif r["prompt"].endswith(cai.ANSWER):
            kinds["comparison"] += 1
            question = r["prompt"].split("\n")[2]
            name = next(q.name for q in c.principles if q.feedback == question)
            a, b = (r["prompt"].split(f"({x}) ", 1)[1].split("\n", 1)[0] for x in "AB")
            ok = cai.check_response(p, a)[name], cai.check_response(p, b)[name]
            assert ok[0] != ok[1] and r["completion"] == ("A)" if ok[0] else "B)")
        else:
            kinds["response"] += 1
            assert r["completion"] in cai.flawed_responses(p, 0).values()
    assert min(kinds.values()) > 0 and kinds["response"] == kinds["critique"] == kinds["revision"]
    # PPO rollout rows: the mask covers the response's targets (and its eos); the score is read at its last token
    inputs, targets, mask, last = ppo.rollout_rows([[1, 5, 6], [1, 7]], [[8, 9, 2], [4, 4, 4, 4]], 2, 0, 6)
    assert inputs[0].tolist() == [1, 5, 6, 8, 9, 0] and targets[0].tolist() == [5, 6, 8, 9, 2, 0]
    assert mask[0].tolist() == [0, 0, 1, 1, 1, 0] and last[0] == 4  # token 9
    assert inputs[1].tolist() == [1, 7, 4, 4, 4, 0] and mask[1].tolist() == [0, 1, 1, 1, 1, 0] and last[1] == 4


def test_rl_cai_resamples_b_where_it_equals_a(constitution_file):
    """A peaked policy: seeds 3 and 4 give the same response, seed 103 another one for question 1 only."""
    class Peaked(Scripted):
        def generate(self, prompts, *, sample, seed):
            self.calls.append(("generate", list(prompts), sample, seed))
            return [f"other{seed}" if seed == 103 and "q1" in p else "same" for p in prompts]

    policy = Peaked()
    records = cai.feedback_labels(["q0", "q1"], cai.load_constitution(constitution_file), policy, Scripted(), seed=3,
                                  resample=2)
    assert [(len(c[1]), c[3]) for c in policy.calls] == [(2, 3), (2, 4), (2, 103), (1, 104)]
    assert [(r["chosen"], r["rejected"]) for r in records] == [("same", "same"), ("same", "other103")]
    assert cai.labeled_pairs(records) == [records[1]]


def test_pairs_left_out_are_counted_in_the_log(caplog):
    import logging

    records = [{"prompt": "p", "initial": "a", "completion": "a"}, {"prompt": "p", "initial": "a", "completion": "b"},
               {"prompt": "p", "initial": " ", "completion": "b"}]
    with caplog.at_level(logging.WARNING):
        assert [r["chosen"] for r in cai.revision_pairs(records)] == ["b"]
        labeled = [{"chosen": "x", "rejected": "x"}, {"chosen": "x", "rejected": "y"}, {"chosen": "", "rejected": "y"}]
        assert cai.labeled_pairs(labeled) == [labeled[1]]
    assert "2 of 3 SL-CAI records left out" in caplog.text and "AI-feedback pairs: 2 of 3 left out" in caplog.text


def test_ppo_step_on_a_tiny_model():
    """The loop's rollout preparation and update (train/ppo.py make_ppo_step): at the reference the KL penalty is
    0, the rewards are the preference model's score on the last response token, the ratio is 1 (no clipping),
    and an update moves the policy."""
    import optax

    import models
    from tests.helpers import jit, random_params, tiny
    from train import orpo, step as step_lib

    model, cfg = models.get("transformer"), tiny("transformer")
    params, pm = random_params(cfg, 0), random_params(cfg, 1)
    p = ppo.default_config()
    tx = optax.sgd(0.1)
    prepare, update = ppo.make_ppo_step(model, cfg, tx, p, jit=jit)
    rows = ppo.rollout_rows([[1, 5, 6], [1, 7]], [[8, 9, 2], [4, 4, 4, 4]], 2, 0, 8)
    rollout, stats = prepare(params, params, pm, *rows)
    score = jit(lambda q, t, l: orpo.sequence_rewards(model, cfg, q, t, l, p.reward_token))(pm, rows[0], rows[3])
    assert float(stats["kl"]) == 0.0
    np.testing.assert_allclose(float(stats["score"]), np.mean(np.asarray(score)), rtol=1e-5)
    mask = rows[2]
    np.testing.assert_allclose(np.sum(np.asarray(rollout["advantages"]) * mask) / mask.sum(), 0.0, atol=1e-5)
    state = step_lib.TrainState(step=np.zeros((), np.int32), params=params, opt_state=tx.init(params))
    new, out = update(state, rollout)
    assert float(out["clip_fraction"]) == 0.0 and float(out["approx_kl"]) < 1e-10 and np.isfinite(float(out["loss"]))
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(new.params),
                                                                        jax.tree.leaves(params))]
    assert int(new.step) == 1 and max(moved) > 0
