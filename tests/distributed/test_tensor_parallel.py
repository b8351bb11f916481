"""Tensor, sequence and expert-tensor parallelism on CPU gloo ranks equal the single-process run.

Each scenario trains a few steps with T = 2 (alone, with sequence parallelism, beside expert,
pipeline and data parallelism, with the distributed optimizer; with the experts' FFN width split
over ETP = 2 under each dispatcher, with capacity dropping and padding, with expert biases, and
with each of the other routers)
and in one process with the same global batch, and compares the loss curve, the gradient
norms, the expert loads and every parameter slice each rank holds against the same slice of the
single-process parameters: relative difference < 1e-5 for losses and norms in fp32, < 1e-4 for
the parameters after three Adam steps (Adam divides each gradient by its own magnitude, which
magnifies the last bits of small gradients; the key norm's bias, whose gradient is zero up to
rounding because softmax ignores a constant shift, is left out). The aux loss and z-loss are on
in every MoE scenario (the z-loss alone with sinkhorn and expert choice, which have no aux loss).
"""

from __future__ import annotations

import re

import pytest
import torch

from megatron.core.optimizer import is_expert_param
from megatron.core.parallel_state import ProcessGroups, groups_from_mesh
from megatron.core.tensor_parallel.sharding import tensor_split
from tests.distributed.harness import run_scenarios
from tests.helpers import assert_same_curves, TINY_FLAGS, make_config, rel_diff, train_steps

MOE_FLAGS = "--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 1e-2"
DENSE = TINY_FLAGS.replace(MOE_FLAGS, "") + " --global-batch-size 8 --clip-grad 0.05"
MOE = TINY_FLAGS + " --global-batch-size 8 --moe-z-loss-coeff 1e-3 --clip-grad 0.05"
STEPS = 3
PARALLEL_FLAGS = re.compile(r"--(tensor-model-parallel-size|pipeline-model-parallel-size|expert-model-parallel-size|"
                            r"expert-tensor-parallel-size|virtual-pipeline-model-parallel-size) \d+|"
                            r"--sequence-parallel|--use-distributed-optimizer|--pipeline-schedule \w+")

