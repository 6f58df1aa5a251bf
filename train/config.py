"""The experiment config: one ml-collections ConfigDict drives the trainer.

Experiments in ``experiments/NAME.py`` define ``get_config()`` by updating
``base_config()``. ``validate`` checks every field before anything is compiled and
raises ValueError with one sentence naming the field and the fix.
"""
from __future__ import annotations

import ast
import copy
import difflib
import math
import os
import re

import ml_collections

import models
from parallel import pipeline, ring_attention
from parallel.sharding import DEFAULT_RULES
from train import data, galore, objective, optim



def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = models.config_dict("transformer")  # every field at its default (Switch's too), so any can be overridden

    c.data = data.default_config()

    # objective: a key of train.objective.OBJECTIVES (pair_beta, pair_nll_weight: pair_margin's).
    # Evaluations (train.evaluate.EVALS) run every ``<name>_every`` steps (0: never) and at the last step:
    # eval_every for the eval split's loss, exact_match_every, cot_every, length_generalization_every.
    # Cadences left unset follow train.steps (ml-collections references, resolved when the config is):
    # eval_every = ceil(steps / 2), ckpt_every = ceil(steps / 4), and optim.warmup_steps = steps // 10,
    # so a short run (--config.train.steps=100) needs no other override; a value set explicitly is
    # kept, and refused when it exceeds train.steps.
    c.train = ml_collections.ConfigDict(dict(
        objective="lm", steps=400, batch_size=64, seq_len=128, loss_chunk=0, pair_beta=1.0, pair_nll_weight=0.0,
        log_every=10, eval_batches=4, ckpt_keep=3, async_checkpoint=True,
        exact_match_every=0, exact_match_n=64, exact_match_steps=(1, 2, 3, 4, 5, 6, 7, 8),
        cot_every=0, length_generalization_every=0,
        max_new_tokens=96, progress=True, profile_steps=(0, 0)))
    steps = c.train.get_ref("steps")
    c.train.eval_every = (steps + 1) // 2
    c.train.ckpt_every = (steps + 3) // 4

    # name: a key of train.optim.OPTIMIZERS; frozen: regex over parameter paths (re.fullmatch, e.g.
    # "layers/.*norm|embed"), '' freezes nothing; momentum: sgd's (0: none); decay_rate: adafactor's.
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=3e-3, end_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
        clip_norm=1.0, accum_steps=1, frozen="", momentum=0.9, decay_rate=0.8))
    c.optim.warmup_steps = steps // 10  # follows train.steps unless set
    # GaLore (optim.name="galore", train/galore.py): galore_inner names the optimizer run on the projected
    # gradients (adamw, adafactor, lion, sgd; its weight decay goes on the full weights); rank, refresh gap
    # (steps between SVDs), scale, proj ('std': the smaller side, 'left', 'right', 'full'), select (a regex
    # over parameter paths; '' projects the attention and MLP matrices), randomized_svd.
    c.optim.update(galore_inner="adamw", galore_rank=128, galore_gap=200, galore_scale=0.25, galore_proj="std",
                   galore_select="", galore_randomized_svd=False)

    # Integrity and records (train/trainer.py): nonfinite: "stop" ends the run at a non-finite loss or
    # gradient norm, "skip" leaves that step's update out and counts it (nonfinite_skipped); a resume
    # that changes data.*, model.*, seed, train.objective or optim.name is refused unless allow_config_change.
    # Preference objectives (train/orpo.py): ORPO's lambda and whether its NLL covers the prompt, DPO's beta, and
    # the token whose head column is the preference model's scalar head (3: the byte tokenizer's NUL byte).
    c.train.update(orpo_lambda=0.1, orpo_nll_on_prompt=False, dpo_beta=0.1, reward_token=3)
    c.train.nonfinite = "stop"
    c.train.allow_config_change = False
    # Starting point and adapters (train/setup.py, train/trainer.py): init_from: a previous run's workdir (its latest
    # checkpoint's parameters) or a model.safetensors file (train.compress, models.hf) that a fresh run starts from
    # (fresh optimizer state, step 0; a resumed run keeps its own checkpoint); '' for model.init. adapters: '' | 'lora'
    # | 'qlora' (models/lora.py) of rank adapter_rank on the weights whose path re.fullmatches adapter_targets (default
    # the MLP matrices), the base NF4 in blocks of adapter_block input channels for 'qlora'; only the adapters train
    # unless optim.frozen says otherwise.
    c.train.update(init_from="", adapters="", adapter_rank=8, adapter_targets=ADAPTER_TARGETS, adapter_block=64)

    # Few-shot chain-of-thought evaluation on held-out arithmetic (``train.evaluate --task cot``).
    c.cot = ml_collections.ConfigDict(dict(
        shots=0, prompting=("cot",), n=500, steps=(1, 2, 3, 4, 5, 6, 7, 8), k=1, temperature=0.7, top_k=0,
        top_p=1.0, max_new_tokens=96))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, stage=1, context=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))
    # GPipe (parallel/pipeline.py), on when mesh.stage > 1: the batch (after optim.accum_steps) splits into
    # ``microbatches``; circular_repeats V > 1 interleaves V virtual stages per device; remat: a key of
    # parallel.pipeline.REMAT ("full": keep only each stage's input per micro-batch).
    c.pipeline = ml_collections.ConfigDict(dict(microbatches=1, circular_repeats=1, remat="full"))
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator_address="", num_processes=0, process_id=-1))
    return c


