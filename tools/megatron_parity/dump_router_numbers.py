"""Record Megatron-Core's router numbers as a test fixture (run ONLY in a separate venv).

    python3 -m venv /tmp/mcore && /tmp/mcore/bin/pip install torch==2.13.0 megatron-core==0.16.1
    cd /tmp && /tmp/mcore/bin/python /path/to/moetron/tools/megatron_parity/dump_router_numbers.py \
        /path/to/moetron/tests/data/megatron_parity/router_numbers.pt

Megatron-Core's own `TopKRouter` runs on the CPU in one gloo process (two small patches make
it CPU-only: `torch.cuda.current_device` answers "cpu", and the Transformer Engine GEMM it
probes for is marked absent). For each routing configuration below it records, from fixed
inputs: the [T, E] combine weights and routing map, the aux losses as Megatron-LM logs them
(without coefficients), the expert-bias counts, and the router weight's gradient from
backward of sum(probs * G) (which includes the aux-loss gradients Megatron injects).
`tests/unit/test_router_megatron_parity.py` checks our router against the file in CI.

The cases include group-limited routing, Sinkhorn balancing (which Megatron-Core refuses beside a
capacity factor) and `moe_router_dtype` fp32/fp64.
Tokens are in Megatron's [S, B] order (sequence-major); the test reorders for our [B, S].
`--moe-token-drop-policy position` is left out: Megatron-Core picks the kept tokens with a
top-k over equal values, whose tie order depends on the device; ours keeps the earliest tokens.
Produced with megatron-core 0.16.1 and torch 2.13.0 (CPU).
"""

import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
torch.cuda.current_device = lambda: "cpu"

CASES = {
    "softmax_k2_aux": dict(moe_router_topk=2, moe_aux_loss_coeff=0.01),
    "softmax_k3_aux_z": dict(moe_router_topk=3, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3),
    "softmax_pre_k1_aux": dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_aux_loss_coeff=0.01),
    "softmax_pre_k2_scaled": dict(moe_router_topk=2, moe_router_pre_softmax=True,
                                  moe_router_topk_scaling_factor=2.5, moe_aux_loss_coeff=0.01),
    "sigmoid_k2_bias_aux": dict(moe_router_topk=2, moe_router_score_function="sigmoid",
                                moe_router_enable_expert_bias=True, moe_aux_loss_coeff=0.01,
                                moe_router_topk_scaling_factor=2.5),
    "sigmoid_k1_bias": dict(moe_router_topk=1, moe_router_score_function="sigmoid",
                            moe_router_enable_expert_bias=True, moe_router_load_balancing_type="none"),
    "sigmoid_pre_k2_aux": dict(moe_router_topk=2, moe_router_score_function="sigmoid",
                               moe_router_pre_softmax=True, moe_aux_loss_coeff=0.1),
    "seq_aux_k2": dict(moe_router_topk=2, moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.1),
    "global_aux_k2": dict(moe_router_topk=2, moe_router_load_balancing_type="global_aux_loss",
                          moe_aux_loss_coeff=0.1),
    "capacity_probs": dict(moe_router_topk=2, moe_aux_loss_coeff=0.01, moe_expert_capacity_factor=0.5,
                           moe_token_drop_policy="probs"),
    "capacity_pad": dict(moe_router_topk=2, moe_aux_loss_coeff=0.01, moe_expert_capacity_factor=0.5,
                         moe_pad_expert_input_to_capacity=True),
    "none_z": dict(moe_router_topk=2, moe_router_load_balancing_type="none", moe_z_loss_coeff=1e-2),
    "router_bias": dict(moe_router_topk=2, moe_aux_loss_coeff=0.01, add_bias_linear=True),
    "group_softmax_k2_g2of1": dict(moe_router_topk=2, moe_router_num_groups=2, moe_router_group_topk=1,
                                   moe_aux_loss_coeff=0.01),
    "group_pre_softmax_k4_g4of2": dict(moe_router_topk=4, moe_router_pre_softmax=True, moe_router_num_groups=4,
                                       moe_router_group_topk=2, moe_aux_loss_coeff=0.01),
    "group_sigmoid_bias_k4_g4of2": dict(moe_router_topk=4, moe_router_score_function="sigmoid",
                                        moe_router_enable_expert_bias=True, moe_router_num_groups=4,
                                        moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5,
                                        moe_aux_loss_coeff=0.01),
    "sinkhorn_k1": dict(moe_router_topk=1, moe_router_load_balancing_type="sinkhorn"),
    "sinkhorn_k2_z": dict(moe_router_topk=2, moe_router_load_balancing_type="sinkhorn",
                          moe_z_loss_coeff=1e-3),
    "fp64_k2_aux_z": dict(moe_router_topk=2, moe_router_dtype="fp64", moe_aux_loss_coeff=0.01,
                          moe_z_loss_coeff=1e-3),
    "fp32_group_sigmoid_k2_g4of2": dict(moe_router_topk=2, moe_router_dtype="fp32", moe_router_score_function="sigmoid",
                                        moe_router_num_groups=4, moe_router_group_topk=2,
                                        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.1),
}
S, B, D, E, MICRO_BATCHES = 6, 3, 16, 8, 3


