"""Decoding peer: Hugging Face transformers `generate` (greedy, bf16) on a Llama config, one GPU.

    python experiments/peers/hf_generate.py 1b OUT_DIR [BATCH ...]

Random weights, prompt 512 random tokens, exactly 256 new tokens, static and dynamic KV cache.
Prints tokens/s (new tokens x batch / wall time of the whole `generate`, prefill included) and
writes hf_generate_<size>.json into OUT_DIR.
"""
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=16,
               num_key_value_heads=16),
}
PROMPT, NEW = 512, 256


def main(size, out, batches):
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=PROMPT + NEW, attn_implementation="sdpa", **SIZES[size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    results = {}
    for batch in batches:
        ids = torch.randint(3, cfg.vocab_size, (batch, PROMPT), device="cuda")
        for cache in ("static", "dynamic"):
            kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None,
                      attention_mask=torch.ones_like(ids))
            if cache == "static":
                kw["cache_implementation"] = "static"
            with torch.no_grad():
                model.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
                torch.cuda.synchronize()
                t = time.perf_counter()
                model.generate(ids, **kw)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
            results[f"b{batch}_{cache}"] = dict(seconds=round(dt, 3), tokens_per_s=round(batch * NEW / dt, 1))
            print(size, batch, cache, results[f"b{batch}_{cache}"], flush=True)
    with open(os.path.join(out, f"hf_generate_{size}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3:]] or [1, 64])
