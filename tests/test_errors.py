"""Errors and validation as a user meets them: one line per error from the command lines (the traceback
only under --debug), no TPU probe on a CPU machine, the field the user set named, examples longer than
train.seq_len counted and refused (or cut when asked), damaged Hugging Face files named, cadences that
follow train.steps, and train.evaluate reading the workdir's recorded config."""
import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from models import hf, hf_families
from parallel import mesh as mesh_lib
from tests.helpers import random_params, tiny
from tests.helpers import tiny_train_config as tiny_config
from tests.test_trainer import ROOT
from train import cli, config as config_lib, data, trainer, workdir_config
from train.setup import setup_training

pytestmark = pytest.mark.timeout(240)
CONFIG_FILE = "tests/test_evaluate_config.py"  # tiny_config(steps=4): model.d_model 32


def command(module, *args, env=None):
    """``python -m module args`` in the repository; (exit status, stdout, the non-empty lines of stderr)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=200, env=env)
    return proc.returncode, proc.stdout, [line for line in proc.stderr.splitlines() if line.strip()]


def assert_one_error_line(status, lines, *words):
    assert status == 1, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0] and "asyncio" not in lines[0] and "Event loop" not in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained with an override the config file does not have (model.d_model 16, not 32)."""
    path = tmp_path_factory.mktemp("trained")
    config = tiny_config(steps=4)
    config.model.d_model = 16
    trainer.run(config, str(path))
    return path


# ----------------------------------------------------------------------------- the command lines

def test_bad_field_is_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ("--config", CONFIG_FILE, "--workdir", str(tmp_path), "--config.train.eval_every=9")
    status, _, lines = command("train", *args)
    assert_one_error_line(status, lines, "train.eval_every (9) exceeds train.steps (4)")
    status, _, lines = command("train", *args, "--debug")
    assert status == 1 and "Traceback (most recent call last):" in lines
    assert lines[-1].startswith("ValueError: train.eval_every (9)")
    status, _, lines = command("train", "--config", CONFIG_FILE, "--workdir", str(tmp_path), "--config.train.stepz=2")
    assert_one_error_line(status, lines, "--config.train.stepz names no field of the config (did you mean 'steps'?)")
    assert not os.listdir(tmp_path)  # nothing written


def test_corrupt_and_missing_checkpoints_are_one_line(trained, tmp_path):
    workdir = tmp_path / "corrupt"
    shutil.copytree(trained, workdir)
    arrays = workdir / "checkpoints" / "4" / "state" / "ocdbt.process_0" / "d"
    for f in arrays.iterdir():
        f.unlink()
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    status, _, lines = command("train", "--config", CONFIG_FILE, "--workdir", str(workdir), "--config.model.d_model=16")
    assert_one_error_line(status, lines, f"checkpoint {workdir}/checkpoints/4")
    status, _, lines = command("train.evaluate", "--workdir", str(workdir))
    assert_one_error_line(status, lines, f"checkpoint {workdir}/checkpoints/4", "config.json")
    assert "move" not in lines[0]  # evaluation only reads the checkpoint
    assert (workdir / "checkpoints" / "4").is_dir() and sorted(p.relative_to(workdir) for p in workdir.rglob("*")) \
        == before  # left untouched

    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(trained / "config.json", empty / "config.json")
    status, _, lines = command("train.evaluate", "--workdir", str(empty))
    assert_one_error_line(status, lines, f"{empty} has no checkpoints/ directory")


