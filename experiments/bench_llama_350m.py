"""Speed benchmark: a 350M-class Llama-style model (hidden 1024, 24 layers, 16 heads, ffn 2816,
vocab 32000, seq 2048, batch 8), the dense reference for the Switch and Mamba comparisons.

python -m train.bench --config experiments/bench_llama_350m.py
"""
from experiments import bench_llama_1b


def get_config():
    c = bench_llama_1b.get_config()
    c.model.update(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2816)
    return c
