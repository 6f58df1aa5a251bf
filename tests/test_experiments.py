"""Every experiment config validates, and the small ones train a few steps through the trainer."""
import importlib
import os

import pytest

from train import config as config_lib
from experiments import jobs
from train import trainer

MODULES = sorted(f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "experiments"))
                 if f.endswith(".py") and f != "__init__.py")
EXPERIMENTS = [m for m in MODULES if hasattr(importlib.import_module(f"experiments.{m}"), "get_config")]  # not scripts
# Mamba through the trainer: tests/test_mamba.py (arithmetic) and tests/test_synthetic.py (mamba_induction).
SMOKE = ("cot_prompting", "cot_trained", "cot_direct", "arith_direct", "transformer_induction",
         "transformer_selective_copying")


def get(name):
    return importlib.import_module(f"experiments.{name}").get_config()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_validates(name):
    config_lib.validate(get(name))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_configs_name_every_model_field(name):
    """Every experiment's model section (``models.config_dict``) holds every field of its family's Config, so a
    command line can set any of them (Mamba's ``state_dtype``, the Transformer's ``moe_top_k``) and the value reaches
    the model; a stray key is refused."""
    import dataclasses

    import models

    c = get(name)
    family = models.get(c.model.family)
    assert set(c.model) == {"family"} | {f.name for f in dataclasses.fields(family.Config)}
    key, value = ("state_dtype", "bfloat16") if c.model.family == "mamba" else ("moe_top_k", 2)
    c = config_lib.override(c, [f"model.{key}={value}"])
    assert getattr(family.from_config(c.model), key) == value
    with pytest.raises(ValueError, match="model.d_staet is not a mamba field"):
        models.config_dict("mamba", d_staet=16)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", SMOKE)
def test_smoke_few_steps(name, tmp_path):
    c = get(name)
    c.train.update(steps=3, batch_size=8, eval_every=3, eval_batches=1, ckpt_every=3, log_every=1, progress=False,
                   exact_match_every=0)
    c.optim.warmup_steps = 1
    result = trainer.run(c, str(tmp_path))
    assert result["step"] == 3 and result["loss"] > 0 and "eval_loss" in result


def test_cot_tables_report_mean_spread_and_difference():
    from experiments import cot_run

    results = [{"a/1": 0.5, "a/mean": 0.5, "b/1": 0.9, "b/mean": 0.9},
               {"a/1": 0.7, "a/mean": 0.7, "b/1": 1.0, "b/mean": 1.0}]
    text = cot_run.table("t", [("A", results, "a"), ("B", results, "b")], [1], trained_max=6)
    row = [r for r in text.splitlines() if r.startswith("| 1 ")][0]
    assert row == "| 1 | 60.0 [50.0, 70.0] | 95.0 [90.0, 100.0] | +35.0 |"
    beyond = cot_run.table("t", [("A", results, "a"), ("B", results, "b")], [1], trained_max=0)
    assert "1 (beyond training)" in beyond


