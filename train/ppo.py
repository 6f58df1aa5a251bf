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
import numpy as np

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


# ----------------------------------------------------------------------------- the loop

def default_config():
    """The ``ppo`` section of a PPO experiment config (``experiments/cai_ppo.py``)."""
    import ml_collections

    return ml_collections.ConfigDict(dict(
        prompts="",          # JSONL of {"prompt": str}: the text the policy continues ("Human: ...\n\nAssistant: ")
        policy_workdir="",   # the run whose latest parameters start the policy and are the frozen reference
        pm_workdir="",       # the preference model's run (objective 'preference_model', same model.*)
        reward_token=3,      # the preference model's scalar head (its train.reward_token)
        value_token=4,       # the value head: the head's column of another unused token
        kl_coef=0.05, clip=0.2, value_clip=0.2, value_coef=0.5, gamma=1.0, lam=0.95,
        epochs=2,            # updates per rollout batch (full batch each)
        max_new_tokens=64, temperature=1.0))


def rollout_rows(prompt_ids: list[list[int]], responses: list[list[int]], eos_id: int, pad_id: int, seq_len: int):
    """Right-padded rows of prompt + response, int32 [n, seq_len]: inputs, targets, mask (1 where the target is
    a response token or its eos), last (index of the last response token in inputs, where the preference model
    reads its score; the eos excluded)."""
    n = len(prompt_ids)
    inputs = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    last = np.zeros(n, np.int32)
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        e = (list(p) + list(r))[: seq_len + 1]
        inputs[i, :len(e) - 1], targets[i, :len(e) - 1] = e[:-1], e[1:]
        mask[i, len(p) - 1:len(e) - 1] = 1.0
        text_end = len(e) - 1 if e[-1] == eos_id else len(e)  # tokens before any eos
        last[i] = max(min(text_end - 1, len(e) - 2), len(p) - 1)  # inputs hold e[:-1]
    return inputs, targets, mask, last


def make_ppo_step(model, mcfg, tx, p, jit=jax.jit):
    """(prepare, update), jitted, for the ``ppo`` config section ``p``:
    prepare(params, reference, pm, inputs, targets, mask, last) -> (rollout, {score, kl}): the policy's
    log-probs and values, the reference's log-probs, the preference model's score, KL-penalized rewards, GAE
    (advantages whitened); update(state, rollout) -> (state, metrics): one optimizer step on `ppo_loss`.
    ``jit``: how they are compiled (tests pass a faster-compiling one)."""
    from train import step as step_lib
    from train.orpo import sequence_rewards

    @jit
    def prepare(params, reference, pm, inputs, targets, mask, last):
        logp_old, values_old = policy_and_values(model, mcfg, params, inputs, targets, p.value_token)
        x, _ = forward(model, mcfg, reference, {"inputs": inputs})
        logp_ref = token_logps(model, mcfg, reference, x, targets)
        score = sequence_rewards(model, mcfg, pm, inputs, last, p.reward_token)
        rewards, kl = kl_rewards(logp_old, logp_ref, score, mask, p.kl_coef)
        adv, ret = gae(rewards, values_old, mask, p.gamma, p.lam)
        return dict(inputs=inputs, targets=targets, mask=mask, logp_old=logp_old, values_old=values_old,
                    advantages=whiten(adv, mask), returns=ret), {"score": jnp.mean(score), "kl": jnp.mean(kl)}

    @jit
    def update(state, rollout):
        (loss, stats), grads = jax.value_and_grad(
            lambda q: ppo_loss(model, mcfg, q, rollout, value_token=p.value_token, clip=p.clip,
                               value_clip=p.value_clip, value_coef=p.value_coef), has_aux=True)(state.params)
        return step_lib.apply_gradients(tx, state, grads), {"loss": loss, **stats}

    return prepare, update


def run(config, workdir: str) -> dict:
    """PPO of the policy in ``config.ppo.policy_workdir`` against the preference model in ``config.ppo.pm_workdir``
    for ``train.steps`` iterations of ``train.batch_size`` rollouts each, in ``workdir``: the trainer's state,
    optimizer, shardings (``train.setup``), checkpoints (resumed) and metrics logger. Returns the last metrics."""
    import json
    import os

    from models import generate
    from parallel import mesh as mesh_lib, sharding
    from train import cai, checkpoint, data, metrics, step as step_lib
    from train.setup import setup_training

    p, t = config.ppo, config.train
    if config.optim.frozen:
        raise ValueError("optim.frozen is set; PPO here trains every parameter (the reference is kept apart), so "
                         "set optim.frozen=''.")
    setup = setup_training(config, mesh_lib.make_mesh(config.mesh))
    model, mcfg, tx = setup.model, setup.mcfg, setup.tx
    tok = data.make_tokenizer(config.data)
    prompts = [cai.prompt_text(r) for r in cai.read_jsonl(p.prompts)]
    reference = cai.load_params(config, p.policy_workdir)
    pm = cai.load_params(config, p.pm_workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=t.ckpt_every, keep=t.ckpt_keep,
                                   async_save=False)
    restored = ckpt.restore(setup.abstract_state())
    if restored is None:
        state, start = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=reference,
                                           opt_state=tx.init(reference)), 0
    else:
        state, _, start = restored

    prepare, update = make_ppo_step(model, mcfg, tx, p)

    logger = metrics.MetricsLogger(workdir, total_steps=t.steps, initial_step=start, progress=t.progress)
    last_metrics = {}
    try:
        with sharding.activate(setup.mesh, setup.rules):
            for it in range(start, t.steps):
                chosen = [prompts[(it * t.batch_size + j) % len(prompts)] for j in range(t.batch_size)]
                prompt_ids = [[tok.bos_id] + tok.encode(c) for c in chosen]
                responses = generate.sample(model, state.params, mcfg, prompt_ids, max_new_tokens=p.max_new_tokens,
                                            rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), it),
                                            temperature=p.temperature, stop_token=tok.eos_id, pad_id=tok.pad_id,
                                            include_stop=True)
                rows = rollout_rows(prompt_ids, responses, tok.eos_id, tok.pad_id, t.seq_len)
                rollout, stats = prepare(state.params, reference, pm, *rows)
                for _ in range(p.epochs):
                    state, out = update(state, rollout)
                record = {k: float(v) for k, v in {**stats, **out}.items()}
                record["response_tokens"] = float(np.mean([len(r) for r in responses]))
                logger.log(it + 1, record)
                last_metrics = record
                if ckpt.should_save(it + 1) or it + 1 == t.steps:
                    ckpt.save(it + 1, state, {"iteration": it + 1}, wait=True)
    finally:
        ckpt.close()
        logger.close()
    last_metrics["step"] = t.steps
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(last_metrics, f)
    return last_metrics


def main(argv):
    """``python -m train.ppo --config experiments/cai_ppo.py --workdir DIR [--config.section.key=value ...]``."""
    from absl import flags

    del argv
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=False)
    flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, metrics).")
    app.run(main)
