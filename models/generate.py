"""Greedy decoding with a preallocated cache, for any model family behind the protocol.

The loop uses only the protocol: ``model.init_cache(cfg, batch, max_len)`` and
``model.apply(params, tokens, cfg, positions=..., segment_ids=..., cache=...)``, which
returns ``(logits, aux)`` with the updated cache in ``aux['cache']``. The Transformer's
cache is a KV cache; a recurrent family (Mamba) passes its state through the same calls.

A batch of prompts of different lengths is left-padded to one length P, so the cache's
single write index is the same for every row:

    slot       0   1   2   3   4   5   6   7 | 8 ...
    row 0      .   .   .   .   a   b   c   d | generated
    row 1      .   .   .   .   .   .   e   f | generated

Padding slots carry segment id 0 and real tokens segment 1, and the model attends only
within equal segments, so padding is never read by a real token. Positions count from 0 at
each prompt's first real token (RoPE sees the same positions as for the unpadded prompt).

One jitted function runs everything: the prefill (one ``apply`` over the padded prompt,
whose last column holds every row's last real token) and the decode loop (a
``lax.while_loop`` of one-token ``apply`` calls on fixed ``[batch, 1]`` shapes that stops
early once every row has emitted the stop token). ``cfg`` and the model are static; the
number of new tokens, the stop token and the pad id are traced, so they never cause a
recompilation. The cache is donated and comes back updated.

Compilations happen once per (batch, P, max_len). P is the longest prompt rounded up by
``bucket`` (a power of two from 8 to 256, then a multiple of 256), so prompts of nearby
lengths share a compilation at the cost of at most 2x prefill work on short prompts and
fewer than 256 padding tokens on long ones. The default ``max_len`` is
``P + bucket(max_new_tokens)`` for the same reason.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from parallel import sharding

_NO_STOP = -1  # a token id no model emits: argmax is never negative


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


def greedy_padded(model, params, cfg, tokens, positions, segment_ids, cache, max_new_tokens: int,
                  stop_token: int = _NO_STOP, pad_id: int = 0, *, width: int):
    """Greedy decoding of a left-padded batch; the compiled core of ``greedy``.

    tokens, positions, segment_ids: int [batch, P] as made by ``left_pad`` (the last column
    must hold every row's last real token); cache: an empty cache from ``model.init_cache``
    with room for P + max_new_tokens - 1 tokens, donated (its buffers are invalid after the
    call); max_new_tokens in [1, width]; stop_token: -1 for none. Only the shapes, ``cfg``,
    the model and ``width`` select a compilation.

    Returns (generated int32 [batch, width], steps, cache): each row's new tokens, its stop
    token included, then ``pad_id`` once it has stopped and from ``steps`` on, where steps is
    the number of tokens the loop produced (max_new_tokens, or fewer once every row has
    stopped); the cache holds the prompt and every generated token but the last.
    """
    if not 1 <= int(max_new_tokens) <= width:
        raise ValueError(f"max_new_tokens is {max_new_tokens}; it must lie in [1, width={width}].")
    arrays = (jnp.asarray(a, jnp.int32) for a in (tokens, positions, segment_ids))
    scalars = (jnp.int32(a) for a in (max_new_tokens, stop_token, pad_id))
    return _greedy_padded(model, params, cfg, *arrays, cache, *scalars, width=width, layout=sharding.active())


@functools.partial(jax.jit, static_argnames=("model", "cfg", "width", "layout"), donate_argnames=("cache",))
def _greedy_padded(model, params, cfg, tokens, positions, segment_ids, cache, max_new_tokens, stop_token, pad_id,
                   *, width, layout):
    del layout  # the active (mesh, rules) of ``constrain``: part of the compilation key
    b = tokens.shape[0]
    logits, aux = model.apply(params, tokens, cfg, positions=positions, segment_ids=segment_ids, cache=cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    generated = jnp.full((b, width), pad_id, jnp.int32).at[:, 0].set(first)
    ones = jnp.ones((b, 1), jnp.int32)

    def keep_going(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(carry):
        step, last, cache, generated, done, pos = carry
        logits, aux = model.apply(params, last[:, None], cfg, positions=pos[:, None], segment_ids=ones,
                                  cache=cache)
        nxt = jnp.where(done, pad_id, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
        generated = jax.lax.dynamic_update_slice(generated, nxt[:, None], (0, step))
        return step + 1, nxt, aux["cache"], generated, done | (nxt == stop_token), pos + 1

    carry = (jnp.int32(1), first, aux["cache"], generated, first == stop_token, positions[:, -1] + 1)
    steps, _, cache, generated, _, _ = jax.lax.while_loop(keep_going, decode_one, carry)
    return generated, steps, cache


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


def greedy(model, params, cfg, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           stop_token: int | None = None, pad_id: int = 0, max_len: int | None = None,
           include_stop: bool = False) -> list[list[int]]:
    """Greedy continuation of each prompt, computed as one batch.

    model: a protocol module (``models.get('transformer')``); cfg: its hashable Config.
    Each row generates until it emits ``stop_token`` or has ``max_new_tokens`` tokens. The
    stop token is left out of the returned ids unless ``include_stop``. ``pad_id`` fills
    padding slots (never attended). Prompts are left-padded to P = ``bucket(longest prompt)``.
    ``max_len`` sizes the cache, by default ``P + bucket(max_new_tokens)``; when given, P is
    capped at ``max_len - max_new_tokens`` (and refused if the longest prompt does not fit).

    Raises ValueError for empty prompts, token ids outside [0, vocab_size), and prompts
    that do not leave room for ``max_new_tokens`` within ``max_len``.
    """
    vocab = cfg.vocab_size
    arrays = _check_prompts(prompts, vocab)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens is {max_new_tokens!r}; set it to a positive integer.")
    if stop_token is not None and not 0 <= stop_token < vocab:
        raise ValueError(f"stop_token is {stop_token}; use None or an id in [0, {vocab}).")
    if not 0 <= pad_id < vocab:
        raise ValueError(f"pad_id is {pad_id}; use an id in [0, {vocab}).")
    longest = max(len(a) for a in arrays)
    if max_len is None:
        length = bucket(longest)
        max_len = length + bucket(max_new_tokens)
    else:
        if longest + max_new_tokens > max_len:
            raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
                             f"exceeds max_len ({max_len}); raise max_len or shorten the request.")
        length = min(bucket(longest), max_len - max_new_tokens)
    tokens, positions, segment_ids = left_pad(arrays, length, pad_id)
    cache = model.init_cache(cfg, len(arrays), max_len)
    generated, _, _ = greedy_padded(
        model, params, cfg, tokens, positions, segment_ids, cache, max_new_tokens,
        _NO_STOP if stop_token is None else stop_token, pad_id, width=max_len - length)
    generated = np.asarray(generated)[:, :max_new_tokens]
    out = []
    for row in generated.tolist():
        if stop_token is not None and stop_token in row:
            row = row[:row.index(stop_token) + int(include_stop)]
        out.append(row)
    return out
