"""Hugging Face checkpoint directories: load and save, parity with transformers both ways, refusals, tokenizers."""
import json

import numpy as np
import pytest

from models import generate, hf, tokenizers
from models import transformer as T
from tests.helpers import perturb_norms, rel_err, tiny
from tests.helpers import tokens as random_tokens

pytestmark = pytest.mark.timeout(120)

HF_TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def random_params(cfg, seed=0):
    """`tests.helpers.random_params` with an eager init: these tests use many configs, each used once or
    twice, and eager ops compile nothing per config."""
    import jax

    return perturb_norms(T.init(cfg, jax.random.PRNGKey(seed)), T.param_axes(cfg), seed)


def hf_model(tie: bool, seed: int = 0, rope_theta: float = 500.0):
    """A random tiny LlamaForCausalLM: N(0, 1/fan_in) weights (as ``T.init``) and random norm scales."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    conf = transformers.LlamaConfig(**HF_TINY, rope_theta=rope_theta, tie_word_embeddings=tie,
                                    attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(conf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is not listed separately
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in name:
                p.normal_(0.0, p.shape[1] ** -0.5 if tie else 1.0)
            else:  # nn.Linear weight [out, in]
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def torch_logits(model, toks):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(toks, np.int64))).logits.float().numpy()


def loom_logits(params, cfg, toks):
    return np.asarray(T.apply(params, np.asarray(toks), cfg)[0])


def cut_at(row, stop):
    return row[:row.index(stop) + 1] if stop in row else row


def assert_trees_equal(a, b):
    import jax

    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- Hugging Face -> loom

@pytest.mark.parametrize("tie,shard", [(False, False), (True, False), (False, True)])
def test_load_hugging_face_checkpoint_matches_logits_and_greedy_tokens(tmp_path, tie, shard):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    model = hf_model(tie, seed=3)
    model.save_pretrained(tmp_path, safe_serialization=True, **({"max_shard_size": "8KB"} if shard else {}))
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3
        assert not (tmp_path / "model.safetensors").exists()
    params, cfg, tok = hf.load_checkpoint(tmp_path)
    assert tok is None
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (
        4, 2, 8, 500.0, 1e-5, tie)
    assert cfg.dtype == "float32" and ("head" in params) == (not tie)

    toks = random_tokens(cfg.vocab_size, b=2, s=24, seed=5)
    theirs = torch_logits(model, toks)
    assert np.std(theirs) > 0.5  # non-degenerate: attention far from uniform
    assert rel_err(loom_logits(params, cfg, toks), theirs) <= 1e-5

    prompts = np.asarray(random_tokens(cfg.vocab_size, b=2, s=7, seed=6))
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=6, min_length=0, min_new_tokens=None,
                                        eos_token_id=2, pad_token_id=0, bos_token_id=1)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompts.astype(np.int64)), attention_mask=torch.ones(prompts.shape,
                             dtype=torch.long), generation_config=gen)
    expected = [cut_at(row, 2) for row in out[:, prompts.shape[1]:].tolist()]
    ours = generate.greedy(T, params, cfg, prompts.tolist(), max_new_tokens=6, stop_token=2, include_stop=True)
    assert ours == expected


# ----------------------------------------------------------------------------- loom -> Hugging Face

@pytest.mark.parametrize("tie,shard", [(False, False), (True, True)])
def test_saved_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, tie, shard):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = tiny(rope_theta=500.0, tie_embeddings=tie, n_layers=3)
    params = random_params(cfg, seed=4)
    hf.save_checkpoint(params, cfg, tmp_path / "ckpt", max_shard_bytes=8192 if shard else None)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    if shard:
        shards = [f for f in files if f.startswith("model-")]
        assert "model.safetensors.index.json" in files and len(shards) > 2
        assert shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
        assert all((tmp_path / "ckpt" / f).stat().st_size <= 8192 + 1024 for f in shards)  # + header
    else:
        assert files == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind

    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert model.config.tie_word_embeddings == tie and model.config.num_key_value_heads == 2
    toks = random_tokens(cfg.vocab_size, b=2, s=24, seed=5)
    theirs = torch_logits(model, toks)
    assert np.std(theirs) > 0.5
    assert rel_err(loom_logits(params, cfg, toks), theirs) <= 1e-5


# ----------------------------------------------------------------------------- loom -> loom

@pytest.mark.parametrize("shard", [None, 4096])
def test_round_trip_is_bitwise(tmp_path, shard):
    pytest.importorskip("safetensors")
    for tie in (False, True):
        cfg = tiny(tie_embeddings=tie, rope_theta=123.0, norm_eps=1e-6)
        params = random_params(cfg, seed=int(tie))
        hf.save_checkpoint(params, cfg, tmp_path / f"c{tie}", max_shard_bytes=shard)
        back, cfg2, tok = hf.load_checkpoint(tmp_path / f"c{tie}")
        assert cfg2 == cfg and tok is None
        assert_trees_equal(back, params)


def test_overwrite_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    from safetensors import numpy as st_numpy

    cfg = tiny()
    first, second = random_params(cfg, seed=0), random_params(cfg, seed=1)
    ckpt = tmp_path / "ckpt"
    hf.save_checkpoint(first, cfg, ckpt, max_shard_bytes=4096)
    (ckpt / "tokenizer_config.json").write_text("{}")

    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    real_save = st_numpy.save_file
    monkeypatch.setattr(st_numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        hf.save_checkpoint(second, cfg, ckpt, max_shard_bytes=4096)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert_trees_equal(hf.load_checkpoint(ckpt)[0], first)

    hf.save_checkpoint(second, cfg, ckpt)  # unsharded now: the old shards and index must go
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert_trees_equal(hf.load_checkpoint(ckpt)[0], second)


# ----------------------------------------------------------------------------- bfloat16

def test_bfloat16_checkpoints_load_as_their_rounding(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    model = hf_model(tie=False, seed=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="np") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    params, cfg, _ = hf.load_checkpoint(tmp_path / "hf")
    rounded = hf.from_hf_state_dict({k: v.float().numpy() for k, v in model.state_dict().items()}, cfg)
    assert_trees_equal(params, rounded)
    assert params["layers"]["wq"].dtype == np.float32

    # loom -> bfloat16 file -> loom gives the bfloat16 rounding of the float32 params.
    import ml_dtypes

    cfg = tiny()
    params = random_params(cfg)
    hf.save_checkpoint(params, cfg, tmp_path / "loom", dtype="bfloat16")
    assert json.loads((tmp_path / "loom" / "config.json").read_text())["dtype"] == "bfloat16"
    back, _, _ = hf.load_checkpoint(tmp_path / "loom")
    want = {k: v for k, v in hf.to_hf_state_dict(params, cfg).items()}
    want = hf.from_hf_state_dict({k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in want.items()}, cfg)
    assert_trees_equal(back, want)
    back16, cfg16, _ = hf.load_checkpoint(tmp_path / "loom", param_dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16" and back16["embed"].dtype == ml_dtypes.bfloat16


# ----------------------------------------------------------------------------- refusals

def llama_json(**changes):
    return {**hf.llama_config(tiny()), **changes}


@pytest.mark.parametrize("changes,words", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type is 'gpt2'"),
    (dict(architectures=["Qwen2ForCausalLM"]), "architectures holds 'Qwen2ForCausalLM'"),
    (dict(attention_bias=True), "attention_bias is true"),
    (dict(mlp_bias=True), "mlp_bias is true"),
    (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4096), "sliding_window is 4096"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
     "rope_parameters has rope type 'llama3'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling has rope type 'linear'"),
    (dict(hidden_act="gelu"), "hidden_act is 'gelu'"),
])
def test_config_refusals_name_the_field(changes, words):
    with pytest.raises(ValueError, match=words):
        hf.config_from_hf(llama_json(**changes))


def test_config_mapping_reads_transformers_5_and_older_layouts():
    base = {k: v for k, v in llama_json().items() if k not in ("rope_theta", "head_dim", "num_key_value_heads")}
    assert hf.config_from_hf(base).rope_theta == 10000.0 and hf.config_from_hf(base).n_kv_heads == 4
    new = hf.config_from_hf({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    old = hf.config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None})
    assert new == old and new.rope_theta == 5e5 and new.head_dim == 8
    mistral = hf.config_from_hf({**base, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
                                 "sliding_window": None, "head_dim": 16, "num_key_value_heads": 1}, remat="none")
    assert (mistral.head_dim, mistral.n_kv_heads, mistral.remat) == (16, 1, "none")


def test_load_refuses_missing_shard_missing_tensor_and_bias(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file, save_file

    cfg = tiny()
    params = random_params(cfg)
    hf.save_checkpoint(params, cfg, tmp_path / "sharded", max_shard_bytes=4096)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    second = sorted(set(json.loads(index.read_text())["weight_map"].values()))[1]
    (tmp_path / "sharded" / second).unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing shard\(s\) \['{second}'\] listed in"):
        hf.load_checkpoint(tmp_path / "sharded")

    hf.save_checkpoint(params, cfg, tmp_path / "single")
    path = tmp_path / "single" / "model.safetensors"
    state = load_file(str(path))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"):
        hf.load_checkpoint(tmp_path / "single")

    state["model.layers.1.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj.bias' that a Llama layer does not use"):
        hf.load_checkpoint(tmp_path / "single")

    config = json.loads((tmp_path / "single" / "config.json").read_text())
    (tmp_path / "single" / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias is true"):
        hf.load_checkpoint(tmp_path / "single")

    (index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../model.safetensors"}})))
    with pytest.raises(ValueError, match="plain file names"):
        hf.load_checkpoint(tmp_path / "sharded")


def test_load_refuses_shapes_that_disagree_with_config(tmp_path):
    pytest.importorskip("safetensors")
    cfg = tiny()
    hf.save_checkpoint(random_params(cfg), cfg, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight' in \S+"
                                         r"model\.safetensors has shape \((48, 32|32, 48)\), but \S+config\.json "
                                         r"implies \((40, 32|32, 40)\)"):
        hf.load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- tokenizers

def train_tokenizer_json(path):
    """A tiny byte-level BPE trained offline with the ``tokenizers`` library; ids 0, 1, 2 = <pad>, <s>, </s>."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)], trainer)
    tok.save(str(path))
    return tok


