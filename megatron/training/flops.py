"""Model FLOPs per token for throughput and MFU (docs/architecture.md, "FLOPs for throughput and MFU").

Training FLOPs per token ~= 6 * (active non-embedding parameters + output layer)
                           + 12 * L * S * D  (attention scores and values, forward + backward),
where an MoE layer's active parameters are the router, K of its E experts and the shared expert.
"""

from megatron.core.config import ModelConfig


def ffn_params(config: ModelConfig, ffn_hidden_size: int) -> int:
    return config.hidden_size * ffn_hidden_size * (3 if config.swiglu else 2)


def active_params_per_layer(config: ModelConfig, layer: int) -> int:
    D, d = config.hidden_size, config.kv_channels
    attn = D * (config.num_attention_heads + 2 * config.num_query_groups) * d + config.num_attention_heads * d * D
    moe = config.moe
    if moe is None or not moe.is_moe_layer(layer):
        return attn + ffn_params(config, config.ffn_hidden_size)
    ffn = D * moe.num_experts + moe.router_topk * ffn_params(config, moe.ffn_hidden_size)
    if moe.shared_expert_ffn_hidden_size:
        ffn += ffn_params(config, moe.shared_expert_ffn_hidden_size)
    return attn + ffn


def training_flops_per_token(config: ModelConfig) -> float:
    active = sum(active_params_per_layer(config, i) for i in range(config.num_layers))
    output_layer = config.hidden_size * config.vocab_size
    attention = 12 * config.num_layers * config.seq_length * config.hidden_size
    return 6.0 * (active + output_layer) + attention


def training_flops_per_iteration(config: ModelConfig, global_batch_size: int) -> float:
    return training_flops_per_token(config) * global_batch_size * config.seq_length
