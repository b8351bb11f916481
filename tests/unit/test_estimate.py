"""tools/estimate.py: pipeline bubble and in-flight micro-batches, bytes per parameter of each
precision layout, the tied embedding's copy on the last stage, P = 1 figures, flag errors.

Expected values are computed here from the shape, independently of the tool's helpers.
"""

import importlib.util
import os
import shlex

import pytest

from megatron.training.arguments import config_from_args, parse_args

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "tools", "estimate.py")
_spec = importlib.util.spec_from_file_location("estimate_tool", _PATH)
est = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(est)

# L=4, D=64, H=G=4 (head dim 16), F=128, SwiGLU, no biases, E=4 experts of F=128, top-2,
# vocab 256 (already a multiple of 128), S=32.
L, D, F, E, K, VOCAB, S = 4, 64, 128, 4, 2, 256, 32
FLAGS = (f"--num-layers {L} --hidden-size {D} --ffn-hidden-size {F} --num-attention-heads 4 --seq-length {S} "
         f"--max-position-embeddings {S} --position-embedding-type rope --normalization RMSNorm --swiglu "
         f"--disable-bias-linear --num-experts {E} --moe-router-topk {K} --mock-data --vocab-size {VOCAB} "
         "--micro-batch-size 1 --global-batch-size 16 --train-iters 10 --lr 1e-4")
ATTN = 4 * D * D          # q, k, v (G = H) and output projection
ROUTER = D * E
EXPERT = 3 * D * F        # SwiGLU fc1 (2F) and fc2
LAYER = ATTN + ROUTER + E * EXPERT
EMBED = VOCAB * D


def cfg(extra: str = "", world: int = 1, untie: bool = True):
    flags = FLAGS + (" --untie-embeddings-and-output-weights" if untie else "") + " " + extra
    return config_from_args(parse_args(shlex.split(flags)), world_size=world)


def state_bytes(c, r: int = 0) -> float:
    mem = est.stage_memory(c, c.parallel.pipeline_layout(L), r)
    return mem["weights"] + mem["grads"] + mem["optimizer"]


def test_bubble_1f1b_and_interleaved():
    assert est.bubble_fraction(1, 1, 8) == 0
    assert est.bubble_fraction(4, 1, 8) == pytest.approx(3 / 11)       # (P-1)/(m+P-1)
    assert est.bubble_fraction(4, 2, 8) == pytest.approx(3 / 19)       # (P-1)/(V m+P-1)
    assert est.bubble_fraction(8, 4, 16) == pytest.approx(7 / 71)