def test_tokenizer_json_is_picked_up_and_round_trips(tmp_path):
    pytest.importorskip("safetensors")
    trained = train_tokenizer_json(tmp_path / "tokenizer.json")
    cfg = tiny(vocab_size=trained.get_vocab_size())
    hf.save_checkpoint(random_params(cfg), cfg, tmp_path)  # carries tokenizer.json over
    _, _, tok = hf.load_checkpoint(tmp_path)
    assert isinstance(tok, tokenizers.HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, cfg.vocab_size)
    text = "the lazy fox jumps 12+3=15, naïve → done."
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids) and tok.bos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *tok.encode("the dog"), tok.eos_id, *tok.encode("more")]) == "the dog"


def test_sentencepiece_model_is_picked_up_and_no_tokenizer_gives_none(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    pytest.importorskip("safetensors")
    from models.tokenizers import SentencePieceTokenizer

    cfg = tiny()
    hf.save_checkpoint(random_params(cfg), cfg, tmp_path / "ckpt")
    assert hf.load_checkpoint(tmp_path / "ckpt")[2] is None
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(300)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "ckpt" / "tokenizer"),
                                             vocab_size=60, model_type="bpe", minloglevel=2)
    tok = hf.load_checkpoint(tmp_path / "ckpt")[2]
    assert isinstance(tok, SentencePieceTokenizer) and tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
