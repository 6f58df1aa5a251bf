"""Speed benchmark: the 1.26B Llama-style model (hidden 2048, 22 layers, 16 heads, ffn 5632,
vocab 32000, seq 2048, batch 8) on one GPU; the peer is Hugging Face transformers + torch.compile.

python -m train.bench --config experiments/bench_llama_1b.py
"""
from train.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=32000, d_model=2048, n_layers=22, n_heads=16, n_kv_heads=16, d_ff=5632,
                   dtype="bfloat16", param_dtype="float32", remat="dots", attention="auto")
    c.train.update(steps=1000, batch_size=8, seq_len=2048, loss_chunk=0, eval_every=0, exact_match_every=0,
                   ckpt_every=0)
    c.optim.update(lr=3e-4, warmup_steps=100)
    return c