def _positive(section, names):
    for name in names:
        value = getattr(section[0], name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{section[1]}.{name} is {value!r}; set it to a positive integer.")


def check_regex(field: str, value, example: str) -> None:
    """ValueError naming ``field`` unless ``value`` compiles as a regular expression over parameter paths."""
    try:
        re.compile(value)
    except (re.error, TypeError) as e:
        raise ValueError(f"{field} ({value!r}) is not a regular expression ({e}); write one over parameter paths "
                         f"such as {example}.") from None


def validate_galore(o) -> None:
    """The GaLore fields of ``optim`` (what needs parameter shapes, a rank above a matrix's smaller side
    or a selection matching nothing, is refused when the optimizer is built: train/galore.py)."""
    if o.galore_inner not in optim.GALORE_INNER:
        raise ValueError(f"optim.galore_inner is {o.galore_inner!r}; use one of {list(optim.GALORE_INNER)}.")
    for name in ("galore_rank", "galore_gap"):
        value = o[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"optim.{name} is {value!r}; set it to a positive integer.")
    if o.galore_proj not in galore.PROJ_TYPES:
        raise ValueError(f"optim.galore_proj is {o.galore_proj!r}; use one of {galore.PROJ_TYPES}.")
    if not o.galore_scale > 0:
        raise ValueError(f"optim.galore_scale is {o.galore_scale}; use a positive scale (the paper uses 0.25).")
    check_regex("optim.galore_select", o.galore_select, "'layers/w.*', or '' for the attention and MLP matrices")


PROMPTING = ("standard", "cot")


def validate_cot(c) -> None:
    """The ``cot`` section: ValueError naming the field and the fix."""
    for name in ("n", "k", "max_new_tokens"):
        value = c[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"cot.{name} is {value!r}; set it to a positive integer.")
    if not isinstance(c.shots, int) or c.shots < 0:
        raise ValueError(f"cot.shots is {c.shots!r}; use 0 (zero-shot) or a positive number of exemplars.")
    if not c.prompting or any(p not in PROMPTING for p in c.prompting):
        raise ValueError(f"cot.prompting is {tuple(c.prompting)!r}; list one or more of {PROMPTING}.")
    if not c.steps or any(not 1 <= s <= data.MAX_STEPS for s in c.steps):
        raise ValueError(f"cot.steps is {tuple(c.steps)!r}; list step counts in 1..{data.MAX_STEPS}.")
    if c.k > 1 and not c.temperature > 0:
        raise ValueError(f"cot.temperature is {c.temperature}; self-consistency (cot.k > 1) samples, so use > 0.")
    if c.top_k < 0 or not 0 < c.top_p <= 1:
        raise ValueError(f"cot.top_k ({c.top_k}) must be >= 0 and cot.top_p ({c.top_p}) in (0, 1].")


def validate_pipeline(p) -> None:
    """The ``pipeline`` section's fields (the sizes are checked against the mesh in ``train.setup``)."""
    for name in ("microbatches", "circular_repeats"):
        value = p[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"pipeline.{name} is {value!r}; set it to a positive integer.")
    if p.remat not in pipeline.REMAT:
        raise ValueError(f"pipeline.remat is {p.remat!r}; use one of {list(pipeline.REMAT)}.")


# Compute dtypes a backend cannot compile: XLA's CPU matmuls have no float16 x float16 -> float32 form
# ("The precision 'F16_F16_F32' is not supported by dot_general on CPU"). Parameters may be stored in
# float16 anywhere (they are cast to the compute dtype).
UNSUPPORTED_COMPUTE_DTYPES = {"cpu": ("float16",)}


ADAPTER_TARGETS = r"layers/(.*/)?(w_gate|w_up|w_down)"  # the MLP matrices (Switch experts included)


def validate_start(t) -> None:
    """train.init_from and train.adapters* (what the path holds is checked when a fresh run loads it)."""
    if not isinstance(t.init_from, str) or (t.init_from and not (t.init_from.endswith(".safetensors")
                                                                 or not os.path.isfile(t.init_from))):
        raise ValueError(f"train.init_from is {t.init_from!r}; use a previous run's workdir, a model.safetensors "
                         f"file, or '' to start from model.init.")
    if t.adapters not in ("", "lora", "qlora"):
        raise ValueError(f"train.adapters is {t.adapters!r}; use '' (none), 'lora' or 'qlora'.")
    for name in ("adapter_rank", "adapter_block"):
        if not isinstance(t[name], int) or t[name] <= 0:
            raise ValueError(f"train.{name} is {t[name]!r}; use a positive integer.")
    check_regex("train.adapter_targets", t.adapter_targets, repr(ADAPTER_TARGETS))


def validate_platform(config, platform: str) -> None:
    """Refuse a ``model.dtype`` that ``platform`` ('cpu', 'gpu', 'tpu') cannot compute, before compiling."""
    dtype = config.model.get("dtype")
    if dtype in UNSUPPORTED_COMPUTE_DTYPES.get(platform, ()):
        raise ValueError(f"model.dtype is {dtype!r}, which the {platform.upper()} backend cannot compute (its "
                         f"matrix products have no {dtype} form); use 'bfloat16' or 'float32' on {platform.upper()}.")


def validate(config, platform: str | None = None):
    """Check the whole config before compiling; ValueError names the field and the fix. With
    ``platform`` (the devices' platform, e.g. 'cpu'), also what that backend cannot compile.

    Returns the model family's Config built from ``config.model``."""
    model = models.get(config.model.family)
    mcfg = model.from_config(config.model)
    if platform is not None:
        validate_platform(config, platform)
    data.validate(config.data)
    t, o = config.train, config.optim
    if t.objective not in objective.OBJECTIVES:
        raise ValueError(f"train.objective is {t.objective!r}; use one of {list(objective.OBJECTIVES)}.")
    wanted, given = objective.get(t).batch_keys, tuple(data.batch_keys(config.data))
    if t.objective == "dpo" and not (config.data.source == "preference" and config.data.reference_logps):
        raise ValueError("train.objective='dpo' reads the reference model's log-probs from the data; set "
                         "data.source='preference' and data.reference_logps=True, on pairs files that "
                         "train.orpo.add_reference_logps wrote.")
    if not set(wanted) <= set(given):  # a source may yield more (e.g. soft labels) than an objective reads
        raise ValueError(f"train.objective={t.objective!r} reads the batch keys {list(wanted)} but data.source="
                         f"{config.data.source!r} yields {list(given)}; pick an objective and a source that agree.")
    if o.name not in optim.OPTIMIZERS:
        raise ValueError(f"optim.name is {o.name!r}; use one of {list(optim.OPTIMIZERS)}.")
    check_regex("optim.frozen", o.frozen, "'layers/.*norm|embed', or '' to freeze nothing")
    if o.name == "galore":
        validate_galore(o)
    _positive((t, "train"), ("steps", "batch_size", "seq_len", "log_every", "ckpt_keep", "eval_batches"))
    _positive((o, "optim"), ("accum_steps",))
    for name in sorted(k for k in t if k.endswith("_every") and k != "log_every"):  # checkpoints, evaluations
        value = getattr(t, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"train.{name} is {value!r}; use 0 to disable or a positive step count.")
        if value > t.steps:
            raise ValueError(f"train.{name} ({value}) exceeds train.steps ({t.steps}); it would never run: "
                             f"lower it or set 0.")
    if t.batch_size % o.accum_steps:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by optim.accum_steps "
                         f"({o.accum_steps}).")
    start, end = t.profile_steps
    if (start, end) != (0, 0) and not 0 < start < end <= t.steps:
        raise ValueError(f"train.profile_steps is {tuple(t.profile_steps)}; use (first, last + 1) with "
                         f"0 < first < last + 1 <= train.steps, or (0, 0) for no profile.")
    if t.loss_chunk < 0 or (t.loss_chunk and t.seq_len % t.loss_chunk):
        raise ValueError(f"train.loss_chunk ({t.loss_chunk}) must divide train.seq_len ({t.seq_len}); "
                         "use 0 for the whole sequence at once.")
    if t.nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.nonfinite is {t.nonfinite!r}; use 'stop' (end the run at a non-finite loss or "
                         f"gradient norm) or 'skip' (skip such steps and count them).")
    if t.orpo_lambda < 0 or t.dpo_beta <= 0:
        raise ValueError(f"train.orpo_lambda ({t.orpo_lambda}) must be >= 0 and train.dpo_beta ({t.dpo_beta}) > 0.")
    if not 0 <= t.reward_token < mcfg.vocab_size:
        raise ValueError(f"train.reward_token ({t.reward_token}) is outside the vocabulary 0..{mcfg.vocab_size - 1}; "
                         f"pick a token the data never uses.")
    if not 0 < o.lr < 1:
        raise ValueError(f"optim.lr is {o.lr}; use a learning rate in (0, 1).")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        raise ValueError(f"optim.warmup_steps ({o.warmup_steps}) must be in [0, train.steps={t.steps}].")
    if o.clip_norm < 0 or o.weight_decay < 0:
        raise ValueError("optim.clip_norm and optim.weight_decay must be >= 0 (0 disables).")
    validate_start(t)
    validate_cot(config.cot)
    validate_ring(config)
    if "pipeline" in config:
        validate_pipeline(config.pipeline)
    tokenizer_vocab = data.make_tokenizer(config.data).vocab_size
    if tokenizer_vocab > mcfg.vocab_size:
        raise ValueError(f"model.vocab_size ({mcfg.vocab_size}) is smaller than the tokenizer's vocabulary "
                         f"({tokenizer_vocab}); set model.vocab_size >= {tokenizer_vocab}.")
    return mcfg


