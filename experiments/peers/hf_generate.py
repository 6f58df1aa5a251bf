"""Decoding peer: Hugging Face transformers `generate` (greedy, bf16) on loom's 1.26B Llama config, one GPU.

    python experiments/peers/hf_generate.py 1b {dynamic|static} OUT_DIR [BATCH ...]

Random weights, prompt 512 random tokens, exactly 256 new tokens. One cache kind per process:
`static` makes transformers compile the forward (torch.compile) on the first call, and a compiled
forward left in place would recompile for every length of a later dynamic cache. Each batch size
runs the identical call once to warm up (compilation included) and twice timed; the faster counts.
Prints tokens/s (new tokens x batch / wall time of the whole `generate`, prefill included) and
writes hf_generate_<size>_<cache>.json into OUT_DIR.
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


def main(size, cache, out, batches):
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=PROMPT + NEW, attn_implementation="sdpa", **SIZES[size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    results = {}
    for batch in batches:
        ids = torch.randint(3, cfg.vocab_size, (batch, PROMPT), device="cuda")
        kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None,
                  attention_mask=torch.ones_like(ids))
        if cache == "static":
            kw["cache_implementation"] = "static"
        times = []
        with torch.no_grad():
            for _ in range(3):  # the first call warms up (and compiles, for the static cache)
                torch.cuda.synchronize()
                t = time.perf_counter()
                model.generate(ids, **kw)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        dt = min(times[1:])
        results[f"b{batch}"] = dict(seconds=round(dt, 3), warmup_s=round(times[0], 1),
                                    tokens_per_s=round(batch * NEW / dt, 1))
        print(size, cache, batch, results[f"b{batch}"], flush=True)
    with open(os.path.join(out, f"hf_generate_{size}_{cache}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], [int(b) for b in sys.argv[4:]] or [1, 64])