# (name, world size, base flags, extra flags)
SCENARIOS = [
    ("tp2-dense", 2, DENSE, "--tensor-model-parallel-size 2"),
    ("tp2-dense-sp-untied-learned-bias-qknorm", 2, DENSE.replace("--disable-bias-linear", ""),
     "--tensor-model-parallel-size 2 --sequence-parallel --untie-embeddings-and-output-weights "
     "--position-embedding-type learned_absolute --qk-layernorm --normalization LayerNorm"),
    ("tp2-moe-global-aux", 2, MOE, "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1 "
     "--moe-router-load-balancing-type global_aux_loss"),
    ("tp2-moe-sp-shared-expert", 2, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--expert-tensor-parallel-size 1 --moe-shared-expert-intermediate-size 32"),
    ("tp2-moe-sp-capacity-drop", 2, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--expert-tensor-parallel-size 1 --moe-expert-capacity-factor 1.0 --moe-token-drop-policy position"),
    ("tp2-moe-sp-seq-aux-sigmoid-bias", 2, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--expert-tensor-parallel-size 1 --moe-router-load-balancing-type seq_aux_loss "
     "--moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 0.01"),
    ("tp2xep2-etp1-alltoall", 4, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--expert-model-parallel-size 2 --expert-tensor-parallel-size 1 --moe-token-dispatcher-type alltoall"),
    ("tp2xep4-etp1-folded", 4, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--expert-model-parallel-size 4 --expert-tensor-parallel-size 1 --moe-token-dispatcher-type alltoall"),
    ("tp2xpp2", 4, MOE, "--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2 "
     "--expert-tensor-parallel-size 1"),
    ("tp2xpp2-interleaved-zero-bubble", 4, MOE, "--num-layers 4 --tensor-model-parallel-size 2 --sequence-parallel "
     "--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2 --pipeline-schedule InterleavedZeroBubble "
     "--expert-tensor-parallel-size 1 --untie-embeddings-and-output-weights"),
    # (the global aux loss is left out beside data parallelism: its counts are, by definition,
    # summed over the data-parallel ranks' micro-batches, so DP = 2 and DP = 1 differ)
    ("tp2xdp2-distopt-overlap", 4, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--expert-tensor-parallel-size 1 --use-distributed-optimizer --overlap-grad-reduce --ddp-bucket-size 2000"),
    # Expert tensor parallelism: each expert's FFN width split over ETP = 2 ranks.
    ("tp2-moe-sp-etp2", 2, MOE, "--tensor-model-parallel-size 2 --sequence-parallel"),  # ETP defaults to T
    ("tp2-moe-etp2-no-sp-bias", 2, MOE.replace("--disable-bias-linear", ""),
     "--tensor-model-parallel-size 2 --expert-tensor-parallel-size 2"),
    ("tp2-moe-sp-etp2-capacity-pad", 2, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity"),
    ("tp2xep2-etp2-alltoall", 4, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--expert-model-parallel-size 2 --expert-tensor-parallel-size 2 --moe-token-dispatcher-type alltoall"),
    ("tp2xep2-etp2-allgather", 4, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--expert-model-parallel-size 2 --moe-token-dispatcher-type allgather"),
    ("tp2xep2-etp2-allgather-bias-capacity", 4, MOE.replace("--disable-bias-linear", ""),
     "--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 "
     "--moe-token-dispatcher-type allgather --moe-expert-capacity-factor 1.0"),
    ("tp2xep2-etp2-alltoall-bias-capacity-pad-distopt", 4, MOE.replace("--disable-bias-linear", ""),
     "--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 "
     "--moe-token-dispatcher-type alltoall --moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity "
     "--use-distributed-optimizer"),
    # The other routers: their losses are per-rank shares of the micro-batch's (sinkhorn balances
    # the whole micro-batch; noisy top-k draws the whole micro-batch's noise and takes its shard).
    ("tp2-moe-sp-group-limited", 2, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--expert-tensor-parallel-size 1 --moe-router-num-groups 2 --moe-router-group-topk 1 --moe-router-topk 2"),
    ("tp2-moe-sp-sinkhorn", 2, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--expert-tensor-parallel-size 1 --moe-router-load-balancing-type sinkhorn --moe-aux-loss-coeff 0"),
    ("tp2-moe-etp2-noisy-topk", 2, MOE, "--tensor-model-parallel-size 2 --moe-router-type noisy_topk"),
    # expert choice selects each expert's tokens over the whole micro-batch (gathered gates)
    ("tp2-moe-sp-etp2-expert-choice", 2, MOE, "--tensor-model-parallel-size 2 --sequence-parallel "
     "--moe-router-type expert_choice --moe-aux-loss-coeff 0 --moe-expert-capacity-factor 1.0"),
]


def _worker(rank: int, world: int, scenarios: list) -> list:
    torch.use_deterministic_algorithms(True)
    out = []
    for _, _, base, extra in scenarios:
        cfg = make_config(extra, world_size=world, base=base)
        p = cfg.parallel
        groups = groups_from_mesh(p.expert_model_parallel_size, torch.device("cpu"), "gloo",
                                  pp_size=p.pipeline_model_parallel_size, tp_size=p.tensor_model_parallel_size,
                                  etp_size=p.expert_tensor_parallel_size)
        res = train_steps(cfg, groups, STEPS, keep_grads=False)
        res.update(tp_rank=groups.tp_rank, etp_rank=groups.etp.rank() if groups.etp else 0,
                   tp_size=groups.tp_size, etp_size=groups.etp_size)
        out.append(res)
    return out


@pytest.fixture(scope="module")
def results():
    return run_scenarios(_worker, SCENARIOS)


def expected_slice(name: str, whole: torch.Tensor, res: dict, swiglu: bool) -> torch.Tensor:
    """The slice of a single-process parameter that a rank holds."""
    if is_expert_param(name):
        whole = whole[res["expert_offset"]:]
    split = tensor_split(name, swiglu)
    if split is not None:
        rank, size = (res["etp_rank"], res["etp_size"]) if split.expert else (res["tp_rank"], res["tp_size"])
        whole = split.shard(whole, rank, size)
    return whole


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_tensor_parallel_equals_single_process(scenario, results):
    name, world, base, extra = scenario
    cfg = make_config(PARALLEL_FLAGS.sub("", extra), base=base)
    ref = train_steps(cfg, ProcessGroups(), STEPS)
    held = set()
    for res in results[name]:
        assert_same_curves(res, ref, name)
        for n, p in res["params"].items():
            expected = expected_slice(n, ref["params"][n], res, cfg.model.swiglu)[:p.shape[0]] \
                if is_expert_param(n) else expected_slice(n, ref["params"][n], res, cfg.model.swiglu)
            assert p.shape == expected.shape, (name, n, p.shape, expected.shape)
            if not n.endswith("k_layernorm.bias"):
                assert rel_diff(p, expected) < 1e-4, (name, n, rel_diff(p, expected))
            held.add(n)
        for n, b in res["buffers"].items():
            if n.endswith("expert_bias"):
                torch.testing.assert_close(b, ref["buffers"][n], rtol=1e-5, atol=1e-7)
    assert held == set(ref["params"]), (name, set(ref["params"]) - held)


# ---------------------------------------------------------------- dropout under tensor parallelism

DROPOUT = "--hidden-dropout 0.1 --attention-dropout 0.1 --tensor-model-parallel-size 2 --expert-tensor-parallel-size 1"


def _dropout_worker(rank: int, world: int) -> dict:
    """Three short runs on 2 TP ranks with dropout: sequence parallel with and without full
    recompute (the replayed masks must match), and without sequence parallelism (replicated
    activations: both ranks must draw the same hidden-dropout masks and stay identical)."""
    import torch.distributed as dist

    def run(extra: str) -> tuple[dict, ProcessGroups]:
        cfg = make_config(f"{DROPOUT} {extra}", world_size=world, base=MOE)
        groups = groups_from_mesh(1, torch.device("cpu"), "gloo", tp_size=2, etp_size=1)
        return train_steps(cfg, groups, 2, keep_grads=False), groups

    plain, _ = run("--sequence-parallel")
    recomputed, _ = run("--sequence-parallel --recompute-granularity full --recompute-method uniform "
                        "--recompute-num-layers 1")
    replicated, groups = run("")
    norms = torch.cat([p.reshape(-1) for n, p in replicated["params"].items() if "layernorm" in n])
    gathered = [torch.empty_like(norms) for _ in range(2)]
    dist.all_gather(gathered, norms, group=groups.tp)
    return dict(plain=plain["losses"] + plain["norms"], recomputed=recomputed["losses"] + recomputed["norms"],
                norm_copies_equal=bool(torch.equal(*gathered)))


def test_dropout_masks_replay_under_recompute_and_agree_where_replicated():
    from tests.distributed.harness import run_distributed

    for res in run_distributed(_dropout_worker, 2):
        for a, b in zip(res["plain"], res["recomputed"]):
            assert abs(a - b) <= 1e-6 * abs(b), (res["plain"], res["recomputed"])
        assert res["norm_copies_equal"]


# ---------------------------------------------------------------- bf16 under tensor parallelism

BF16 = "--bf16 --lr 1e-2 --tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1"


def _bf16_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    cfg = make_config(BF16, world_size=world, base=MOE)
    groups = groups_from_mesh(1, torch.device("cpu"), "gloo", tp_size=2, etp_size=1)
    res = train_steps(cfg, groups, STEPS, keep_grads=False)
    replicated = torch.cat([p.float().reshape(-1) for n, p in res["params"].items()
                            if "layernorm" in n or "router" in n])
    copies = [torch.empty_like(replicated) for _ in range(2)]
    dist.all_gather(copies, replicated, group=groups.tp)
    return dict(losses=res["losses"], dtypes={p.dtype for p in res["params"].values()},
                replicated_equal=bool(torch.equal(*copies)))


def test_bf16_tensor_parallel_tracks_one_process():
    """bf16 parameters with fp32 main gradients at T = 2 with sequence parallelism: the replicated
    parameters (norms, router) stay bit-identical across TP ranks, and the loss follows one bf16
    process (bf16 partial sums are added in another order, so only to bf16 precision)."""
    from tests.distributed.harness import run_distributed

    single = train_steps(make_config(BF16.replace("--tensor-model-parallel-size 2 --sequence-parallel "
                                                  "--expert-tensor-parallel-size 1", ""), base=MOE),
                         ProcessGroups(), STEPS, keep_grads=False)
    for res in run_distributed(_bf16_worker, 2):
        assert res["dtypes"] == {torch.bfloat16} and res["replicated_equal"]
        for a, b in zip(res["losses"], single["losses"]):
            assert abs(a - b) / b < 2e-3, (res["losses"], single["losses"])  # measured: 2e-4
