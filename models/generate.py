"""Decoding with a preallocated cache (greedy and sampled), for any model family behind the protocol.

The loop uses only the protocol: ``model.init_cache(cfg, batch, max_len)``, its logical axes
``model.cache_axes(cfg)``, ``model.decode_params(params, cfg, batch=...)`` and
``model.apply(params, tokens, cfg, positions=..., segment_ids=..., cache=..., last_only=...)``, which
returns ``(logits, aux)`` with the updated cache in ``aux['cache']``. It never reads the
cache itself, so the cache may be any pytree.

A batch of prompts of different lengths is left-padded to one length P, so the cache's
single write index is the same for every row:

    slot       0   1   2   3   4   5   6   7 | 8 ...
    row 0      .   .   .   .   a   b   c   d | generated
    row 1      .   .   .   .   .   .   e   f | generated

Padding slots carry segment id 0 and real tokens segment 1, and the model attends only
within equal segments, so padding is never read by a real token. Positions count from 0 at
each prompt's first real token (RoPE sees the same positions as for the unpadded prompt).

One jitted function runs everything: the prefill (one ``apply`` over the padded prompt,
whose last column holds every row's last real token; only that column's logits are computed) and the decode loop (a
``lax.while_loop`` of one-token ``apply`` calls on fixed ``[batch, 1]`` shapes that stops
early once every row has emitted the stop token). ``cfg`` and the model are static; the
number of new tokens, the stop token, the pad id, the key and the sampling settings
(temperature, top-k, top-p) are traced, so none of them causes a recompilation: greedy
decoding is the same compiled loop at temperature 0 (a ``lax.cond`` skips the sampling work).

The family's ``decode_params(params, cfg, batch=rows)`` is applied once, inside the compiled function but
outside the loop, to give the weights a layout for decoding (the Transformer unstacks its layers
and fuses the QKV and gate/up matrices, so no step slices or copies a weight; Mamba unstacks its
layers and fuses in_x/in_z).

Compilations happen once per (batch, P, max_len, sharding layout). P is the longest prompt
rounded up by ``bucket`` (a power of two from 8 to 256, then a multiple of 256), so prompts
of nearby lengths share a compilation at the cost of at most 2x prefill work on short prompts
and fewer than 256 padding tokens on long ones. The default ``max_len`` is
``P + bucket(max_new_tokens)`` for the same reason.

**Sampling.** ``filter_logits`` scales float32 logits by 1/temperature, keeps the top-k
(tokens tied with the k-th are kept too), then the nucleus: the smallest prefix of the
remaining tokens, by decreasing probability, whose mass renormalised over the top-k set is
>= top_p (tokens tied with the last one kept too; the top token always stays; top_p >= 1 keeps
the whole top-k set). Both cut-offs come from one sort over the vocabulary, so ``top_k`` is a
traced value like the others. Row r's token number s (s = 0 from the prefill) is drawn
with the key ``fold_in(fold_in(rng, s), r)``: the same rng gives the same tokens; a prompt
at index r gets the same tokens whatever the other prompts of the batch (and however many),
up to float rounding of its logits at another padded shape; equal prompts at different
indices get independent samples.

**Recurrent families (the state hook).** A family such as Mamba plugs in by keeping its
per-row recurrent state in the pytree that ``init_cache(cfg, batch, max_len)`` returns
(``max_len`` may be ignored) and returning the advanced state in ``aux['cache']`` from
``apply(..., cache=cache)``, which is called once with the whole padded prompt [batch, P]
and then with one token [batch, 1] per step. Its ``apply`` must leave a row's state unchanged
across tokens with segment id 0 (the left padding), so that the state after the prefill
equals that of the unpadded prompt; it may ignore ``positions``. Logits [batch, seq, vocab]
come back as for the Transformer. Its ``cache_axes`` names the state's axes (rows on ``batch``)
and its ``decode_params`` may be the identity (Mamba's unstacks its layers, as the Transformer's).

**Sharded decoding.** Under ``parallel.sharding.activate(mesh, rules)`` with parameters
placed by ``tree_shardings(model.param_axes(cfg), mesh, rules)``, the same calls run
partitioned: the cache is created inside the jitted function and constrained to logical
axes (``model.cache_axes(cfg)``: for the Transformer's KV cache, rows over ``batch`` and kv
heads over ``kv_heads``), and the batch is filled up to a
multiple of the mesh axes that ``batch`` maps to with copies of the first prompt, which
share its keys and are dropped from the result.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from models import COMPILER_OPTIONS
from parallel import sharding

_NO_STOP = -1  # a token id no model emits: sampled ids are never negative


def bucket(n: int) -> int:
    """Round a length up: the next power of two (at least 8) up to 256, then a multiple of 256."""
    if n <= 256:
        return max(8, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // 256) * 256


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """Left-pad prompts to ``length``: int32 numpy (tokens, positions, segment_ids), each [batch, length].

    Padding slots get token ``pad_id``, position 0 and segment id 0; a prompt's real tokens
    get positions 0..len-1 and segment id 1.
    """
    b = len(prompts)
    tokens = np.full((b, length), pad_id, np.int32)
    positions = np.zeros((b, length), np.int32)
    segment_ids = np.zeros((b, length), np.int32)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[row, length - n:] = prompt
        positions[row, length - n:] = np.arange(n)
        segment_ids[row, length - n:] = 1
    return tokens, positions, segment_ids


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
    """Temperature, then top-k, then top-p: logits [..., V] -> float32 [..., V], -inf where cut.

    temperature > 0; top_k = 0 keeps every token, else the set K of the k largest and every token
    tied with the k-th; top_p in (0, 1] then keeps the smallest set of largest tokens of K whose
    probability renormalised over K is >= top_p, and every token tied with the last of them: at
    least the top token, all of K when top_p >= 1. All three may be traced scalars.
    """
    z = jnp.asarray(logits, jnp.float32) / temperature
    v = z.shape[-1]
    desc = -jnp.sort(-z, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, desc.shape[:-1])[..., None], axis=-1)
    in_k = desc >= kth  # the top-k set with its ties: sorted, so a prefix
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the larger tokens in sorted order
    n = jnp.maximum(jnp.sum(in_k & ((mass_before < top_p) | (top_p >= 1)), axis=-1), 1)  # tokens kept
    threshold = jnp.take_along_axis(desc, (n - 1)[..., None], axis=-1)
    return jnp.where(z >= threshold, z, -jnp.inf)


def sample_logits(keys, logits, temperature, top_k=0, top_p=1.0) -> jax.Array:
    """One token per row: keys [batch] (one PRNG key each), logits [batch, V] -> int32 [batch].

    Temperature 0 is the argmax (without running the filters); otherwise a draw from
    softmax(``filter_logits(...)``).
    """
    def draw(logits):
        filtered = filter_logits(logits, temperature, top_k, top_p)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    def argmax(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, argmax, logits)


def _constrain_cache(model, cfg, cache):
    """Place the cache by the logical names of ``model.cache_axes(cfg)``."""
    return jax.tree.map(lambda names, x: sharding.constrain(x, names), model.cache_axes(cfg), cache,
                        is_leaf=lambda n: isinstance(n, tuple))


def _key_data(rng) -> jax.Array:
    """A raw uint32 key from an int seed, a raw key or a typed key (one compilation for all)."""
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.PRNGKey(rng)
    if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def decode_padded(model, params, cfg, tokens, positions, segment_ids, cache, max_new_tokens: int,
                  stop_token: int = _NO_STOP, pad_id: int = 0, *, width: int, rng=None, temperature=0.0,
                  top_k=0, top_p=1.0, rows=None):
    """Decoding of a left-padded batch; the compiled core of ``sample`` and ``greedy``.

    tokens, positions, segment_ids: int [batch, P] as made by ``left_pad`` (the last column
    must hold every row's last real token); cache: an empty cache from ``model.init_cache``
    with room for P + max_new_tokens - 1 tokens, donated (its buffers are invalid after the
    call), or None to create one of P + width inside the compiled function (placed sharded
    when a layout is active); max_new_tokens
    in [1, width]; stop_token: -1 for none; rng: a PRNG key (None: key 0); rows: int [batch],
    the index folded into each row's keys (default 0..batch-1). Only the shapes, ``cfg``, the
    model, ``width`` and the active sharding layout select a compilation.

    Returns (generated int32 [batch, width], steps, cache): each row's new tokens, its stop
    token included, then ``pad_id`` once it has stopped and from ``steps`` on, where steps is
    the number of tokens the loop produced (max_new_tokens, or fewer once every row has
    stopped); the cache holds the prompt and every generated token but the last.
    """
    if not 1 <= int(max_new_tokens) <= width:
        raise ValueError(f"max_new_tokens is {max_new_tokens}; it must lie in [1, width={width}].")
    b = np.shape(tokens)[0]
    arrays = [jnp.asarray(a, jnp.int32) for a in (tokens, positions, segment_ids,
                                                   np.arange(b) if rows is None else rows)]
    ints = (jnp.int32(a) for a in (max_new_tokens, stop_token, pad_id, top_k))
    floats = (jnp.float32(a) for a in (temperature, top_p))
    key = _key_data(0 if rng is None else rng)
    # compiler options are for a top-level jit only: inside another trace (a traced input) the plain one
    traced = any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((params, cache, key, *arrays)))
    return (_decode_traced if traced else _decode)(model, params, cfg, *arrays, cache, key, *ints, *floats,
                                                   width=width, layout=sharding.active())


def _decode_loop(model, params, cfg, tokens, positions, segment_ids, rows, cache, rng, max_new_tokens, stop_token,
                 pad_id, top_k, temperature, top_p, *, width, layout):
    del layout  # the active (mesh, rules) of ``constrain``: part of the compilation key
    b, p = tokens.shape
    params = model.decode_params(params, cfg, batch=b)  # a layout for decoding b rows, made once outside the loop
    cache = _constrain_cache(model, cfg, model.init_cache(cfg, b, p + width) if cache is None else cache)

    def pick(step, logits):  # logits [b, V] -> int32 [b], row r keyed by fold_in(fold_in(rng, step), r)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(rng, step), rows)
        return sample_logits(keys, logits, temperature, top_k, top_p)

    logits, aux = model.apply(params, tokens, cfg, positions=positions, segment_ids=segment_ids, cache=cache,
                              last_only=True)
    first = pick(0, logits[:, -1])
    generated = jnp.full((b, width), pad_id, jnp.int32).at[:, 0].set(first)
    ones = jnp.ones((b, 1), jnp.int32)

    def keep_going(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(carry):
        step, last, cache, generated, done, pos = carry
        logits, aux = model.apply(params, last[:, None], cfg, positions=pos[:, None], segment_ids=ones,
                                  cache=cache)
        nxt = jnp.where(done, pad_id, pick(step, logits[:, 0]))
        generated = jax.lax.dynamic_update_slice(generated, nxt[:, None], (0, step))
        cache = _constrain_cache(model, cfg, aux["cache"])
        return step + 1, nxt, cache, generated, done | (nxt == stop_token), pos + 1

    carry = (jnp.int32(1), first, _constrain_cache(model, cfg, aux["cache"]), generated, first == stop_token,
             positions[:, -1] + 1)
    steps, _, cache, generated, _, _ = jax.lax.while_loop(keep_going, decode_one, carry)
    return generated, steps, cache


_JIT = dict(static_argnames=("model", "cfg", "width", "layout"), donate_argnames=("cache",))
_decode = jax.jit(_decode_loop, compiler_options=COMPILER_OPTIONS, **_JIT)  # as the train step is compiled
_decode_traced = jax.jit(_decode_loop, **_JIT)  # called inside another jit, which sets the compiler options


def _check_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
    prompts = [] if isinstance(prompts, (str, bytes)) else list(prompts)
    if not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists.")
    arrays = []
    for i, prompt in enumerate(prompts):
        a = np.asarray(prompt)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"prompt {i} must be a non-empty list of integer token ids.")
        bad = a[(a < 0) | (a >= vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i} holds token id {int(bad[0])}, outside the vocabulary [0, {vocab_size}).")
        arrays.append(a.astype(np.int32))
    return arrays


def sample(model, params, cfg, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, rng,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_token: int | None = None,
           pad_id: int = 0, max_len: int | None = None, include_stop: bool = False) -> list[list[int]]:
    """Sampled continuation of each prompt, computed as one batch; temperature 0 is greedy.

    model: a protocol module (``models.get('transformer')``); cfg: its hashable Config.
    rng: a PRNG key or int seed (may be None at temperature 0). Each row draws from
    ``filter_logits(logits, temperature, top_k, top_p)`` until it emits ``stop_token`` or has
    ``max_new_tokens`` tokens; the stop token is left out of the returned ids unless
    ``include_stop``. ``pad_id`` fills padding slots (never attended). Prompts are left-padded
    to P = ``bucket(longest prompt)``. ``max_len`` sizes the cache, by default
    ``P + bucket(max_new_tokens)``; when given, P is capped at ``max_len - max_new_tokens``
    (and refused if the longest prompt does not fit). Same rng, same tokens (see the module
    docstring for what holds across batches).

    Raises ValueError for empty prompts, token ids outside [0, vocab_size), prompts that do
    not leave room for ``max_new_tokens`` within ``max_len``, and sampling settings out of range.
    """
    vocab = cfg.vocab_size
    arrays = _check_prompts(prompts, vocab)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens is {max_new_tokens!r}; set it to a positive integer.")
    if stop_token is not None and not 0 <= stop_token < vocab:
        raise ValueError(f"stop_token is {stop_token}; use None or an id in [0, {vocab}).")
    if not 0 <= pad_id < vocab:
        raise ValueError(f"pad_id is {pad_id}; use an id in [0, {vocab}).")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature is {temperature}; use 0 (greedy) or a positive number.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k is {top_k!r}; use 0 (off) or a positive integer.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p is {top_p}; use a value in (0, 1] (1 is off).")
    if rng is None and temperature > 0:
        raise ValueError("rng is None but temperature > 0; pass a PRNG key (or an int seed) to sample.")
    longest = max(len(a) for a in arrays)
    if max_len is None:
        length = bucket(longest)
        max_len = length + bucket(max_new_tokens)
    else:
        if longest + max_new_tokens > max_len:
            raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
                             f"exceeds max_len ({max_len}); raise max_len or shorten the request.")
        length = min(bucket(longest), max_len - max_new_tokens)
    n = len(arrays)
    extra = -n % sharding.batch_multiple()  # copies of prompt 0, keyed like row 0 so they stop with it
    tokens, positions, segment_ids = left_pad(arrays + [arrays[0]] * extra, length, pad_id)
    generated, _, _ = decode_padded(
        model, params, cfg, tokens, positions, segment_ids, None, max_new_tokens,
        _NO_STOP if stop_token is None else stop_token, pad_id, width=max_len - length, rng=rng,
        temperature=temperature, top_k=top_k, top_p=top_p, rows=np.r_[np.arange(n), np.zeros(extra, int)])
    if not generated.is_fully_addressable:  # several processes: each holds its rows' shards
        generated = multihost_utils.process_allgather(generated, tiled=True)
    generated = np.asarray(generated)[:n, :max_new_tokens]
    out = []
    for row in generated.tolist():
        if stop_token is not None and stop_token in row:
            row = row[:row.index(stop_token) + int(include_stop)]
        out.append(row)
    return out


def greedy(model, params, cfg, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           stop_token: int | None = None, pad_id: int = 0, max_len: int | None = None,
           include_stop: bool = False) -> list[list[int]]:
    """Greedy continuation of each prompt: ``sample`` at temperature 0 (same arguments, same loop)."""
    return sample(model, params, cfg, prompts, max_new_tokens=max_new_tokens, rng=None, temperature=0.0,
                  stop_token=stop_token, pad_id=pad_id, max_len=max_len, include_stop=include_stop)


def complete(model, params, cfg, tokenizer, texts: Sequence[str], *, max_new_tokens: int,
             stop_strings: Sequence[str] = (), rng=None, **sampling) -> list[str]:
    """Text in, text out: each text's completion, cut before the first stop string.

    Each prompt is ``[tokenizer.bos_id] + tokenizer.encode(text)``; generation stops at
    ``tokenizer.eos_id`` (left out) or after ``max_new_tokens`` tokens, pads with
    ``tokenizer.pad_id``, and is decoded. Stop strings are applied afterwards to the decoded
    text (the earliest match of any of them ends it; the stop string itself is dropped), so a
    row keeps generating up to eos or ``max_new_tokens`` after one appears. rng=None decodes
    greedily; with a key, ``sampling`` (temperature, top_k, top_p, max_len) goes to ``sample``
    (temperature 1 by default).
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("texts must be a non-empty list of strings.")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ValueError(f"text {i} is {text!r}; every text must be a non-empty string.")
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(f"stop_strings {stop_strings!r} must all be non-empty strings.")
    if rng is None:
        sampling = {**sampling, "temperature": sampling.get("temperature", 0.0)}
    prompts = [[tokenizer.bos_id] + list(tokenizer.encode(t)) for t in texts]
    ids = sample(model, params, cfg, prompts, max_new_tokens=max_new_tokens, rng=rng,
                 stop_token=tokenizer.eos_id, pad_id=tokenizer.pad_id, **sampling)
    out = []
    for row in ids:
        text = tokenizer.decode(row)
        cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
        out.append(text[:cut])
    return out
