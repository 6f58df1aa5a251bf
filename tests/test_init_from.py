"""train.init_from (a fresh run from a previous run's or a safetensors file's parameters) and train.adapters
(LoRA / QLoRA on the selected weights, through the trainer): first-step loss, mismatch errors, resume, freezing."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import lora
from tests import helpers
from train import config as config_lib
from train import data, evaluate, trainer
from train import objective as objective_lib


def params_of(c, workdir):
    return evaluate.load_state(c, workdir)[1].params


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny run of 2 steps: (config, workdir, its final parameters)."""
    c = helpers.tiny_train_config(steps=2, ckpt_every=2)
    c.optim.update(warmup_steps=1, lr=1e-2)
    workdir = str(tmp_path_factory.mktemp("source"))
    trainer.run(c, workdir)
    return c, workdir, jax.device_get(params_of(c, workdir))


def first_loss(c, params) -> float:
    """The objective's loss of ``params`` on the first batch a fresh run of ``c`` trains on."""
    model = models.get(c.model.family)
    mcfg = model.from_config(c.model)
    batch = next(iter(data.make_dataset(c.data, split="train", seed=c.seed, tokenizer=data.make_tokenizer(c.data),
                                        seq_len=c.train.seq_len, batch_size=c.train.batch_size)))
    out = helpers.jit(lambda p, b: objective_lib.get(c.train).loss(model, mcfg, p, b))(
        params, {k: jnp.asarray(v) for k, v in batch.items()})
    return float(out.sums["loss"] / out.weight)


def losses(workdir):
    return [r["loss"] for r in trainer.metrics.read_jsonl(workdir) if "loss" in r]


def test_init_from_a_workdir_starts_from_its_parameters(source, tmp_path):
    c0, src, params = source
    c = helpers.tiny_train_config(steps=1, ckpt_every=1, init_from=src)
    c.optim.warmup_steps = 0
    c.seed = 3  # other data order and init: the loss must still be the loaded parameters'
    trainer.run(c, str(tmp_path))
    np.testing.assert_allclose(losses(str(tmp_path))[0], first_loss(c, params), rtol=1e-5)
    with open(tmp_path / "config_history.jsonl") as f:
        assert json.loads(f.readline())["config"]["train"]["init_from"] == src


def test_mismatched_parameters_name_the_path_and_the_parameter(source, tmp_path):
    _, src, params = source
    c = helpers.tiny_train_config(steps=2, init_from=src)
    c.model.d_ff = 128
    with pytest.raises(ValueError, match=rf"train.init_from {src}: parameter layers/w_\w+ has shape"):
        trainer.run(c, str(tmp_path / "a"))
    from train import compress
    mcfg = models.get("transformer").from_config(c.model)
    compress.save(tmp_path / "pruned", params, mcfg, {"method": "none"})
    c.model.update(d_ff=64, n_layers=3)
    with pytest.raises(ValueError, match=r"model.safetensors: parameter layers/\w+ has shape \(2, "):
        c.train.init_from = str(tmp_path / "pruned" / "model.safetensors")
        trainer.run(c, str(tmp_path / "b"))


def test_qlora_trains_only_the_adapters_and_resumes_exactly(source, tmp_path):
    _, src, params = source
    c = helpers.tiny_train_config(steps=2, ckpt_every=2, init_from=src, adapters="qlora", adapter_rank=4,
                                  adapter_block=16)
    c.optim.update(warmup_steps=1, lr=1e-2)
    trainer.run(c, str(tmp_path / "b"))
    trainer.run(c, str(tmp_path / "a"), stop_after=1)
    # The resume keeps its own checkpoint: init_from (now a path that does not exist) is not read, and the
    # change is recorded like any other field's.
    c.train.init_from = str(tmp_path / "nowhere" / "model.safetensors")
    trainer.run(c, str(tmp_path / "a"))
    with open(tmp_path / "a" / "config_history.jsonl") as f:
        assert json.loads(f.readlines()[-1])["changes"]["train.init_from"] == [src, c.train.init_from]
    a, b = params_of(c, str(tmp_path / "a")), params_of(c, str(tmp_path / "b"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # the interrupted run resumed exactly
    for name in ("w_gate", "w_up", "w_down"):
        w = a["layers"][name]
        assert isinstance(w, lora.Adapter) and isinstance(w.base, lora.NF4)
        np.testing.assert_array_equal(w.base.codes, lora.nf4(params["layers"][name], 16).codes)  # base frozen
        np.testing.assert_array_equal(w.base.absmax, lora.nf4(params["layers"][name], 16).absmax)
        assert np.abs(np.asarray(w.b)).max() > 0  # the adapters trained
    for name in ("wq", "wk", "wv", "wo"):
        np.testing.assert_array_equal(a["layers"][name], params["layers"][name])
    np.testing.assert_array_equal(a["embed"], params["embed"])


@pytest.mark.parametrize("field, value, message", [
    ("adapters", "dora", "train.adapters is 'dora'"),
    ("adapter_rank", 0, "train.adapter_rank is 0"),
    ("adapter_block", -4, "train.adapter_block is -4"),
    ("adapter_targets", "layers/(", "train.adapter_targets"),
])
def test_bad_fields_are_refused(field, value, message):
    c = helpers.tiny_train_config()
    c.train[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        config_lib.validate(c)


def test_init_from_a_file_that_is_not_safetensors_is_refused(tmp_path):
    c = helpers.tiny_train_config(init_from=os.path.join(str(tmp_path), "x"))
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError, match="train.init_from"):
        config_lib.validate(c)


def test_lora_setup_adapts_params_axes_and_the_frozen_mask():
    """adapters='lora' (float base) on the attention output only: the state's parameters, their axes and the
    frozen mask (everything but a and b) follow the adapted tree; the optimizer state covers only the adapters."""
    from parallel import mesh as mesh_lib
    from train.setup import setup_training

    c = helpers.tiny_train_config(adapters="lora", adapter_rank=2, adapter_targets="layers/wo")
    s = setup_training(c, mesh_lib.make_mesh(c.mesh))
    wo, axes = s.state_shape.params["layers"]["wo"], s.state_axes.params["layers"]["wo"]
    assert isinstance(wo, lora.Adapter) and not isinstance(wo.base, lora.NF4)
    assert wo.a.shape[-1] == 2 and axes.a[-1] == "lora" and axes.b[-2] == "lora"
    assert s.frozen["layers"]["wo"].a is False and s.frozen["layers"]["wo"].base is True
    assert isinstance(s.state_shape.params["layers"]["w_up"], jax.ShapeDtypeStruct)  # not a target
    trained = sum(x.size for x in jax.tree.leaves(s.state_shape.opt_state))
    assert trained < 4 * (wo.a.size + wo.b.size) + 16  # Adam's moments of a and b (and counters), nothing else