def test_in_flight_micro_batches():
    assert [est.inflight_chunks(4, 1, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert est.inflight_chunks(4, 1, 2, 0) == 2                          # never more than m
    assert est.inflight_chunks(4, 2, 8, 0) == 2 * 3 + 4 + 1              # 2(P-1) + (V-1)P + 1
    assert est.inflight_chunks(4, 2, 8, 3) == 4 + 1
    assert est.inflight_chunks(4, 2, 4, 0) == 8                          # capped at m V


def test_bytes_per_parameter_of_each_precision_layout():
    local = 2 * EMBED + L * LAYER                                        # untied: embedding + output layer
    fp32 = cfg("", world=4)
    assert est.stage_memory(fp32, fp32.parallel.pipeline_layout(L), 0)["params"] == local
    assert state_bytes(fp32) == 16 * local
    assert state_bytes(cfg("--bf16", world=4)) == 18 * local
    assert state_bytes(cfg("--fp16", world=4)) == 18 * local
    assert state_bytes(cfg("--bf16 --use-distributed-optimizer", world=4)) == pytest.approx((2 + 4 + 12 / 4) * local)
    assert state_bytes(cfg("--use-distributed-optimizer", world=4)) == pytest.approx((4 + 4 + 8 / 4) * local)


def test_distributed_optimizer_shards_experts_over_expert_data_parallel_ranks():
    c = cfg("--bf16 --use-distributed-optimizer --expert-model-parallel-size 2", world=4)  # DP 4, EDP 2
    dense, expert = 2 * EMBED + L * (ATTN + ROUTER), L * E * EXPERT
    expected = 6 * (dense + expert / 2) + 12 * (dense / 4 + expert / 2 / 2)
    assert state_bytes(c) == pytest.approx(expected)


def test_tied_embedding_copy_on_last_stage():
    per_layer_dense = ATTN + ROUTER
    tied = cfg("--pipeline-model-parallel-size 2", world=2, untie=False)
    layout = tied.parallel.pipeline_layout(L)
    assert est.stage_params(tied.model, layout, 0) == (2 * per_layer_dense + EMBED, 2 * E * EXPERT)
    assert est.stage_params(tied.model, layout, 1) == (2 * per_layer_dense + EMBED, 2 * E * EXPERT)
    one = cfg("", world=1, untie=False)                                   # P = 1: a single shared copy
    assert est.stage_params(one.model, one.parallel.pipeline_layout(L), 0)[0] == L * per_layer_dense + EMBED
    total, _, _ = est.total_params(tied.model)
    assert total == L * LAYER + EMBED


def test_pipeline_stage_memory_and_worst_stage():
    c = cfg("--pipeline-model-parallel-size 2", world=2)                  # DP 1, m = 16
    r = est.estimate(c, 2, 1, 1.0, 8.0, 8.0, 0.0, True)
    assert (r["pp"], r["vp"], r["dp"], r["ep"], r["edp"]) == (2, 1, 1, 1, 1)
    assert r["bubble"] == pytest.approx(1 / 17)
    stage0 = r["stages"][0]
    T, b = S, 4
    # norm inputs + 1-byte dropout masks (hidden dropout 0.1), QKV input, attention core
    # (qkv 3D, q and k after RoPE 2D, SDPA output and projection input 2D), router input,
    # per routed copy: expert input D, SwiGLU 3F, the experts' output D and the combine's copy D
    per_layer = T * (2 * (D * b + D) + D * b + 7 * D * b + D * b + K * (3 * D + 3 * F) * b)
    backward = K * T * 3 * F * b          # widest backward working set: the experts' fc1-output and activation gradients
    assert stage0["activations"] == pytest.approx(2 * 2 * per_layer + backward)  # 2 micro-batches x 2 layers
    assert r["worst_stage"] == max(range(2), key=lambda i: r["stages"][i]["total_bytes"])


def test_loss_and_backward_working_sets_worked_example():
    """The last stage's loss terms and the backward working set of `stage_activation_parts`, by
    hand for a micro-batch of T = S tokens (T x V is far below the 2^27-element logits chunk)."""
    m, T = cfg("").model, S
    # forward: the input h, one fp32 logits chunk; in fp32 the dW accumulator is the kept copy
    assert est.loss_forward_bytes(m, T, 4) == T * D * 4 + T * VOCAB * 4
    # bf16: plus the bf16 matmul output before the fp32 cast, and 4 - 2 bytes a dW element
    assert est.loss_forward_bytes(m, T, 2) == T * D * 2 + T * VOCAB * (4 + 2) + VOCAB * D * 2
    # T = 2 (SP): this rank's V / 2 rows of the chunk; h is whole
    assert est.loss_forward_bytes(m, T, 4, est.TensorLayout(2, True)) == T * D * 4 + T * VOCAB * 4 / 2
    # kept per in-flight micro-batch: the final norm's input, dW (parameters' dtype) and dh
    assert est.loss_kept_bytes(m, T, 4) == T * D * 4 + VOCAB * D * 4 + T * D * 4
    assert est.loss_kept_bytes(m, T, 2, norm_keeps_output=True) == T * D * 8 + VOCAB * D * 2 + T * D * 2
    # backward: the experts' fc1-output (2F) and activation (F) gradients for K T rows (ETP: same bytes)
    assert est.layer_backward_bytes(m, 0, T, 4) == K * T * 3 * F * 4
    assert est.layer_backward_bytes(m, 0, T, 4, est.TensorLayout(2, True, 2)) == K * T / 2 * 3 * F * 4
    c = cfg("")
    parts = est.stage_activation_parts(c, c.parallel.pipeline_layout(L), 0, 4)
    assert parts["loss_forward"] == T * D * 4 + T * VOCAB * 4
    # plus the output layer's dW, less the loss's kept tensors that backward consumes first
    assert parts["backward"] == K * T * 3 * F * 4 + VOCAB * D * 4 - (T * D * 4 + VOCAB * D * 4 + T * D * 4)
    assert est.stage_memory(c, c.parallel.pipeline_layout(L), 0)["activations"] == \
        parts["kept"] + max(parts["loss_forward"], parts["backward"])


def test_p1_fp32_matches_the_figures_before_pipelines():
    """Hand-computed with the formulas of the tool before pipeline stages (unchanged for fp32, P = 1)."""
    c = cfg("--expert-model-parallel-size 2", world=2)
    r = est.estimate(c, 2, 1, 1.0, 8.0, 8.0, 0.0, True)                   # 1 TFLOP/s, 1 GB/s, no latency
    flops_token = 6 * (L * (ATTN + ROUTER + K * EXPERT) + EMBED) + 12 * L * S * D
    assert flops_token == 1775616
    assert r["compute_s"] == pytest.approx(1775616 * 256 / 1e12)          # 16 x 32 tokens over 2 GPUs
    # a2a: per exchange T K D b (EP-1)/EP = 32*2*64*4/2 = 8192 B; 4 exchanges x 4 layers x 8 micro-batches
    assert r["a2a_bytes_per_gpu"] == 128 * 8192
    assert r["step_s"] == pytest.approx(0.000454557696 + 128 * 8192 / 1e9)
    local = 2 * EMBED + L * (ATTN + ROUTER) + L * E * EXPERT / 2
    worst = r["stages"][0]
    assert (worst["weights"], worst["grads"], worst["optimizer"]) == (4 * local, 4 * local, 8 * local)


def test_recompute_full_keeps_layer_inputs_and_costs_a_forward():
    plain = est.estimate(cfg(""), 1, 1, 1.0, 8.0, 8.0, 0.0, True)
    full = est.estimate(cfg("--recompute-granularity full"), 1, 1, 1.0, 8.0, 8.0, 0.0, True)
    assert full["stages"][0]["activations"] < plain["stages"][0]["activations"]
    assert full["compute_s"] == pytest.approx(plain["compute_s"] + (
        2 * L * (ATTN + ROUTER + K * EXPERT) + 4 * L * S * D) * 16 * S / 1e12)
    assert full["mfu"] < plain["mfu"]


@pytest.mark.parametrize("extra, flag", [
    ("--pipeline-model-parallel-size 3", "--pipeline-model-parallel-size"),
    ("--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 3",
     "--virtual-pipeline-model-parallel-size"),
    ("--pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 5",
     "--decoder-first"),
])
def test_bad_pipeline_flag_exits_2_with_one_line(extra, flag, capsys):
    with pytest.raises(SystemExit) as e:
        est.main(["--gpus-per-node", "2"] + shlex.split(FLAGS + " " + extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("estimate.py: error:") and flag in err


def test_fit_finds_a_layout(capsys):
    est.main(["--fit", "0.01", "--max-gpus", "8", "--tflops", "1"] + shlex.split(FLAGS))
    out = capsys.readouterr().out
    assert "fits from" in out and "P=" in out


# ---------------------------------------------------------------- tensor and sequence parallelism

def test_tensor_parallel_halves_dense_parameter_bytes():
    """T = 2 halves attention and the embedding/output rows; the router stays whole; experts
    divide by EP x ETP (here ETP = 1 folded, EP = 2 over the two TP ranks)."""
    one = cfg("--bf16", world=2)                                                      # DP 2
    two = cfg("--bf16 --tensor-model-parallel-size 2 --expert-tensor-parallel-size 1 "
              "--expert-model-parallel-size 2", world=2)
    layout = one.parallel.pipeline_layout(L)
    assert est.stage_memory(one, layout, 0)["params"] == 2 * EMBED + L * LAYER
    split, router, experts = 2 * EMBED + L * ATTN, L * ROUTER, L * E * EXPERT
    assert est.stage_memory(two, layout, 0)["params"] == split / 2 + router + experts / 2
    assert state_bytes(two) == pytest.approx(18 * (split / 2 + router + experts / 2))
    etp2 = cfg("--tensor-model-parallel-size 2 --expert-tensor-parallel-size 2", world=2)   # EP 1, ETP 2
    assert est.stage_memory(etp2, layout, 0)["params"] == split / 2 + router + experts / 2


def test_sequence_parallel_divides_the_sequence_sharded_part_by_t():
    T, b = 2 * S, 2
    parts = {tl: est.layer_activation_parts(cfg("").model, 0, T, b, tl)
             for tl in (est.TensorLayout(1), est.TensorLayout(4), est.TensorLayout(4, True))}
    one, tp, sp = parts.values()
    assert tp["outside"] == one["outside"] and sp["outside"] == pytest.approx(one["outside"] / 4)
    assert one["outside"] == T * 2 * (D * b + D)          # two norm inputs + two 1-byte dropout masks
    for part in ("inside", "moe"):                         # the TP region and each rank's routed shard
        assert tp[part] == pytest.approx(one[part] / 4) and sp[part] == tp[part]
    assert tp["region_inputs"] == one["region_inputs"] == T * D * b   # QKV input, whole without SP
    assert sp["region_inputs"] == pytest.approx(one["region_inputs"] / 4)  # SP keeps the shard, re-gathers it


def test_tensor_parallel_communication_worked_example():
    """T = 4, micro-batch of 64 tokens, D = 64, bf16: X = 64 * 64 * 2 = 8 KiB per micro-batch."""
    m, T, b, X = cfg("").model, 2 * S, 2, 2 * S * D * 2
    assert est.ring_bytes("all_reduce", X, 4) == 2 * 3 / 4 * X == 12288
    assert est.ring_bytes("all_gather", X, 4) == est.ring_bytes("reduce_scatter", X, 4) == 6144
    dense_layer = [("fwd", "all_reduce", "tp", X), ("bwd", "all_reduce", "tp", X)] * 2
    no_sp, with_sp = est.TensorLayout(4), est.TensorLayout(4, True)
    dense = config_from_args(parse_args(shlex.split(FLAGS.replace(f"--num-experts {E} --moe-router-topk {K}", ""))),
                             world_size=1).model                                           # no experts
    assert est.layer_tp_collectives(dense, 0, T, b, no_sp) == [dense_layer[0], dense_layer[1]] * 2
    assert est.collective_bytes(est.layer_tp_collectives(dense, 0, T, b, no_sp), no_sp) == 4 * 12288
    # SP: an all-gather / reduce-scatter pair each way per region, and the re-gather of the kept shard
    assert est.collective_bytes(est.layer_tp_collectives(dense, 0, T, b, with_sp), with_sp) == 10 * 6144
    # MoE layer with SP: attention's 4 exchanges only (no aux loss here; with one, its E fp32
    # counts are all-reduced once); without SP the shard's output and input gradient are gathered
    moe_sp = est.layer_tp_collectives(m, 0, T, b, with_sp)
    assert est.collective_bytes(moe_sp, with_sp) == 5 * 6144
    assert est.collective_bytes(est.layer_tp_collectives(m, 0, T, b, no_sp), no_sp) == 2 * 12288 + 2 * 6144
    aux = cfg("--moe-aux-loss-coeff 1e-2").model
    assert est.collective_bytes(est.layer_tp_collectives(aux, 0, T, b, with_sp), with_sp) == 5 * 6144 + 1.5 * E * 4
    # ETP = 2: the K T / T routed rows gathered over ETP and reduce-scattered, forward and backward
    etp = est.TensorLayout(4, True, 2)
    rows = 2 * K * T / 4 * D * b
    extra = est.collective_bytes(est.layer_tp_collectives(m, 0, T, b, etp), etp) - est.collective_bytes(moe_sp, with_sp)
    assert extra == 4 * rows / 2


def test_estimate_reports_tp_bytes_and_fit_tries_tensor_parallel(capsys):
    c = cfg("--tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1", world=2)
    r = est.estimate(c, 2, 1, 1.0, 8.0, 8.0, 0.0, True)
    assert (r["tp"], r["sp"], r["etp"], r["dp"], r["edp"]) == (2, True, 1, 1, 2)
    b, m = 4, 16                                         # micro-batch of S tokens, DP 1: 16 micro-batches
    layer = 5 * (S * D * b) / 2                          # attention's AG/RS pairs and re-gather (no aux loss)
    ends = 2 * (S * D * b) / 2 + 2 * (S * D * b) / 2 + 2 * 3 * S * 4 / 2
    assert r["tp_bytes_per_gpu"] == pytest.approx(m * (L * layer + ends))
    worlds = {c.parallel.tensor_model_parallel_size for c in est.candidate_configs(cfg(""), 8)}
    assert worlds == {1, 2, 4}                          # 4 heads: T = 8 is refused by validate



# ---------------------------------------------------------------- --plan

HW = dict(tflops=1.0, intra_gbps=8.0, inter_gbps=2.0, alpha_us=100.0, overlap=True)


def every_layout(c, world: int, gpus_per_node: int):
    """All (P, V, T, ETP, EP, micro-batch, recompute) layouts, without the planner's pruning."""
    for P, V, ends in est.pipeline_shapes(L, world):
        for tp, etp, ep in est.tensor_layouts(c, world // P, max_tp=gpus_per_node):
            for mbs in est.MICRO_BATCH_SIZES:
                for name, training in est.RECOMPUTE.items():
                    d = est.with_layout(c, world, P, V, tp, etp, ep, mbs, training=training, ends=ends)
                    if d is not None:
                        yield name, est.estimate(d, gpus_per_node, world // gpus_per_node, **HW)


@pytest.mark.parametrize("budget_share", [1.0, 0.5, 0.3])
def test_plan_finds_the_fastest_layout_that_fits(budget_share):
    """The planner's pruning (least recompute that fits, stop at the first micro-batch size that
    does not fit) loses nothing: its best equals the fastest of every layout that fits."""
    c = cfg("--bf16", world=8)
    everything = list(every_layout(c, 8, 4))
    budget = budget_share * max(r["memory_gib"] for _, r in everything)
    fitting, tried, _ = est.plan(c, 2, 4, budget, **HW)
    brute = [r for _, r in everything if r["memory_gib"] <= budget]
    assert fitting and len(fitting) <= len(brute) and tried <= len(everything)
    assert all(r["memory_gib"] <= budget for r in fitting)
    assert [r["step_s"] for r in fitting] == sorted(r["step_s"] for r in fitting)
    assert fitting[0]["step_s"] == pytest.approx(min(r["step_s"] for r in brute))
    least = min(r["memory_gib"] for _, r in everything)
    none_fit, _, smallest = est.plan(c, 2, 4, 0.99 * least, **HW)
    assert none_fit == [] and smallest["memory_gib"] == pytest.approx(least)   # named in "nothing fits"
    shapes = {(r["pp"], r["vp"], r["tp"], r["ep"], r["etp"]) for _, r in everything}
    assert {(2, 2), (4, 1)} <= {(p, v) for p, v, *_ in shapes}     # interleaving is searched
    assert max(t for _, _, t, _, _ in shapes) == 4                # T stays within a node of 4


def test_uneven_pipeline_stages_when_p_does_not_divide_the_layers():
    """61 layers on 16 stages: 14 middle stages of 4, the first 2 and the last 3 (Megatron-LM's
    --decoder-first/last-pipeline-num-layers); 8 layers on 4 stages split evenly, with V in {1, 2}."""
    shapes = list(est.pipeline_shapes(61, 16))
    assert (16, 1, (2, 3)) in shapes and (1, 1, (None, None)) in shapes
    assert [s for s in est.pipeline_shapes(8, 4) if s[0] == 4] == [(4, 1, (None, None)), (4, 2, (None, None))]
    c = cfg("--bf16")                                   # L = 4 on P = 3: 1 + 2 + 1
    assert (3, 1, (1, 1)) in list(est.pipeline_shapes(L, 3))
    d = est.with_layout(c, 3, 3, ends=(1, 1))
    assert d.parallel.pipeline_layout(L).rank_layers(1) == [1, 2]
    flags = est.layout_flags(d)
    assert flags[flags.index("--decoder-first-pipeline-num-layers") + 1] == "1"


def test_plan_flags_rebuild_the_planned_layout():
    c = cfg("--bf16", world=8)
    budget = 0.4 * max(r["memory_gib"] for _, r in every_layout(c, 8, 4))
    fitting, _, _ = est.plan(c, 2, 4, budget, **HW)
    for r in fitting[:10]:
        flags = est.layout_flags(r["cfg"])
        again = config_from_args(parse_args(shlex.split(FLAGS + " --untie-embeddings-and-output-weights --bf16")
                                            + flags), world_size=8)
        assert again.parallel == r["cfg"].parallel and again.training == r["cfg"].training
    assert any(r["recompute"] != "none" for r in fitting)          # a tight budget needs recompute


def test_plan_command_line(capsys):
    est.main(["--plan", "--nodes", "2", "--gpus-per-node", "4", "--gpu-memory-gib", "1", "--top", "3",
              "--bf16"] + shlex.split(FLAGS))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("plan: 2 node(s) x 4 GPUs = 8")
    table = out[out.index(next(x for x in out if x.startswith("#  layout"))) + 1:]
    assert [x.split()[0] for x in table[:3]] == ["1", "2", "3"]
    assert any(x.startswith("flags of the best: --tensor-model-parallel-size") for x in out)
    with pytest.raises(SystemExit) as e:
        est.main(["--plan", "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory-gib", "1e-6"] + shlex.split(FLAGS))
    assert e.value.code == 1 and "nothing fits: the least memory is" in capsys.readouterr().out
