"""Our routers against numbers recorded from Megatron-Core 0.16.1's own TopKRouter (top-k with
softmax/sigmoid, group-limited routing, Sinkhorn, fp32/fp64 router dtype).

The fixture comes from `tools/megatron_parity/dump_router_numbers.py` (run in a separate venv
with megatron-core installed; see its docstring). For each routing configuration: the combine
weights and routing map, the aux losses as Megatron-LM logs them, the expert-bias counts and the
router weight's gradient from backward of sum(probs * G) plus the aux losses.
"""

import os
import shlex

import pytest
import torch

from megatron.core.transformer.moe.router import LOAD_BALANCING_LOSS_NAMES, TopKRouter
from megatron.core.transformer.moe.router import build_router as make_router
from tests.helpers import TINY_FLAGS, make_config

FIXTURE = os.path.join(os.path.dirname(__file__), os.pardir, "data", "megatron_parity", "router_numbers.pt")
DATA = torch.load(FIXTURE, weights_only=True)
S, B, D, E = DATA["shape"]


FLAGS = {"moe_router_topk": "--moe-router-topk", "moe_aux_loss_coeff": "--moe-aux-loss-coeff",
         "moe_z_loss_coeff": "--moe-z-loss-coeff", "moe_router_score_function": "--moe-router-score-function",
         "moe_router_topk_scaling_factor": "--moe-router-topk-scaling-factor",
         "moe_router_load_balancing_type": "--moe-router-load-balancing-type",
         "moe_expert_capacity_factor": "--moe-expert-capacity-factor", "moe_token_drop_policy": "--moe-token-drop-policy",
         "moe_router_num_groups": "--moe-router-num-groups", "moe_router_group_topk": "--moe-router-group-topk",
         "moe_router_dtype": "--moe-router-dtype"}
SWITCHES = {"moe_router_pre_softmax": "--moe-router-pre-softmax",
            "moe_router_enable_expert_bias": "--moe-router-enable-expert-bias",
            "moe_pad_expert_input_to_capacity": "--moe-pad-expert-input-to-capacity"}


def build_router(config: dict) -> TopKRouter:  # every strategy compared here is a TopKRouter
    """Our router for one of the fixture's TransformerConfig overrides, with the fixture's weights."""
    flags = [f"--num-experts {E} --hidden-size {D} --moe-aux-loss-coeff 0"]
    flags += [SWITCHES[k] if k in SWITCHES else f"{FLAGS[k]} {v}" for k, v in config.items() if k != "add_bias_linear"]
    base = shlex.split(TINY_FLAGS)
    if config.get("add_bias_linear"):  # Megatron-Core's router then has a bias too
        base.remove("--disable-bias-linear")
    router = make_router(make_config(" ".join(flags), base=shlex.join(base)).model).train()
    with torch.no_grad():
        router.weight.copy_(DATA["weight"])
        if config.get("add_bias_linear"):
            router.bias.copy_(DATA["router_bias"])
        if router.expert_bias is not None:
            router.expert_bias.copy_(DATA["expert_bias"])
    return router


def dense(probs_TK: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    return torch.zeros(probs_TK.shape[0], E, dtype=probs_TK.dtype).scatter(1, idx_TK, probs_TK)


@pytest.mark.filterwarnings("ignore:--moe-router-pre-softmax has no effect")
@pytest.mark.parametrize("name", sorted(DATA["cases"]))
def test_router_matches_megatron_core(name):
    case = DATA["cases"][name]
    config = case["config"]
    router = build_router(config)
    router.start_step()
    seq_major = config.get("moe_router_load_balancing_type") != "seq_aux_loss"
    for i, ref in enumerate(case["micro_batches"]):
        x_SBD = DATA["inputs"][i]
        # Megatron's tokens are [S, B] flattened; ours [B, S]. Feed ours Megatron's order unless
        # sequences matter (seq_aux_loss), then reorder the results back.
        x_TD = x_SBD.reshape(S * B, D) if seq_major else x_SBD.transpose(0, 1).reshape(B * S, D)
        router.zero_grad()
        out = router(x_TD, seq_length=S if not seq_major else S * B)
        probs_TE = dense(out.probs_TK, out.expert_idx_TK)
        if out.keep_TK is not None:
            kept = dense(out.keep_TK.float(), out.expert_idx_TK) > 0
        else:
            kept = dense(torch.ones_like(out.probs_TK), out.expert_idx_TK) > 0
        if not seq_major:  # back to Megatron's [S, B] token order
            probs_TE = probs_TE.view(B, S, E).transpose(0, 1).reshape(S * B, E)
            kept = kept.view(B, S, E).transpose(0, 1).reshape(S * B, E)
        torch.testing.assert_close(probs_TE, ref["probs"], rtol=1e-5, atol=1e-6)
        if not config.get("moe_pad_expert_input_to_capacity"):  # padding maps every slot, we pad in dispatch
            assert torch.equal(kept, ref["routing_map"]), name
        grad_TE = ref_grads = DATA["grads"][i]
        if not seq_major:
            grad_TE = ref_grads.view(S, B, E).transpose(0, 1).reshape(B * S, E)
        ((dense(out.probs_TK, out.expert_idx_TK) * grad_TE.to(out.probs_TK.dtype)).sum() + out.aux_loss).backward()
        torch.testing.assert_close(router.weight.grad, ref["weight_grad"], rtol=1e-4, atol=1e-6)
        if ref["bias_grad"] is not None:
            torch.testing.assert_close(router.bias.grad, ref["bias_grad"], rtol=1e-4, atol=1e-6)
        if ref["bias_counts"] is not None:
            torch.testing.assert_close(out.stats.routed_per_expert_E, ref["bias_counts"])
        kind = config.get("moe_router_load_balancing_type", "aux_loss")
        if kind in LOAD_BALANCING_LOSS_NAMES and config.get("moe_aux_loss_coeff"):
            logged = ref["logged"][LOAD_BALANCING_LOSS_NAMES[kind]]
            assert float(out.stats.load_balancing_loss) == pytest.approx(logged, rel=1e-5)
        if config.get("moe_z_loss_coeff") is not None:
            assert float(out.stats.z_loss) == pytest.approx(ref["logged"]["z_loss"], rel=1e-5)
