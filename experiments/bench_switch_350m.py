"""Speed benchmark: ``experiments/bench_llama_350m.py`` with Switch layers of
8 experts in every other layer (12 of 24), top-1, capacity factor 1.25, routing groups of one
2048-token sequence; same tokens per step (batch 8 x 2048) and FLOPs per token as the dense model
plus the routers (1.10B parameters, 341M active). Goal: step time <= 1.3x the dense one on one H200.

    python -m train.bench --config experiments/bench_switch_350m.py
    python -m train.bench --config experiments/bench_switch_350m.py \\
        --variants 'capacity:;dropless:model.moe_dispatch=dropless'

``train.bench`` reports ``flops_per_token`` from ``models.transformer.flops_per_token``, which
counts the active expert (top_k) and the router per token, not all experts.
"""
from experiments import bench_llama_350m


def get_config():
    c = bench_llama_350m.get_config()
    c.model.update(num_experts=8, moe_every=2, moe_top_k=1, moe_capacity_factor_train=1.25,
                   moe_capacity_factor_eval=2.0, moe_group_size=2048, moe_dispatch="capacity",
                   moe_aux_loss_coef=0.01, moe_z_loss_coef=1e-3, moe_expert_dropout=0.0)
    return c
