"""Layer pruning (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers").

x_l is the residual stream entering layer l (x_L the last layer's output), for the last token of each
sequence. For a block of n layers starting at l (sec. 3.2, eq. 7):

    d(x_l, x_{l+n}) = (1 / pi) arccos( x_l . x_{l+n} / (||x_l|| ||x_{l+n}||) ),   averaged over the data

and the block to drop is l*(n) = argmin_l d(x_l, x_{l+n}): removing layers l .. l+n-1 joins x_l to
x_{l+n}. The simpler heuristic drops the n deepest layers before the last one (l = L - 1 - n). Healing
afterwards: QLoRA on the MLP matrices (``models/lora.py``). Switch models prune whole units of
``moe_every`` layers (the stack's repeating unit). Any family whose ``params['layers']`` stacks layers on
its leading axis and whose blocks record ``capture.hidden`` prunes the same way (Mamba too).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models import capture


def last_token_states(model, cfg, params, tokens: np.ndarray, *, batch_size: int = 8,
                      last: np.ndarray | None = None, jit=jax.jit) -> np.ndarray:
    """The hidden state entering every layer (and leaving the last) at each row's last token: [L + 1, rows, d]
    float32. ``last`` [rows]: the index of each row's last real token (default: the final position). ``jit``:
    how the forward is compiled."""
    tokens = np.asarray(tokens)
    last = np.full(tokens.shape[0], tokens.shape[1] - 1) if last is None else np.asarray(last)

    @jit
    def run(params, toks, idx):
        with capture.taps(hidden=True) as got:
            model.apply(params, toks, cfg)
        h = capture.stack_hidden(got.hidden)  # [L + 1, b, s, d]
        return jnp.take_along_axis(h, idx[None, :, None, None], axis=2)[:, :, 0].astype(jnp.float32)

    out = [np.asarray(run(params, jnp.asarray(tokens[i:i + batch_size], jnp.int32),
                          jnp.asarray(last[i:i + batch_size], jnp.int32)))
           for i in range(0, tokens.shape[0], batch_size)]
    return np.concatenate(out, axis=1)


def angular_distances(states: np.ndarray) -> np.ndarray:
    """D [L, L]: D[n - 1, l] = mean over rows of arccos(cos(x_l, x_{l+n})) / pi for n = 1..L, l = 0..L-n;
    NaN where l + n > L. states: [L + 1, rows, d]."""
    h = np.asarray(states, np.float64)
    h = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-30)
    n_layers = h.shape[0] - 1
    d = np.full((n_layers, n_layers), np.nan)
    for n in range(1, n_layers + 1):
        cos = np.einsum("lrd,lrd->lr", h[: n_layers + 1 - n], h[n:])
        d[n - 1, : n_layers + 1 - n] = np.mean(np.arccos(np.clip(cos, -1.0, 1.0)), axis=1) / np.pi
    return d


def _unit(cfg) -> int:
    return cfg.moe_every if getattr(cfg, "num_experts", 0) else 1


def best_start(distances: np.ndarray, n: int, unit: int = 1) -> int:
    """argmin_l D[n - 1, l] over the starts l that are multiples of ``unit``."""
    if not 1 <= n <= distances.shape[0]:
        raise ValueError(f"cannot drop {n} layers of {distances.shape[0]}; drop between 1 and "
                         f"{distances.shape[0] - 1}.")
    row = distances[n - 1].copy()
    row[np.arange(row.size) % unit != 0] = np.nan
    return int(np.nanargmin(row))


def deepest_start(cfg, n: int) -> int:
    """The heuristic: drop the n deepest layers before the last one (start L - 1 - n)."""
    _check(cfg, 0, n)
    return cfg.n_layers - 1 - n


def _check(cfg, start: int, n: int) -> None:
    L, unit = cfg.n_layers, _unit(cfg)
    if n < 0 or n >= L:
        raise ValueError(f"cannot drop {n} of the model's {L} layers; drop between 0 and {L - 1} (one must remain).")
    if start < 0 or start + n > L:
        raise ValueError(f"layers {start}..{start + n - 1} are not all among the model's {L} layers (0..{L - 1}).")
    if start % unit or n % unit:
        raise ValueError(f"this Switch model's stack repeats units of {unit} layers; drop whole units (start and "
                         f"count multiples of {unit}).")


def drop_layers(params: dict, cfg, start: int, n: int) -> tuple[dict, object]:
    """(params without layers start .. start+n-1, the config with n_layers - n). n = 0: params unchanged."""
    _check(cfg, start, n)
    if n == 0:
        return params, cfg
    unit = _unit(cfg)
    keep = np.concatenate([np.arange(start // unit), np.arange((start + n) // unit, cfg.n_layers // unit)])
    layers = jax.tree.map(lambda a: a[keep], params["layers"])
    return {**params, "layers": layers}, dataclasses.replace(cfg, n_layers=cfg.n_layers - n)
