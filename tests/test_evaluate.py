"""Standalone evaluation of a trained workdir: perplexity against a float64 reference, exact match, the CLI."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from tests.helpers import tiny_train_config as tiny_config
from tests.test_trainer import ROOT
from train import data, evaluate, trainer

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("trained")
    trainer.run(tiny_config(steps=4), str(path))
    return path


def test_perplexity_of_a_text_file_matches_float64_reference(workdir, tmp_path):
    docs = ["Q:12+3\nA:+3=15.The answer is 15.", "import os\nprint(os.sep)"]
    path = tmp_path / "held_out.txt"
    path.write_text("\n\n".join(docs) + "\n")
    config = tiny_config(steps=4)
    result = evaluate.evaluate_workdir(config, str(workdir), "perplexity", str(path))
    assert result["step"] == 4

    params = jax.device_get(evaluate.load_state(config, str(workdir))[1].params)
    model = models.get("transformer")
    mcfg = model.from_config(config.model)
    tok = data.ByteTokenizer()
    nll = count = 0.0
    for doc in docs:
        ids = [tok.bos_id] + tok.encode(doc) + [tok.eos_id]
        logits = np.asarray(model.apply(params, jnp.asarray([ids[:-1]]), mcfg)[0][0], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    np.testing.assert_allclose(result["loss"], nll / count, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], np.exp(nll / count), rtol=1e-5)


def test_exact_match_task_reports_each_step_count(workdir):
    config = tiny_config(steps=4, exact_match_n=2, exact_match_steps=(1, 3), max_new_tokens=24)
    result = evaluate.evaluate_workdir(config, str(workdir), "exact_match")
    assert set(result) >= {"exact_match/1", "exact_match/3", "exact_match"}
    assert all(0.0 <= result[k] <= 1.0 for k in ("exact_match/1", "exact_match/3"))


def test_refuses_missing_checkpoint_and_data(tmp_path, workdir):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        evaluate.evaluate_workdir(tiny_config(), str(tmp_path), "loss")
    with pytest.raises(ValueError, match="--data FILE"):
        evaluate.evaluate_workdir(tiny_config(), str(workdir), "perplexity")


def test_command_line_loss(workdir, tmp_path):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "train.evaluate", "--config", "tests/test_evaluate_config.py",
           "--workdir", str(workdir), "--task", "loss", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["step"] == 4 and np.isfinite(result["loss"]) and result["perplexity"] > 1


def test_cot_task_scores_each_prompting_style_and_self_consistency(workdir):
    config = tiny_config(steps=4)
    config.cot.update(shots=2, prompting=("standard", "cot"), n=3, steps=(1, 2), k=3, max_new_tokens=8)
    result = evaluate.evaluate_workdir(config, str(workdir), "cot")
    for style in ("standard", "cot"):
        for kind in ("greedy", "maj@1", "maj@3"):
            values = [result[f"{style}/{kind}/{s}"] for s in (1, 2)]
            assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in values)
            assert result[f"{style}/{kind}/mean"] == pytest.approx(np.mean(values))
    assert result["n/1"] == result["n/2"] == 3


def test_cot_task_matches_a_scripted_model(monkeypatch):
    """With a generator that answers exactly, greedy and majority are 1; with one that answers
    from its sample index, the vote is what the samples say."""
    config = tiny_config(steps=4)
    config.cot.update(shots=1, prompting=("cot",), n=4, steps=(3,), k=5)
    problems = data.heldout_problems(3, 4, seed=config.data.seed)
    answers = {p.prompt: p.answer for p in problems}
    calls = []

    def fake_complete(model, params, cfg, tokenizer, texts, *, max_new_tokens, stop_strings, rng, **kw):
        calls.append((len(texts), rng is None, kw["temperature"]))
        out = []
        for i, text in enumerate(texts):
            gold = answers[text[text.rindex("Q:"):]]
            # greedy is always right; of each problem's 5 samples the first is wrong, 3 of the others right
            right = rng is None or i % 5 in (1, 2, 3)
            out.append(f"+1=2.The answer is {gold if right else gold + 1}.\n\nQ:")
        return out

    monkeypatch.setattr(evaluate.generate, "complete", fake_complete)
    result = evaluate.arithmetic_cot(None, None, None, None, config)
    assert result["cot/greedy/3"] == 1.0 and result["cot/maj@5/3"] == 1.0 and result["cot/maj@1/3"] == 0.0
    assert calls == [(4, True, 0.0), (20, False, config.cot.temperature)]


@pytest.mark.parametrize("field, value, words", [
    ("k", 0, "cot.k"), ("shots", -1, "cot.shots"), ("prompting", ("chain",), "cot.prompting"),
    ("steps", (0, 9), "cot.steps"), ("temperature", 0.0, "cot.temperature"), ("top_p", 0.0, "cot.top_p"),
])
def test_cot_section_is_validated(field, value, words):
    from train.config import validate

    config = tiny_config(steps=4)
    config.cot.k = 2
    config.cot[field] = value
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        validate(config)


def test_registry_cadence_decides_what_the_trainer_runs():
    """The trainer runs every registered evaluation whose ``train.<name>_every`` divides the step, and each
    with a cadence at the last step; the command line's tasks are the registry's names."""
    config = tiny_config(steps=12, eval_every=4, exact_match_every=6, cot_every=0, length_generalization_every=0)
    ev = evaluate.Evaluator.__new__(evaluate.Evaluator)
    ev.config = config
    assert ev.due(4) == ["loss"] and ev.due(6) == ["exact_match"] and ev.due(5) == []
    assert ev.due(12) == ["loss", "exact_match"]
    assert set(evaluate.TASKS) == {"loss", "perplexity", "exact_match", "cot", "length_generalization"}
    assert {e.every for e in evaluate.EVALS.values()} - {""} <= set(config.train)
