"""Evaluation: held-out loss, and exact match of greedy answers on the arithmetic corpus."""
from __future__ import annotations

import itertools

import jax
import numpy as np

from models import generate
from parallel import sharding
from train import data


def eval_loss(eval_step, params, config, mesh, rules, *, tokenizer, seq_len, batch_size, process_index=0,
              process_count=1) -> float:
    """Mean next-token cross-entropy over the first ``train.eval_batches`` eval batches."""
    ds = data.make_dataset(config.data, split="eval", seed=config.seed, tokenizer=tokenizer, seq_len=seq_len,
                           batch_size=batch_size, process_index=process_index, process_count=process_count)
    nll = tokens = 0.0
    for local in itertools.islice(iter(ds), config.train.eval_batches):  # the last batch comes padded
        out = jax.device_get(eval_step(params, sharding.global_batch(local, mesh, rules)))
        nll += float(out["nll"])
        tokens += float(out["tokens"])
    return nll / max(tokens, 1.0)


def arithmetic_exact_match(model, mcfg, params, tokenizer, config) -> dict[str, float]:
    """Greedy-decoded held-out problems per step count: {'exact_match/k': accuracy, 'exact_match': mean}.

    The answer is the N of the first "The answer is N." in the completion.
    """
    t = config.train
    results = {}
    for k in t.exact_match_steps:
        problems = data.heldout_problems(k, t.exact_match_n, seed=config.data.seed)
        prompts = [[tokenizer.bos_id] + tokenizer.encode(p.prompt) for p in problems]
        outputs = generate.greedy(model, params, mcfg, prompts, max_new_tokens=t.max_new_tokens,
                                  stop_token=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        correct = [data.extract_answer(tokenizer.decode(out)) == p.answer for out, p in zip(outputs, problems)]
        results[f"exact_match/{k}"] = float(np.mean(correct))
    results["exact_match"] = float(np.mean([results[f"exact_match/{k}"] for k in t.exact_match_steps]))
    return results