def test_evaluate_defaults_to_the_workdirs_config_without_tpu_noise(trained):
    """The workdir was trained with model.d_model=16, which the config file does not say: without --config
    the recorded config.json is used (and --config.* flags still override it); with --config the mismatch
    is one line saying to leave --config out. The command picks the CPU without libtpu's probe."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    status, out, lines = command("train.evaluate", "--workdir", str(trained), "--config.train.eval_batches=1", env=env)
    assert status == 0, lines
    assert lines == [], lines  # no "E0000 ... INVALID_ARGUMENT", no Orbax notes
    result = json.loads(out)
    assert result["step"] == 4 and np.isfinite(result["loss"])
    status, _, lines = command("train.evaluate", "--config", CONFIG_FILE, "--workdir", str(trained))
    assert_one_error_line(status, lines, "leave out --config", str(trained / "config.json"))
    assert "move" not in lines[0]


def test_one_line_messages():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl")
    assert cli.message(full) == "No space left on device: /runs/x/metrics.jsonl"
    assert cli.message(FileNotFoundError(errno.ENOENT, "No such file or directory", "a.txt")) == \
        "No such file or directory: a.txt"
    assert cli.message(ValueError("two\nlines")) == "two lines"
    raised = ValueError("flag --config=x.py: Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
                        "  File \"x.py\", line 2, in get_config\nValueError: no such variant")
    assert cli.message(raised) == "the --config file's get_config() raised ValueError: no such variant (--debug shows where)"


def test_the_cpu_is_chosen_only_where_nothing_else_is(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert cli.cpu_only_platform() is None  # the user's choice
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(cli, "_tpu_attached", lambda: True)
    assert cli.cpu_only_platform() is None  # a TPU host probes as before
    monkeypatch.setattr(cli, "_tpu_attached", lambda: False)
    monkeypatch.setattr(cli.os.path, "exists", lambda path: path == "/dev/nvidia0")
    assert cli.cpu_only_platform() is None  # a GPU host too
    monkeypatch.setattr(cli.os.path, "exists", lambda path: False)
    assert cli.cpu_only_platform() == "cpu"


# ----------------------------------------------------------------------------- validation

def test_examples_longer_than_seq_len_are_refused_or_cut(caplog):
    c = tiny_config().data
    c.max_steps = 8
    tok = data.make_tokenizer(c)
    for seq_len in (8, 64):  # at 8 every example is cut; at 64 the longest chain-of-thought answers are
        with pytest.raises(ValueError, match=rf"(\d+) of the first \d+ examples of data.source='arithmetic' are longer "
                                             rf"than train.seq_len={seq_len} tokens \(the longest needs (\d+)\); raise "
                                             rf"train.seq_len to \2 or set data.truncate=True to cut them\.") as e:
            data.make_dataset(c, tokenizer=tok, seq_len=seq_len, batch_size=8)
    count, total = (int(w) for w in str(e.value).split()[0:5:4])
    assert 0.2 < count / total < 0.4
    c.truncate = True
    with caplog.at_level("WARNING"):
        batch = next(iter(data.make_dataset(c, tokenizer=tok, seq_len=64, batch_size=8)))
    assert batch["inputs"].shape == (8, 64)
    assert any(f"{count} of the first {total} examples" in r.getMessage() and "cut to fit" in r.getMessage()
               for r in caplog.records)
    c.truncate = False
    next(iter(data.make_dataset(c, tokenizer=tok, seq_len=82, batch_size=8)))  # the longest fits
    with pytest.raises(ValueError, match=r"an example of data.source='arithmetic' is longer than train.seq_len=8"):
        data.encode_example(("Q:1+1\nA:", "+1=2.The answer is 2."), tok, 8, False, truncate=False,
                            source="arithmetic")  # past the examples checked up front, encoding refuses too


def test_trainer_refuses_too_short_seq_len_before_writing(tmp_path):
    config = tiny_config(seq_len=16)
    with pytest.raises(ValueError, match="longer than train.seq_len=16 tokens"):
        trainer.run(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_float16_compute_is_refused_on_cpu_before_compiling():
    config = tiny_config()
    config.model.dtype = "float16"
    config_lib.validate(config)  # the field itself is fine (GPUs compute float16)
    with pytest.raises(ValueError, match=r"model.dtype is 'float16', which the CPU backend cannot compute"):
        setup_training(config, mesh_lib.make_mesh(config.mesh))
    config.model.update(dtype="float32", param_dtype="float16")  # float16 storage is cast, so it is allowed
    setup_training(config, mesh_lib.make_mesh(config.mesh))


def test_small_d_model_names_the_fields_set():
    config = tiny_config()
    config.model.update(d_model=6, n_heads=4, n_kv_heads=4)
    with pytest.raises(ValueError) as e:
        config_lib.validate(config)
    assert str(e.value).startswith("model.d_model (6) / model.n_heads (4) gives a head dimension of 1, but")
    assert "make d_model a multiple of 2 * n_heads (e.g. 8)" in str(e.value)
    config.model.head_dim = 4  # set explicitly, it is the field named when wrong
    config_lib.validate(config)
    config.model.head_dim = 3
    with pytest.raises(ValueError, match=r"model.head_dim \(3\) must be even"):
        config_lib.validate(config)


def test_cadences_follow_train_steps_unless_set():
    from experiments import arith_cot

    c = arith_cot.get_config()
    t = c.train
    assert (t.eval_every, t.ckpt_every, t.exact_match_every, c.optim.warmup_steps) == (200, 100, 400, 40)
    c = config_lib.override(c, ["train.steps=100", "model.d_model=64"])  # the README's short run
    assert (c.train.eval_every, c.train.ckpt_every, c.train.exact_match_every, c.optim.warmup_steps) == (50, 25, 100, 10)
    config_lib.validate(c)
    c = config_lib.override(arith_cot.get_config(), ["train.steps=3"])
    assert (c.train.eval_every, c.train.ckpt_every, c.optim.warmup_steps) == (2, 1, 0)
    config_lib.validate(c)
    c = config_lib.override(arith_cot.get_config(), ["train.eval_every=150", "train.steps=100"])  # set: kept
    with pytest.raises(ValueError, match=r"train.eval_every \(150\) exceeds train.steps \(100\)"):
        config_lib.validate(c)
    c = config_lib.override(arith_cot.get_config(), ["optim.warmup_steps=120", "train.steps=100"])
    with pytest.raises(ValueError, match=r"optim.warmup_steps \(120\) must be in \[0, train.steps=100\]"):
        config_lib.validate(c)


def test_recorded_config_reads_back_as_the_config(tmp_path):
    config = tiny_config(steps=4)
    config.data.update(source="text", paths=["a.txt"], eval_paths=["b.txt"])
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    back = workdir_config.load(str(tmp_path))
    assert back.train.exact_match_steps == config.train.exact_match_steps  # a tuple again
    assert back.data.paths == ["a.txt"]  # a list where the base config has one
    assert back.to_dict() == config.copy_and_resolve_references().to_dict()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        workdir_config.load(str(tmp_path / "elsewhere"))


# ----------------------------------------------------------------------------- Hugging Face files

@pytest.fixture
def llama_dir(tmp_path):
    pytest.importorskip("safetensors")
    cfg = tiny()
    hf.save_checkpoint(random_params(cfg), cfg, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_truncated_safetensors_names_the_file(llama_dir):
    path = llama_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{path} is not a readable safetensors file .*truncated or damaged"):
        hf.load_checkpoint(llama_dir)


def test_wrong_shape_in_one_layer_names_tensor_file_and_shapes(llama_dir):
    from safetensors.numpy import load_file, save_file

    path = llama_dir / "model.safetensors"
    state = load_file(str(path))
    name = "model.layers.1.self_attn.k_proj.weight"
    assert state[name].shape == (16, 32)
    state[name] = np.zeros((16, 30), np.float32)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        hf.load_checkpoint(llama_dir)
    assert str(e.value) == (f"tensor {name!r} in {path} has shape (16, 30), but {llama_dir / 'config.json'} implies "
                            f"(16, 32).")


@pytest.mark.parametrize("key, value, kind", [("hidden_size", "32", "an integer"), ("rms_norm_eps", "1e-5", "a number"),
                                              ("tie_word_embeddings", "false", "true or false")])
def test_wrong_type_in_config_json_names_key_and_file(llama_dir, key, value, kind):
    path = llama_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(ValueError) as e:
        hf.load_checkpoint(llama_dir)
    assert str(e.value) == f"{path} {key} is {value!r}; it must be {kind}."


def test_wrong_type_in_mamba_config_json_is_a_value_error():
    with pytest.raises(ValueError, match=r"config.json state_size is '16'; it must be an integer"):
        hf_families.config_from_hf({"model_type": "mamba", "vocab_size": 61, "hidden_size": 16, "num_hidden_layers": 2,
                                    "state_size": "16"})


@pytest.mark.parametrize("name, overrides", [("transformer", {}), ("transformer", dict(tie_embeddings=True)),
                                             ("mamba", {}), ("mamba", dict(proj_bias=True, tie_embeddings=False))])
def test_expected_shapes_are_those_saved(name, overrides):
    cfg = tiny(name, **overrides)
    state = hf_families.to_hf_state_dict(jax.device_get(random_params(cfg)), cfg)
    assert hf_families.hf_shapes(cfg) == {k: v.shape for k, v in state.items()}