def main(out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1")
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe_utils.te_general_gemm = None  # no Transformer Engine here
    parallel_state.initialize_model_parallel(1, 1)
    groups = ProcessGroupCollection.use_mpu_process_groups()

    gen = torch.Generator().manual_seed(1234)
    weight = torch.randn(E, D, generator=gen) * 0.5
    expert_bias = torch.randn(E, generator=gen) * 0.05
    router_bias = torch.randn(E, generator=gen) * 0.5
    inputs = [torch.randn(S, B, D, generator=gen) for _ in range(MICRO_BATCHES)]
    grads = [torch.randn(S * B, E, generator=gen) for _ in range(MICRO_BATCHES)]
    fixture = {"weight": weight, "expert_bias": expert_bias, "router_bias": router_bias, "inputs": inputs, "grads": grads,
               "shape": (S, B, D, E), "cases": {}}
    for name, overrides in CASES.items():
        cfg = TransformerConfig(**{"num_layers": 1, "hidden_size": D, "num_attention_heads": 4, "num_moe_experts": E,
                                   "use_cpu_initialization": True, "add_bias_linear": False, **overrides})
        router = TopKRouter(cfg, pg_collection=groups)
        router.set_layer_number(1)
        router.weight.data.copy_(weight)
        if router.bias is not None:
            router.bias.data.copy_(router_bias)
        if router.expert_bias is not None:
            router.expert_bias.copy_(expert_bias)
        router.train()
        steps = MICRO_BATCHES if cfg.moe_router_load_balancing_type == "global_aux_loss" else 1
        outputs = []
        for i in range(steps):
            moe_utils.clear_aux_losses_tracker()
            router.weight.grad = None
            if router.bias is not None:
                router.bias.grad = None
            if router.local_tokens_per_expert is not None:
                router.local_tokens_per_expert.zero_()
            probs, routing_map = router(inputs[i])
            (probs * grads[i]).sum().backward()
            tracker = moe_utils.get_moe_layer_wise_logging_tracker()
            logged = {k: float(v["values"][0]) for k, v in tracker.items()}
            outputs.append({
                "probs": probs.detach().clone(), "routing_map": routing_map.clone(),
                "weight_grad": router.weight.grad.clone(), "logged": logged,
                "bias_grad": router.bias.grad.clone() if router.bias is not None else None,
                "bias_counts": (router.local_tokens_per_expert.clone()
                                if router.local_tokens_per_expert is not None else None),
            })
        fixture["cases"][name] = {"config": overrides, "micro_batches": outputs}
        print(f"{name}: {len(outputs)} micro-batch(es), logged {outputs[-1]['logged']}")
    torch.save(fixture, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main(sys.argv[1])