def validate_ring(config) -> None:
    """``model.attention='ring'``: the mesh axes the ``seq`` rule maps to form the ring, and the balanced
    (zigzag) layout cuts train.seq_len into 2 x (ring size) chunks (the contiguous one into ring size).
    Axes of size -1 are checked once the devices are known (``ring_attention`` at trace time)."""
    if config.model.get("attention") != "ring":
        return
    axes = dict(tuple(r) for r in config.sharding.rules).get("seq")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    sizes = [config.mesh.get(a, 1) for a in axes]
    if all(isinstance(n, int) and n > 0 for n in sizes):
        ring_attention.check_length(config.train.seq_len, math.prod(sizes), config.model.get("ring_layout", "zigzag"),
                                    what="train.seq_len")


def override(config: ml_collections.ConfigDict, items) -> ml_collections.ConfigDict:
    """A copy of ``config`` with each ``section.key=value`` of ``items`` set; values are Python
    literals (``3``, ``1e-3``, ``True``, ``(1, 2)``) or else strings (``bfloat16``). Fields that follow
    others (the cadences follow train.steps) still do, unless set here."""
    config = copy.deepcopy(config)
    for item in items:
        key, equals, value = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not (equals and dot and section and field):
            raise ValueError(f"override {item!r} is not section.key=value (e.g. train.steps=100).")
        if section not in config or field not in config[section]:
            known = section in config
            near = difflib.get_close_matches(field if known else section, list((config[section] if known else config)
                                                                               .keys()), n=1)
            hint = f"; did you mean {section + '.' + near[0] if known else near[0] + '.' + field}?" if near else "."
            raise ValueError(f"override {item!r}: the config has no field {key.strip()}{hint}")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        config[section][field] = value
    return config
