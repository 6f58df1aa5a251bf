"""Dense peer of the Switch experiment: a 27M-parameter Llama-style Transformer
(d_model 512, 8 layers, 8 heads, d_ff 1536, byte tokens) on the Python standard library's source.

Same data, steps, batch and optimizer as ``experiments/switch_stdlib.py``, and the same FLOPs per
token: each Switch layer there runs one expert of this d_ff per token (plus a 512 x 8 router).
About 3000 steps of 32 x 512 tokens (~1.6 epochs of the ~30 MB training split); a few minutes on
one H200. Two seeds:

    python -m train --config experiments/dense_stdlib.py --workdir runs/dense_stdlib_s0
    python -m train --config experiments/dense_stdlib.py --workdir runs/dense_stdlib_s1 --config.seed=1

``metrics.jsonl`` in the workdir holds the train loss every 10 steps and ``eval_loss`` (the
held-out ~5% of stdlib files, 16 batches) every 100 steps.
"""
from train.config import base_config


def get_config():
    c = base_config()
    c.data.source = "stdlib"
    c.data.tokenizer = "byte"
    c.model.update(vocab_size=259, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1536,
                   dtype="bfloat16", param_dtype="float32", remat="none", attention="auto")
    c.train.update(steps=3000, batch_size=32, seq_len=512, log_every=10, eval_every=100, eval_batches=16,
                   ckpt_every=1000, exact_match_every=0)
    c.optim.update(lr=1e-3, warmup_steps=200, end_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0)
    return c
