"""PPO against a preference model (Schulman et al. 2017; as used for RL-CAI, Bai et al. 2022 sec. 4, with the
per-token KL penalty to the reference policy of Ziegler et al. 2019 / Stiennon et al. 2020).

A rollout is a batch of rows [batch, T] = prompt + sampled response; ``mask`` [batch, T] is 1 on the
positions whose *target* is a response token (the log-prob, value and reward live there).

    reward       r_t = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t))  +  [t = last] * score      (`kl_rewards`)
    GAE          delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1}          (`gae`)
                 (V and A are 0 past the last response token), returns R_t = A_t + V_t
    policy       L_pi = -E_t[min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)],  rho_t = pi / pi_old  (`policy_loss`)
    value        L_V  = E_t[max((V_t - R_t)^2, (clip(V_t, V_old +- eps_v) - R_t)^2)] / 2             (`value_loss`)

E_t is the mean over response tokens of the batch. ``score`` is the preference model's reward of the
whole response (``train.orpo.sequence_rewards``). The value head, like the preference model's scalar
head, is the LM head's column of a token the data never uses (``value_token``; ``train.orpo.reward``),
so policy and value share one parameter tree.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from train.objective import forward
from train.orpo import reward, token_logps


def kl_rewards(logp_old: jax.Array, logp_ref: jax.Array, score: jax.Array, mask: jax.Array, kl_coef: float):
    """Per-token rewards [batch, T]: the KL penalty on every response token, plus ``score`` [batch] on the
    last one. Returns (rewards, per-row KL estimate sum_t (log pi_old - log pi_ref) [batch])."""
    mask = mask.astype(jnp.float32)
    kl = (logp_old - logp_ref) * mask
    idx = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, idx, -1), axis=1)
    is_last = (idx[None, :] == last[:, None]).astype(jnp.float32) * mask
    return -kl_coef * kl + is_last * score[:, None], jnp.sum(kl, axis=1)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0, lam: float = 0.95):
    """(advantages, returns) [batch, T] by generalized advantage estimation over the masked positions
    (a reverse scan; rewards and values outside the mask are ignored, V past the end is 0)."""
    mask = mask.astype(jnp.float32)
    r, v = rewards * mask, values * mask

    def step(carry, xs):
        next_value, next_adv = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_value - v_t
        adv = (delta + gamma * lam * next_adv) * m_t
        # a masked position passes the carry through unchanged (so padding after the response is skipped)
        return (jnp.where(m_t > 0, v_t, next_value), jnp.where(m_t > 0, adv, next_adv)), adv

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, mask.T), reverse=True)
    adv = adv.T
    return adv, (adv + v) * mask


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked positions (advantage normalization)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def policy_loss(logp: jax.Array, logp_old: jax.Array, advantages: jax.Array, mask: jax.Array, clip: float = 0.2):
    """(clipped surrogate loss, {clip_fraction, approx_kl}) averaged over response tokens."""
    ratio = jnp.exp(logp - logp_old)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = masked_mean(-jnp.minimum(unclipped, clipped), mask)
    stats = {"clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > clip).astype(jnp.float32), mask),
             "approx_kl": masked_mean(0.5 * (logp - logp_old) ** 2, mask)}
    return loss, stats


def value_loss(values: jax.Array, values_old: jax.Array, returns: jax.Array, mask: jax.Array, clip: float = 0.2):
    """The clipped value loss, averaged over response tokens."""
    clipped = values_old + jnp.clip(values - values_old, -clip, clip)
    return 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def policy_and_values(model, mcfg, params, tokens: jax.Array, targets: jax.Array, value_token: int):
    """(log pi(target) [batch, T], V [batch, T]) of rows that start at position 0 (one forward pass)."""
    x, _ = forward(model, mcfg, params, {"inputs": tokens})
    return token_logps(model, mcfg, params, x, targets), reward(model, mcfg, params, x, value_token)


def ppo_loss(model, mcfg, params, rollout: dict, *, value_token: int, clip: float = 0.2, value_clip: float = 0.2,
             value_coef: float = 0.5):
    """(L_pi + value_coef * L_V, metrics) of a rollout {inputs, targets, mask, logp_old, values_old,
    advantages, returns}, all [batch, T]."""
    logp, values = policy_and_values(model, mcfg, params, rollout["inputs"], rollout["targets"], value_token)
    mask = rollout["mask"]
    pl, stats = policy_loss(logp, rollout["logp_old"], rollout["advantages"], mask, clip)
    vl = value_loss(values, rollout["values_old"], rollout["returns"], mask, value_clip)
    return pl + value_coef * vl, {"policy_loss": pl, "value_loss": vl, **stats}
