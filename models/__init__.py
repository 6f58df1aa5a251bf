"""Model families behind one protocol, ``ModelFamily``: every family module defines all of its hooks.

``models.get(name)`` returns the module; callers use the hooks directly (no probing). The layer
stack is one pytree whose leading ``layers`` axis counts repeating units (``blocks`` runs any slice
of it with its global ``layer_ids``); aux is {'losses': {name: weighted per-token scalar},
'metrics': {name: scalar}} (plus 'cache' when decoding); every projection goes through
``layers.linear`` (weight types: ``models.weights``); ``models.capture`` taps linear inputs and
hidden states.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class ModelFamily(Protocol):
    """What a model family module provides (``models.transformer``, ``models.mamba``).

    Config: a frozen, hashable dataclass (a static jit argument).
    from_config(model_section) -> Config (unknown keys refused).
    init(cfg, rng) -> params: {'embed', 'layers' (stacked units), 'final_norm', ['head']}.
    param_axes(cfg) -> the params' structure with a tuple of logical axis names per array (weight-type
        nodes mirrored, see ``models.weights``).
    embed(params, tokens [b, s], cfg) -> x [b, s, d] in the compute dtype.
    blocks(layer_params, x, cfg, *, positions, segment_ids=None, cache=None, train=False, rng=None,
        layer_ids=None) -> (x, new cache or None, aux): the units on layer_params' leading axis, with
        global unit ids layer_ids [units] (default arange); per-unit randomness from fold_in(rng, id).
    block(p_unit, x, cfg, *, positions, segment_ids=None, cache=None, train=False, rng=None) -> (x, cache, aux):
        one unit.
    head(params, x, cfg) -> float32 logits [b, s, vocab].
    apply(params, tokens, cfg, *, positions=None, segment_ids=None, cache=None, train=False, rng=None,
          last_only=False) -> (logits, aux) = head(blocks(embed(tokens))); aux['cache'] with a cache;
        ``last_only``: the last position's logits only ([b, 1, vocab]).
    init_cache(cfg, batch, max_len, dtype=None) -> cache; cache_axes(cfg) -> its logical axes.
    decode_params(params, cfg, batch=None) -> params laid out for cached decoding of ``batch`` rows (None: any
        number; may be the identity).
    validate_mesh(cfg, mesh, rules, *, tokens=None): raise ValueError for a mesh the model cannot use.
    axis_sizes(cfg) -> {logical axis: (size, config field)} for the activation axes a mesh must divide.
    layers_per_unit(cfg) -> int: layers in one unit of the stack (metric names count layers, not units).
    matmul_params(cfg) -> int; flops_per_token(cfg, seq_len) -> float.
    """

    Config: type

    def from_config(self, model_cfg: Any) -> Any: ...
    def init(self, cfg: Any, rng: jax.Array) -> dict: ...
    def param_axes(self, cfg: Any) -> dict: ...
    def embed(self, params: dict, tokens: jax.Array, cfg: Any) -> jax.Array: ...
    def blocks(self, layer_params: Any, x: jax.Array, cfg: Any, *, positions: Any, segment_ids: Any = None,
               cache: Any = None, train: bool = False, rng: Any = None, layer_ids: Any = None) -> tuple: ...
    def block(self, p_unit: Any, x: jax.Array, cfg: Any, *, positions: Any, segment_ids: Any = None,
              cache: Any = None, train: bool = False, rng: Any = None) -> tuple: ...
    def head(self, params: dict, x: jax.Array, cfg: Any) -> jax.Array: ...
    def apply(self, params: dict, tokens: jax.Array, cfg: Any, *, positions: Any = None, segment_ids: Any = None,
              cache: Any = None, train: bool = False, rng: Any = None, last_only: bool = False) -> tuple: ...
    def init_cache(self, cfg: Any, batch: int, max_len: int, dtype: Any = None) -> dict: ...
    def cache_axes(self, cfg: Any) -> dict: ...
    def decode_params(self, params: dict, cfg: Any, batch: int | None = None) -> dict: ...
    def validate_mesh(self, cfg: Any, mesh: Any, rules: Any, *, tokens: int | None = None) -> None: ...
    def axis_sizes(self, cfg: Any) -> dict: ...
    def layers_per_unit(self, cfg: Any) -> int: ...
    def matmul_params(self, cfg: Any) -> int: ...
    def flops_per_token(self, cfg: Any, seq_len: int) -> float: ...

FAMILIES = {"transformer": "models.transformer", "mamba": "models.mamba"}

# XLA's "excess precision" lets it drop a rounding the program asks for (f32 -> bf16 -> f32) and keep the float32
# value, so bf16 activations and gradients the model stores become float32 buffers: more bytes for every
# elementwise pass over them. The programs that run a model (the train and eval steps, generation) compile with
# the rounding as written (on an H200: Mamba 370M training 1.03x tokens/s at 2k and 8k, Switch 350M 1.03x, the
# dense Transformer unchanged; in generation Mamba's prefill conv no longer writes its output twice).
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}


def get(family: str) -> ModelFamily:
    """The module implementing a model family's protocol."""
    if family not in FAMILIES:
        raise ValueError(f"model.family is {family!r}; use one of {sorted(FAMILIES)}.")
    return importlib.import_module(FAMILIES[family])


def config_dict(family: str, **values):
    """An experiment config's ``model`` section for ``family``: every field of the family's Config at its default,
    then ``values``; so a command line can override any field (ml-collections refuses a key the section lacks)."""
    import ml_collections

    fields = {f.name: f.default for f in dataclasses.fields(get(family).Config)}
    _check_fields(fields, values, family)
    return ml_collections.ConfigDict({"family": family, **fields, **values})


def _check_fields(fields, keys, family: str) -> None:
    """ValueError naming the first of ``keys`` that is not one of the Config's ``fields``."""
    unknown = sorted(set(keys) - set(fields))
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not a {family} field; known fields: {sorted(fields)}.")


def config_from(config_cls, model_cfg, family: str):
    """``config_cls`` from a mapping (an experiment config's ``model`` section, whose ``family`` key
    is ignored); a key that is not a field is refused, naming it and the known fields."""
    values = {k: v for k, v in dict(model_cfg).items() if k != "family"}
    _check_fields({f.name for f in dataclasses.fields(config_cls)}, values, family)
    return config_cls(**values)