def test_switch_steps_to_reach_dense_best_loss(tmp_path):
    """Per seed: the first Switch eval at or below the dense run's best eval loss, and the speedup.
    Seed 0's dense run overfits (its final loss 2.4 is above its best 2.0): against the final loss
    the Switch run would 'reach' it at step 200, a 2x speedup that is an artifact."""
    import json

    from experiments import switch_run
    from train import metrics

    curves = {"dense_stdlib": [3.0, 2.2, 2.0, 2.4], "switch_stdlib": [2.9, 2.3, 2.1, 2.05]}
    for seed, shift in ((0, 0.0), (1, -0.1)):
        for name, losses in curves.items():
            workdir = tmp_path / name / f"seed{seed}"
            workdir.mkdir(parents=True)
            records = [{"step": 100 * (i + 1), "eval_loss": v + (shift if name == "switch_stdlib" else 0.0)}
                       for i, v in enumerate(losses)]
            records += [{"step": 100, "moe/dropped_fraction/layer1": 0.1, "moe/load_max/layer1": 0.2}]
            (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    dense, switch = (metrics.curve(metrics.read_jsonl(str(tmp_path / name / "seed0")), "eval_loss")
                     for name in ("dense_stdlib", "switch_stdlib"))
    r0 = switch_run.steps_to_reach(dense, switch)
    assert (r0["dense_best"], r0["dense_step"], r0["switch_step"], r0["speedup"]) == (2.0, 300, None, None)
    table = switch_run.summarize(str(tmp_path), [0, 1])
    assert "| 0 | 2.0000 | 2.0500 | 300 | not reached | - |" in table
    assert "| 1 | 2.0000 | 1.9500 | 300 | 300 | 1.00x |" in table
    assert table.splitlines()[-1].endswith("| - |")  # no mean speedup while a seed never reaches it
    assert os.path.exists(switch_run.plot(str(tmp_path), [0, 1]))


def test_synthetic_tables_per_length_mean_and_spread():
    from experiments import synthetic_run

    results = {"mamba": [{"accuracy/256": 1.0, "accuracy/1024": 0.9, "accuracy/mean": 0.95},
                         {"accuracy/256": 1.0, "accuracy/1024": 0.7, "accuracy/mean": 0.85}],
               "transformer": [{"accuracy/256": 1.0, "accuracy/1024": 0.0, "accuracy/mean": 0.5},
                               {"accuracy/256": 0.9, "accuracy/1024": 0.1, "accuracy/mean": 0.5}]}
    text = synthetic_run.table("induction", results)
    assert "| 256 (training length) | 100.0 [100.0, 100.0] | 95.0 [90.0, 100.0] |" in text
    assert "| 1024 | 80.0 [70.0, 90.0] | 5.0 [0.0, 10.0] |" in text
    assert text.index("| 256 ") < text.index("| 1024 ")


def test_arith_table_per_operation_count():
    from experiments import arith_run

    runs = {"Mamba": [{"exact_match/1": 0.5, "exact_match/2": 0.25, "exact_match": 0.375, "step": 400},
                      {"exact_match/1": 0.7, "exact_match/2": 0.25, "exact_match": 0.475, "step": 400}],
            "Transformer": [{"exact_match/1": 1.0, "exact_match/2": 0.0, "exact_match": 0.5, "step": 400},
                            {"exact_match/1": 1.0, "exact_match/2": 0.5, "exact_match": 0.75, "step": 400}]}
    text = arith_run.table(runs)
    assert text.splitlines()[0] == "| model | 1 | 2 | all |"
    assert "| Mamba | 60.0 [50.0, 70.0] | 25.0 [25.0, 25.0] | 42.5 [37.5, 47.5] |" in text
    assert "| Transformer | 100.0 [100.0, 100.0] | 25.0 [0.0, 50.0] | 62.5 [50.0, 75.0] |" in text


def test_a_finished_job_is_reused_only_with_the_same_overrides(tmp_path):
    import json

    workdir = tmp_path / "arith_cot" / "seed0"
    workdir.mkdir(parents=True)
    (workdir / "exact_match.json").write_text(json.dumps({"exact_match": 0.5, "overrides": ["train.steps=10"]}))
    done = jobs.job("arith_cot", 0, str(tmp_path), ["train.steps=10"], 0.5, eval_task="exact_match")
    assert done["exact_match"] == 0.5  # no subprocess ran: the finished result
    with pytest.raises(ValueError, match=r"holds a finished run with overrides \['train.steps=10'\], not "
                                         r"\['train.steps=20'\]; use another --root"):
        jobs.job("arith_cot", 0, str(tmp_path), ["train.steps=20"], 0.5, eval_task="exact_match")


def test_ring_induction_curriculum_stages():
    from experiments import ring_induction
    lengths = []
    for stage in ("2k", "8k", "32k"):
        c = ring_induction.get_config(stage)
        config_lib.validate(c)
        lengths.append(c.train.seq_len)
        assert (c.model.attention == "ring") == (stage == "32k") and c.data.eval_lengths == (c.data.task_length,)
    assert lengths == [2048, 8192, 32768]
    with pytest.raises(ValueError, match=r"stage '16k'; use one of \['2k', '8k', '32k'\]"):
        ring_induction.get_config("16k")


def test_a_stage_stopped_early_is_refused_even_beside_an_older_results_file(tmp_path, monkeypatch):
    """``jobs.stage`` goes by the step the run reached, not by a results.json an earlier, shorter run left."""
    c = get("arith_cot")
    c.train.steps = 50
    (tmp_path / "results.json").write_text('{"step": 20}')
    monkeypatch.setattr(trainer, "run", lambda config, workdir: {"step": 30, "preempted": True})
    with pytest.raises(ValueError, match=r"stopped at step 30 of 50 \(preempted\)"):
        jobs.stage(c, str(tmp_path))
    monkeypatch.setattr(trainer, "run", lambda config, workdir: {"step": 50, "loss": 1.0})
    assert jobs.stage(c, str(tmp_path))["loss"] == 1.0


@pytest.mark.parametrize("argv,match", [
    (["--seeds", "0,x"], "--seeds: use non-negative integers"),
    (["--seeds", ""], "--seeds: use non-negative integers"),
    (["--parallel", "0"], "0 is not a positive integer"),
    (["--lrs", "3e-4,2"], "--lrs: use learning rates in \\(0, 1\\)"),
])
def test_runner_flags_are_checked_as_they_are_parsed(argv, match):
    from absl import flags
    fv = flags.FlagValues()
    jobs.define_flags("runs/x", flag_values=fv)
    jobs.define_lrs("lrs", ["3e-4"], "rates", flag_values=fv)
    fv(["prog", "--seeds", "0,3", "--lrs", "1e-3,3e-4"])
    assert fv.seeds == ["0", "3"] and fv.lrs == ["1e-3", "3e-4"] and fv.parallel == 1
    fv.unparse_flags()
    with pytest.raises(flags.IllegalFlagValueError, match=match):
        fv(["prog"] + argv)
