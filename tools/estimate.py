"""Back-of-the-envelope model of an MoE run: parameters, memory, FLOPs, all-to-all volume, step time.

    python tools/estimate.py --config configs/mixtral_8x7b.yaml --nodes 8 --gpus-per-node 8
    python tools/estimate.py --config configs/mixtral_8x7b.yaml --nodes 4 --pipeline-model-parallel-size 4
    python tools/estimate.py --config configs/mixtral_8x7b.yaml --nodes 2 --pipeline-model-parallel-size 2 \
        --tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1
    python tools/estimate.py --config configs/mixtral_8x7b.yaml --fit 76      # smallest world that fits
    python tools/estimate.py --config configs/mixtral_8x22b.yaml --plan --nodes 16 --gpus-per-node 8

--plan searches the layouts of the given GPUs (`plan`): pipeline stages P (uneven first/last
stages where P does not divide the layers) and virtual stages V, tensor-parallel T with sequence
parallelism inside a node, EP and ETP, micro-batch size and recompute (none, MoE layers, full),
keeping the config's precision, optimizer and global batch; drops layouts whose worst stage does
not fit --gpu-memory-gib less --memory-margin, ranks the rest by modelled step time, and prints
the best --top with memory, bubble, all-to-all and TP volume, step time, MFU and the exact
pretrain_gpt.py flags of the best (exit status 1 when nothing fits).
    python tools/estimate.py --config configs/tiny_moe.yaml --gpus-per-node 4 --expert-model-parallel-size 4 \
        --tflops 0.05 --intra-node-gbps 8 --alpha-us 200          # a CPU/gloo-sized "device"

Any training flag can follow (they override the config), the pipeline ones included
(`--pipeline-model-parallel-size`, `--virtual-pipeline-model-parallel-size`, ...). The model:

* layout: ranks ordered tp-cp-ep-dp-pp (CP = 1), so P pipeline stages are outermost and a stage's
  world / P ranks split as DP x T for attention and dense layers and as EDP x EP x ETP for the
  experts ("MoE parallel folding"; ETP = --expert-tensor-parallel-size, default T). Stage r holds
  the layers of `pipeline_layout(L).rank_layers(r)`; the embedding lives on the first stage, the
  output layer on the last; with tied embeddings and P > 1 the last stage keeps its own copy of
  the V x D word embedding (weights, gradients and optimizer state). Attention, dense FFNs,
  shared experts and the embedding / output vocabulary rows divide by T; the router is
  replicated; experts divide by EP x ETP. Norms, biases and a learned position table are not
  counted.
* bytes per parameter (weights + gradients + optimizer):
  fp32: 4 + 4 + 8 (AdamW moments) = 16;
  --bf16 / --fp16: 2 (half weights) + 4 (fp32 main_grad) + 12 (fp32 main weights + 2 moments) = 18;
  --use-distributed-optimizer divides the optimizer part by DP (dense) or EDP (experts).
* compute: per stage, 6 x its active parameters (+ the output layer on the last stage) plus
  12 S D per layer of attention, times the tokens of one data-parallel rank, / T, / achieved
  TFLOP/s (TP's smaller GEMMs running slower is not modelled);
  the slowest stage sets the pace. For P = 1 this is training FLOPs per token x tokens per GPU.
  Recompute adds the forward FLOPs it re-runs to the time (not to MFU's model FLOPs);
* all-to-all (alltoall dispatcher): per MoE layer and micro-batch, each rank sends and receives
  (T/TP)*K*D*b*(EP-1)/EP bytes (each TP rank routes its shard of the sequence) for dispatch and again for combine, and the backward pass repeats
  both: 4 exchanges (6 where recompute re-runs the layer's forward). Time = bytes / bandwidth + alpha * (EP - 1) per exchange, with the
  inter-node bandwidth once the EP group (EP x ETP consecutive ranks) spans nodes;
* tensor-parallel collectives (`layer_tp_collectives`, `ends_tp_collectives`): per layer and
  micro-batch, without SP 2 all-reduces forward (attention and FFN outputs) and 2 backward
  (their input gradients) of X = T D b; with SP an all-gather + reduce-scatter pair per region
  and direction, the same bytes. An MoE layer routes each rank's shard: without SP it
  all-gathers its output (and input gradient), with SP nothing; a shared expert is one more
  region; ETP > 1 all-gathers / reduce-scatters the routed rows over ETP. Embedding, output
  layer and the vocab-parallel loss (3 fp32 per token all-reduced) add per micro-batch. Each
  rank sends 2 (n-1)/n of an all-reduced tensor, (n-1)/n of a gathered output or a
  reduce-scattered input (ring); time = bytes / intra-node bandwidth + alpha per ring step, on
  the critical path like the all-to-all;
* pipeline bubble: idle fraction (P-1) / (V*m + P-1) for m micro-batches per step and V model
  chunks per rank (V = 1: plain 1F1B, (P-1)/(m+P-1)). The work of the slowest stage (compute
  and all-to-all, both per micro-batch on the critical path) is divided by (1 - bubble);
* pipeline P2P: per micro-batch and model chunk, T*D*b bytes forward and again backward to the
  neighbour stage (inter-node once a stage spans a node or more), added to the step;
* gradient reduction: ring all-reduce (or reduce-scatter + all-gather) of 2 * (n-1)/n of the
  fp32 gradient bytes over the data-parallel groups, assumed overlapped unless --no-overlap;
* activations (b = 2 bytes with --bf16/--fp16, else 4), per layer and micro-batch of T tokens and
  per rank, from this code's layer (`layer_activation_parts`, checked by
  benchmarks/tensor_parallel.py): outside the TP region the two norm inputs (T D b each) and,
  with --hidden-dropout > 0, two 1-byte masks, divided by T only with SP; the column-parallel
  layers' inputs (QKV, dense fc1, shared-expert fc1: T D b each), whole on every rank without
  SP, divided by T with SP (the layer keeps its shard and gathers it again in backward, as
  Megatron-LM does); inside, divided by T: the QKV output, q and k after RoPE, the
  SDPA output and the projection input (T (4H + 3G) d b with RoPE; flash-style SDPA keeps no
  S x S scores) and the FFN hidden (SwiGLU 3F, GELU 2F); in an MoE layer the router input and,
  per routed copy, the expert input, 3F_e (2F_e), the experts' output and the combine's
  scattered copy (plus the all-to-all's received copy with EP > 1 and the reduce-scattered one
  with ETP > 1), for the T / TP tokens each rank routes (ETP x the rows at F_e / ETP with
  ETP > 1). On CPU (`NORM_KEEPS_OUTPUT`) RMSNorm keeps an fp32 input and fp32 output (8 bytes
  an element whatever b). Korthikanti et al.'s
  34 + 5 a S / D (GELU, stored scores) is not used. `--recompute-granularity full` keeps only
  the input (T D b, / T with SP) of each recomputed run of layers plus one run's activations
  while it is recomputed; `--moe-layer-recompute` drops the router and expert term. Selective
  recompute is not modelled (SDPA stores no S x S scores, so there is little left to save).
* in-flight micro-batches: stage r of 1F1B holds min(P - r, m) micro-batches of activations of
  all its layers. The interleaved schedule warms up with 2 (P - r - 1) + (V - 1) P chunk-micro-
  batches and then keeps one more in flight, so stage r holds
  min(m V, 2 (P - r - 1) + (V - 1) P + 1) chunk-micro-batches, each 1/V of its layers
  (first stage: about (1 + (P - 1) / (P V)) times 1F1B's).
* last stage: per in-flight micro-batch the final norm's input and the fused output layer +
  cross-entropy's output-weight gradient (V / TP x D x b) and dh (T D b) (`loss_kept_bytes`);
  the [T, V] logits are never materialised;
* transients (`stage_activation_parts`): the peak is the kept activations plus the larger of
  two working sets that never overlap: the fused loss's forward (last stage,
  `loss_forward_bytes`: a logits chunk of at most 2^27 / TP fp32 elements (2^22 on CPU), its
  b-byte matmul output with --bf16, the fp32 dW accumulator, its input h) and a backward pass
  (the largest recomputed segment's activations, the widest layer's FFN gradients
  `layer_backward_bytes` (K T / TP x 3F_e for the experts), and on the last stage the output
  layer's dW (V / TP x D x b) less the loss's kept tensors it has consumed). Not modelled:
  routing imbalance (a rank with more than K T / EP routed rows keeps more; +2-8% of the MoE
  term at random init), the embedding's dense [V / TP, D] gradient at the end of a backward
  (below the peak: that micro-batch's activations are freed by then), the optimizer step's
  temporaries (fused AdamW has none outside its kernel; the measured peak never falls after the
  schedule), what gloo/NCCL and kernels allocate internally, allocator fragmentation.
  benchmarks/memory_model.py compares the whole-step peak with measurement (within 4%).
Per-GPU memory is the maximum over stages. benchmarks/SCALING.md compares the model with the
measured CPU weak scaling.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import NamedTuple, Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron.core.config import validate  # noqa: E402
from megatron.training.arguments import config_from_args, parse_args  # noqa: E402
from megatron.training.flops import active_params_per_layer, ffn_params, training_flops_per_token  # noqa: E402
from megatron.training.train import recompute_plan  # noqa: E402

GIB = 2**30
LOGITS_CHUNK = 2**27  # logits elements per chunk of the fused cross-entropy on a GPU


# ---------------------------------------------------------------- parameters and bytes per parameter

def expert_params_per_layer(model, layer: int) -> int:
    """All routed experts of `layer` (0 for a dense layer), EP = 1."""
    moe = model.moe
    if moe is None or not moe.is_moe_layer(layer):
        return 0
    return moe.num_experts * ffn_params(model, moe.ffn_hidden_size)


def dense_params_per_layer(model, layer: int) -> int:
    """Parameters of `layer` that every expert-parallel rank holds (attention, router, dense/shared FFN)."""
    moe = model.moe
    if moe is None or not moe.is_moe_layer(layer):
        return active_params_per_layer(model, layer)
    return active_params_per_layer(model, layer) - moe.router_topk * ffn_params(model, moe.ffn_hidden_size)


def total_params(model) -> tuple[int, int, int]:
    """(total, expert, non-expert) parameters of the whole model (EP = 1, one embedding copy if tied)."""
    D, V = model.hidden_size, model.vocab_size
    embed = D * V * (1 if not model.untie_embeddings_and_output_weights else 2)
    expert = sum(expert_params_per_layer(model, i) for i in range(model.num_layers))
    dense = sum(dense_params_per_layer(model, i) for i in range(model.num_layers))
    return embed + dense + expert, expert, embed + dense


def active_params(model) -> int:
    """Parameters one token uses (EP = 1): the word embedding and output layer (once if tied),
    attention, dense FFNs, and per MoE layer the router, the shared expert and K routed experts.
    Counts the embedding as the published "active" figures do (Mixtral 8x7B: 12.9B of 46.7B);
    like `total_params`, norms and biases are not counted (`norm_params`)."""
    D, V = model.hidden_size, model.vocab_size
    embed = D * V * (1 if not model.untie_embeddings_and_output_weights else 2)
    return embed + sum(active_params_per_layer(model, i) for i in range(model.num_layers))


def norm_params(model) -> int:
    """The norms' weights (and LayerNorm biases), which `total_params` and `active_params` leave
    out: two per layer, the final norm, and with --qk-layernorm a head-dim norm each for q and k."""
    per_norm = model.hidden_size * (2 if model.normalization == "LayerNorm" else 1)
    qk = 2 * model.kv_channels * (2 if model.normalization == "LayerNorm" else 1) if model.qk_layernorm else 0
    return model.num_layers * (2 * per_norm + qk) + per_norm


def precision_bytes(training) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per parameter before sharding: fp32 16, bf16/fp16 18."""
    if training.bf16 or training.fp16:
        return 2, 4, 12
    return 4, 4, 8


def stage_params(model, layout, r: int) -> tuple[int, int]:
    """(dense, expert) parameters of pipeline stage r; expert counts all experts (divide by EP)."""
    split, replicated, expert = stage_param_split(model, layout, r)
    return split + replicated, expert


def router_params_per_layer(model, layer: int) -> int:
    """The router's D x E weight (0 for a dense layer): replicated over tensor-parallel ranks."""
    moe = model.moe
    return model.hidden_size * moe.num_experts if moe is not None and moe.is_moe_layer(layer) else 0


def stage_param_split(model, layout, r: int) -> tuple[int, int, int]:
    """(split over TP, replicated over TP, expert) parameters of pipeline stage r, before sharding:
    attention, dense FFN, shared expert and the embedding / output layer vocabulary rows divide by
    T; the router is replicated (norms are not counted); experts divide by EP x ETP."""
    layers = layout.rank_layers(r)
    replicated = sum(router_params_per_layer(model, i) for i in layers)
    split = sum(dense_params_per_layer(model, i) for i in layers) - replicated
    expert = sum(expert_params_per_layer(model, i) for i in layers)
    D, V = model.hidden_size, model.vocab_size
    first, last = r == 0, r == layout.num_stages - 1
    if first:
        split += D * V  # word embedding
    if last and (model.untie_embeddings_and_output_weights or not first):
        split += D * V  # output layer, or the tied embedding's copy on the last stage
    return split, replicated, expert


def local_params(model, layout, r: int, tp: int, ep: int, etp: int) -> tuple[float, float]:
    """(dense, expert) parameters one GPU of stage r holds: split / T + replicated, experts / (EP x ETP)."""
    split, replicated, expert = stage_param_split(model, layout, r)
    return split / tp + replicated, expert / (ep * etp)


# ---------------------------------------------------------------- pipeline schedule

def bubble_fraction(P: int, V: int, m: int) -> float:
    """Idle fraction of a step: (P-1) / (V*m + P-1); V = 1 is plain 1F1B."""
    return (P - 1) / (V * m + P - 1)


def inflight_chunks(P: int, V: int, m: int, r: int) -> int:
    """Chunk-micro-batches whose activations stage r holds at its peak (each chunk = 1/V of its layers)."""
    if V == 1:
        return min(P - r, m)
    return min(m * V, 2 * (P - r - 1) + (V - 1) * P + 1)


# ---------------------------------------------------------------- activations

class TensorLayout(NamedTuple):
    """How one rank sees a layer: T tensor-parallel ranks, sequence parallelism (T > 1 only), ETP.
    (A NamedTuple: the tests load this script without registering it as a module.)"""

    tp: int = 1
    sp: bool = False
    etp: int = 1
    ep: int = 1

    @classmethod
    def of(cls, parallel) -> "TensorLayout":
        t = parallel.tensor_model_parallel_size
        return cls(t, parallel.sequence_parallel and t > 1, parallel.expert_tensor_size,
                   parallel.expert_model_parallel_size)


NORM_KEEPS_OUTPUT = False
"""Whether a norm keeps its normalised output beside its input for backward: not on CUDA (torch's
fused RMSNorm/LayerNorm keep the input and 1/rms), yes for RMSNorm on CPU (torch 2.13 composes it
from elementwise ops in fp32, so it keeps an fp32 copy of a bf16/fp16 input and the fp32
normalised input; benchmarks/tensor_parallel.py and benchmarks/memory_model.py set it)."""


def norm_bytes_per_element(model, b: int, norm_keeps_output: Optional[bool] = None) -> float:
    """Bytes one norm keeps for backward per element of its [tokens, D] input: the input (b), or
    with `NORM_KEEPS_OUTPUT` (CPU RMSNorm) the fp32 input and the fp32 normalised input."""
    keeps_output = NORM_KEEPS_OUTPUT if norm_keeps_output is None else norm_keeps_output
    return 2 * max(b, 4) if keeps_output and model.normalization == "RMSNorm" else b


def layer_activation_parts(model, layer: int, T: int, b: int, tl: TensorLayout = TensorLayout(),
                           moe_recompute: bool = False, norm_keeps_output: Optional[bool] = None) -> dict:
    """Bytes one layer keeps for backward for a micro-batch of T tokens, on one rank, by part:

    outside: the two norms' inputs (and outputs, `NORM_KEEPS_OUTPUT`) and the hidden-dropout masks
        (1 byte an element when --hidden-dropout > 0): T D per norm, divided by T only with SP;
    region_inputs: the inputs of the column-parallel layers (QKV, dense fc1, shared-expert fc1),
        T D each: replicated without SP; with SP only the shard is kept (the layer all-gathers it
        again in backward, as Megatron-LM does), so divided by T;
    inside: attention core and FFN hidden, divided by T: the fused QKV output ((H + 2G) d; V is a
        view of it), q and k after RoPE ((H + G) d), the SDPA output and the output projection's
        input (2 H d), no S x S scores (flash-style SDPA); dense or shared FFN 3F (SwiGLU: fc1
        output 2F, activation F) or 2F (GELU);
    moe: router input D and, per routed copy, expert input D, fc1 output and activation 3F_e/ETP
        (2F_e/ETP with GELU), the experts' output D and the combine's scattered copy D (the
        weighted sum over K keeps it), for the T/T tokens each rank routes (its sequence shard,
        with or without SP); with ETP > 1 each rank computes the ETP-gathered tokens of its
        group, ETP x the rows at 1/ETP of the width, and keeps the reduce-scattered output D;
        with EP > 1 the combine's all-to-all output D is kept too. The copies beside the
        scattered one are kept by `index_copy`'s autograd, which saves its source (the
        dispatcher scatters with it after the experts, after the ETP reduce-scatter and after
        the all-to-all), on any device (measured, benchmarks/memory_model.py).
    """
    D, d = model.hidden_size, model.kv_channels
    H, G = model.num_attention_heads, model.num_query_groups
    t, etp = tl.tp, tl.etp
    outside_tokens = T / t if tl.sp else T
    per_norm = D * norm_bytes_per_element(model, b, norm_keeps_output)
    mask = D if model.hidden_dropout > 0 else 0
    outside = outside_tokens * 2 * (per_norm + mask)
    rope = (H + G) * d if model.position_embedding_type == "rope" else 0
    inside = T * ((H + 2 * G) * d + rope + 2 * H * d) * b / t
    region_tokens = T / t if tl.sp else T
    region = region_tokens * D * b
    ffn_width = 3 if model.swiglu else 2
    moe = model.moe
    moe_part = 0.0
    if moe is None or not moe.is_moe_layer(layer):
        region += region_tokens * D * b
        inside += T * ffn_width * model.ffn_hidden_size * b / t
    else:
        if moe.shared_expert_ffn_hidden_size:
            region += region_tokens * D * b
            inside += T * ffn_width * moe.shared_expert_ffn_hidden_size * b / t
        if not moe_recompute:
            routed = T / t
            combine = etp * D + D + (D if tl.ep > 1 else 0) + (D if etp > 1 else 0)
            moe_part = routed * D * b + moe.router_topk * routed * (
                etp * D + ffn_width * moe.ffn_hidden_size + combine) * b
    return {"outside": outside, "region_inputs": region, "inside": inside, "moe": moe_part}


def layer_activation_bytes(model, layer: int, T: int, b: int, moe_recompute: bool = False,
                           tl: TensorLayout = TensorLayout()) -> float:
    """Activations one layer keeps for backward for a micro-batch of T tokens (one rank)."""
    return sum(layer_activation_parts(model, layer, T, b, tl, moe_recompute).values())


def chunk_recompute(cfg, layers: list[int]) -> tuple[tuple[tuple[int, int], ...], list[int]]:
    """(the chunk's whole-layer recompute segments, as [start, end) positions in `layers`; the
    layers whose forward, or part of it, backward re-runs), from the plan the model builds."""
    if not layers:
        return (), []
    plan = recompute_plan(cfg, len(layers))
    in_segment = {j for a, z in plan.full_segments for j in range(a, z)}
    return plan.full_segments, [i for j, i in enumerate(layers) if j in in_segment or plan.per_layer[j]]


def chunk_activation_bytes(cfg, layers: list[int], T: int, b: int) -> tuple[float, float]:
    """(kept per micro-batch, transient once) activation bytes of one model chunk under the recompute
    flags: a recomputed segment keeps only its input, and re-creates its layers' activations once;
    `--moe-layer-recompute` re-creates one MoE layer's router and expert activations at a time
    (on top of its segment's, when both are on)."""
    model, tl = cfg.model, TensorLayout.of(cfg.parallel)
    moe_recompute = cfg.training.moe_layer_recompute
    full = [layer_activation_bytes(model, i, T, b, moe_recompute, tl) for i in layers]
    segments, _ = chunk_recompute(cfg, layers)
    in_segment = {j for a, z in segments for j in range(a, z)}
    segment_input = T * model.hidden_size * b / (tl.tp if tl.sp else 1)  # x_BsD under SP
    kept = len(segments) * segment_input + sum(f for j, f in enumerate(full) if j not in in_segment)
    moe_again = max((layer_activation_parts(model, i, T, b, tl)["moe"] for i in layers), default=0.0) \
        if moe_recompute else 0.0
    return kept, max((sum(full[a:z]) for a, z in segments), default=0.0) + moe_again


def layer_backward_bytes(model, layer: int, T: int, b: int, tl: TensorLayout = TensorLayout()) -> float:
    """The widest gradient working set of one layer's backward for a micro-batch of T tokens (one
    rank): the gradients of the FFN's fc1 output and of its activation, alive together while the
    FFN's backward runs (SwiGLU 2F + F, GELU F + F): for the experts K T/T routed rows x 3F_e
    (ETP x the rows at F_e/ETP: the same bytes), for a dense or shared FFN T x 3F/T. Attention's
    gradients (T (4H + 3G) d b / T at most) are narrower in every config here."""
    moe, width = model.moe, (3 if model.swiglu else 2)
    if moe is None or not moe.is_moe_layer(layer):
        return T * width * model.ffn_hidden_size * b / tl.tp
    routed = moe.router_topk * T / tl.tp * width * moe.ffn_hidden_size * b
    shared = T * width * (moe.shared_expert_ffn_hidden_size or 0) * b / tl.tp
    return max(routed, shared)


def loss_kept_bytes(model, T: int, b: int, tl: TensorLayout = TensorLayout(),
                    norm_keeps_output: Optional[bool] = None) -> float:
    """What the last stage keeps per in-flight micro-batch after its layers: the final norm's
    input (`norm_bytes_per_element`, / T with SP) and the fused output layer + cross-entropy's
    dW of this rank's V/T rows (in the parameters' dtype) and dh of all T tokens."""
    D, V = model.hidden_size, model.vocab_size
    norm_tokens = T / tl.tp if tl.sp else T
    return (norm_tokens * D * norm_bytes_per_element(model, b, norm_keeps_output)
            + V * D * b / tl.tp + T * D * b)


def loss_forward_bytes(model, T: int, b: int, tl: TensorLayout = TensorLayout()) -> float:
    """The fused loss's forward working set beyond what it keeps: its input h (T D b, all tokens),
    one logits chunk of min(T V, LOGITS_CHUNK) / T fp32 elements (plus the b-byte matmul output
    before the fp32 cast with --bf16/--fp16), and the fp32 dW accumulator in place of the b-byte
    copy it keeps."""
    D, V = model.hidden_size, model.vocab_size
    chunk = min(T * V, LOGITS_CHUNK) / tl.tp
    return T * D * b + chunk * (4 + (b if b < 4 else 0)) + V * D * (4 - b) / tl.tp


def stage_activation_parts(cfg, layout, r: int, b: int) -> dict:
    """Activation bytes of one GPU of stage r at its peak, by term:

    kept: the in-flight chunk-micro-batches' kept activations (`inflight_chunks` x the chunk's
        `chunk_activation_bytes`), on the last stage plus `loss_kept_bytes` per in-flight
        micro-batch;
    loss_forward: the last stage's fused-loss forward working set (`loss_forward_bytes`);
    backward: the backward working set: the largest recomputed segment's activations, the
        widest layer's gradients (`layer_backward_bytes`), and on the last stage the output
        layer's weight gradient (V/T x D x b; with tied weights on a stage that also holds the
        embedding it waits for the embedding's gradient through the whole backward) less the
        loss's kept tensors of the micro-batch being back-propagated (its first backward node
        consumes and frees them).
    The peak is kept + max(loss_forward, backward): the loss's forward and a backward pass do
    not overlap."""
    m, t = cfg.model, cfg.training
    P, V, mb = layout.num_stages, layout.num_chunks, cfg.num_microbatches
    T = t.micro_batch_size * m.seq_length
    tl = TensorLayout.of(cfg.parallel)
    chunks = [chunk_activation_bytes(cfg, list(layout.layers(k)), T, b) for k in layout.virtual_stages(r)]
    inflight = inflight_chunks(P, V, mb, r)
    kept = inflight * sum(k for k, _ in chunks) / V
    widest = max((layer_backward_bytes(m, i, T, b, tl) for i in layout.rank_layers(r)), default=0.0)
    backward = max(transient for _, transient in chunks) + widest
    forward = 0.0
    if r == P - 1:
        kept += inflight / V * loss_kept_bytes(m, T, b, tl)
        forward = loss_forward_bytes(m, T, b, tl)
        backward = max(0.0, backward + m.vocab_size * m.hidden_size * b / tl.tp - loss_kept_bytes(m, T, b, tl))
    return {"kept": kept, "loss_forward": forward, "backward": backward}


def stage_activation_bytes(cfg, layout, r: int, b: int) -> float:
    """Peak activation bytes of one GPU of stage r (`stage_activation_parts`)."""
    parts = stage_activation_parts(cfg, layout, r, b)
    return parts["kept"] + max(parts["loss_forward"], parts["backward"])


# ---------------------------------------------------------------- tensor-parallel communication

def ring_bytes(op: str, payload: float, n: int) -> float:
    """Bytes one rank sends in a ring collective over n ranks: all-reduce 2 (n-1)/n of the
    tensor, all-gather (n-1)/n of the gathered output, reduce-scatter (n-1)/n of the full input."""
    if n <= 1:
        return 0.0
    return payload * (2 if op == "all_reduce" else 1) * (n - 1) / n


def _region(phase_ops: str, X: float) -> list[tuple[str, str, str, float]]:
    """One column-parallel -> row-parallel region (attention, dense FFN, shared expert)."""
    if phase_ops == "sp":  # all-gather in, reduce-scatter out; backward the mirror, and the
        # column-parallel layer gathers its kept shard again for the weight gradient
        return [("fwd", "all_gather", "tp", X), ("fwd", "reduce_scatter", "tp", X),
                ("bwd", "reduce_scatter", "tp", X), ("bwd", "all_gather", "tp", X),
                ("bwd", "all_gather", "tp", X)]
    return [("fwd", "all_reduce", "tp", X), ("bwd", "all_reduce", "tp", X)]


def layer_tp_collectives(model, layer: int, T: int, b: int, tl: TensorLayout) -> list[tuple[str, str, str, float]]:
    """The tensor-parallel collectives of one layer for a micro-batch of T tokens, as (phase,
    op, group, payload bytes); payload = the all-reduced tensor, the gathered output, the
    reduce-scattered input. X = T D b is one micro-batch's hidden states.

    Without SP: attention and a dense FFN each all-reduce X forward (row-parallel output) and
    backward (column-parallel input gradient). With SP each region all-gathers X before the
    column-parallel layer and reduce-scatters after the row-parallel one, and backward mirrors
    them, plus one more all-gather in backward (the column-parallel layer keeps only its input
    shard and gathers it again for the weight gradient): 5/4 of the all-reduces' bytes. An MoE layer routes each rank's
    sequence shard: without SP it all-gathers its output forward and its input gradient
    backward; with SP it needs nothing over TP; a shared expert is one more region. With
    ETP > 1 the routed copies (K T / T rows a rank, D wide) are all-gathered over ETP after
    dispatch and reduce-scattered before combine, mirrored in backward. The router adds
    all-reduces of its expert counts (aux loss) and all-gathers of its choices (capacity)."""
    t, etp = tl.tp, tl.etp
    X = T * model.hidden_size * b
    mode = "sp" if tl.sp else "ar"
    out = _region(mode, X) if t > 1 else []
    moe = model.moe
    if moe is None or not moe.is_moe_layer(layer):
        return out + (_region(mode, X) if t > 1 else [])
    if t > 1:
        if not tl.sp:
            out += [("fwd", "all_gather", "tp", X), ("bwd", "all_gather", "tp", X)]
        if moe.shared_expert_ffn_hidden_size:
            out += _region(mode, X)
        if moe.load_balancing_type in ("aux_loss", "seq_aux_loss") and moe.aux_loss_coeff:
            rows = T // model.seq_length if moe.load_balancing_type == "seq_aux_loss" else 1
            out.append(("fwd", "all_reduce", "tp", rows * moe.num_experts * 4))
        if moe.capacity_factor is not None and moe.capacity_factor > 0:
            out += [("fwd", "all_gather", "tp", T * moe.router_topk * 4),   # fp32 probabilities
                    ("fwd", "all_gather", "tp", T * moe.router_topk * 8)]   # int64 expert ids
    if etp > 1:
        rows = etp * moe.router_topk * T / t * model.hidden_size * b
        out += [("fwd", "all_gather", "etp", rows), ("fwd", "reduce_scatter", "etp", rows),
                ("bwd", "reduce_scatter", "etp", rows), ("bwd", "all_gather", "etp", rows)]
    return out


def ends_tp_collectives(model, T: int, b: int, tl: TensorLayout, first: bool, last: bool
                        ) -> list[tuple[str, str, str, float]]:
    """Embedding (first stage) and output layer + vocab-parallel loss (last stage) collectives
    for one micro-batch: the embedding's partial rows are all-reduced (SP: reduce-scattered,
    all-gathered back in backward); the output layer's input is all-reduced in backward (SP:
    all-gathered forward, reduce-scattered backward); the fused loss all-reduces, per chunk of
    tokens, the row maxima and then the sums of exponentials and target logits (3 fp32 a token)."""
    if tl.tp <= 1:
        return []
    X = T * model.hidden_size * b
    out = []
    if first:
        out += ([("fwd", "reduce_scatter", "tp", X), ("bwd", "all_gather", "tp", X)] if tl.sp
                else [("fwd", "all_reduce", "tp", X)])
    if last:
        out += ([("fwd", "all_gather", "tp", X), ("bwd", "reduce_scatter", "tp", X)] if tl.sp
                else [("bwd", "all_reduce", "tp", X)])
        out += [("fwd", "all_reduce", "tp", T * 4), ("fwd", "all_reduce", "tp", 2 * T * 4)]
    return out


def collective_bytes(colls, tl: TensorLayout, phases=("fwd", "bwd")) -> float:
    """Bytes one rank sends for `colls` (ring algorithms)."""
    size = {"tp": tl.tp, "etp": tl.etp}
    return sum(ring_bytes(op, payload, size[g]) for ph, op, g, payload in colls if ph in phases)


def collective_seconds(colls, tl: TensorLayout, gbps: float, alpha_us: float, phases=("fwd", "bwd")) -> float:
    """Bytes / bandwidth plus alpha per ring step (2 (n-1) for an all-reduce, n-1 otherwise)."""
    size = {"tp": tl.tp, "etp": tl.etp}
    steps = sum((2 if op == "all_reduce" else 1) * (size[g] - 1) for ph, op, g, _ in colls if ph in phases)
    return collective_bytes(colls, tl, phases) / (gbps * 1e9 / 8) + alpha_us * 1e-6 * steps


# ---------------------------------------------------------------- per-stage memory and time

def stage_memory(cfg, layout, r: int) -> dict:
    """Bytes of weights, gradients, optimizer state and activations on one GPU of stage r."""
    p, t = cfg.parallel, cfg.training
    tp, ep, etp = p.tensor_model_parallel_size, p.expert_model_parallel_size, p.expert_tensor_size
    dp = p.data_parallel_size
    edp = p.world_size // p.pipeline_model_parallel_size // (ep * etp)
    dense, expert = local_params(cfg.model, layout, r, tp, ep, etp)
    local = dense + expert
    w, g, o = precision_bytes(t)
    shard, shard_e = (dp, edp) if p.use_distributed_optimizer else (1, 1)
    b = 2 if (t.bf16 or t.fp16) else 4
    act = stage_activation_parts(cfg, layout, r, b)
    return {"stage": r, "params": local, "weights": w * local, "grads": g * local,
            "optimizer": o * (dense / shard + expert / shard_e),
            "activations": act["kept"] + max(act["loss_forward"], act["backward"]), "activation_parts": act}


def stage_flops_per_token(model, layout, r: int) -> float:
    """Training FLOPs per token of stage r (sums to training_flops_per_token over stages)."""
    S, D = model.seq_length, model.hidden_size
    layers = layout.rank_layers(r)
    flops = sum(6.0 * active_params_per_layer(model, i) + 12 * S * D for i in layers)
    if r == layout.num_stages - 1:
        flops += 6.0 * D * model.vocab_size
    return flops


def recomputed_layers(cfg, layout, r: int) -> list[int]:
    """Layers of stage r whose forward (or part of it) backward re-runs."""
    return [i for k in layout.virtual_stages(r) for i in chunk_recompute(cfg, list(layout.layers(k)))[1]]


def recompute_flops_per_token(cfg, layout, r: int) -> float:
    """Extra forward FLOPs per token that stage r spends re-running what the recompute flags drop
    (a forward pass is a third of training FLOPs: 2 x parameters + 4 S D of attention per layer)."""
    model, training = cfg.model, cfg.training
    S, D, moe = model.seq_length, model.hidden_size, model.moe
    redo = recomputed_layers(cfg, layout, r)
    if training.recompute_granularity == "full":
        return sum(2.0 * active_params_per_layer(model, i) + 4 * S * D for i in redo)
    if training.recompute_granularity == "selective":
        return 4.0 * S * D * len(redo)  # the attention core
    if moe is None:
        return 0.0
    expert = 2.0 * (moe.router_topk * ffn_params(model, moe.ffn_hidden_size)
                    + ffn_params(model, moe.shared_expert_ffn_hidden_size or 0))
    return expert * sum(1 for i in redo if moe.is_moe_layer(i))


def exchange_seconds(nbytes: float, peers: int, gbps: float, alpha_us: float) -> float:
    return nbytes / (gbps * 1e9 / 8) + alpha_us * 1e-6 * peers


def estimate(cfg, gpus_per_node: int, nodes: int, tflops: float, intra_gbps: float, inter_gbps: float,
             alpha_us: float, overlap: bool, peak_tflops: float = 989.0) -> dict:
    m, t, p = cfg.model, cfg.training, cfg.parallel
    world = gpus_per_node * nodes
    layout = p.pipeline_layout(m.num_layers)
    P, V = layout.num_stages, layout.num_chunks
    tl = TensorLayout.of(p)
    tp, ep, etp = tl.tp, p.expert_model_parallel_size, tl.etp
    stage_ranks = world // P
    dp = stage_ranks // tp
    edp = stage_ranks // (ep * etp)
    mb = cfg.num_microbatches
    b = 2 if (t.bf16 or t.fp16) else 4
    tokens_per_dp_rank = t.global_batch_size * m.seq_length / dp
    flops_token = training_flops_per_token(m)

    T = t.micro_batch_size * m.seq_length
    K = m.moe.router_topk if m.moe else 0
    per_exchange = T / tp * K * m.hidden_size * b * (ep - 1) / ep  # each rank routes its T / TP tokens
    spans_nodes = ep * etp > gpus_per_node  # the EP group strides over ETP consecutive ranks
    a2a_gbps = inter_gbps if spans_nodes else intra_gbps
    tp_gbps = inter_gbps if tp > gpus_per_node else intra_gbps
    stage_span_nodes = stage_ranks > gpus_per_node  # a stage's DP group (and the P2P neighbour) leaves the node
    dp_gbps = inter_gbps if stage_span_nodes else intra_gbps

    stages = []
    for r in range(P):
        layers = layout.rank_layers(r)
        moe_layers = sum(1 for i in layers if m.moe and m.moe.is_moe_layer(i))
        exchanges = 4 * moe_layers * mb  # dispatch + combine, forward and backward
        redo = recomputed_layers(cfg, layout, r) if (t.recompute_granularity == "full"
                                                      or t.moe_layer_recompute) else []
        if redo:  # a re-run forward exchanges twice more
            exchanges += 2 * mb * sum(1 for i in redo if m.moe and m.moe.is_moe_layer(i))
        flops = stage_flops_per_token(m, layout, r) + recompute_flops_per_token(cfg, layout, r)
        compute_s = flops * tokens_per_dp_rank / tp / (tflops * 1e12)
        a2a_bytes = exchanges * per_exchange
        a2a_s = exchanges * exchange_seconds(per_exchange, ep - 1, a2a_gbps, alpha_us) if ep > 1 else 0.0
        colls = [c for i in layers for c in layer_tp_collectives(m, i, T, b, tl)]
        colls += ends_tp_collectives(m, T, b, tl, r == 0, r == P - 1)
        # whole-layer recompute re-runs the layers' forward collectives (MoE-only recompute: the
        # FFN's, approximated by the layer's)
        again = [c for i in redo for c in layer_tp_collectives(m, i, T, b, tl) if c[0] == "fwd"] \
            if t.recompute_granularity == "full" else []
        tp_bytes = mb * (collective_bytes(colls, tl) + collective_bytes(again, tl))
        tp_s = mb * (collective_seconds(colls, tl, tp_gbps, alpha_us) + collective_seconds(again, tl, tp_gbps, alpha_us))
        dense, expert = local_params(m, layout, r, tp, ep, etp)
        grad_bytes = 4 * (dense * 2 * (dp - 1) / dp + expert * 2 * (edp - 1) / edp)
        mem = stage_memory(cfg, layout, r)
        stages.append({**mem, "compute_s": compute_s, "a2a_bytes": a2a_bytes, "a2a_s": a2a_s,
                       "tp_bytes": tp_bytes, "tp_s": tp_s,
                       "grad_bytes": grad_bytes, "total_bytes": sum(mem[k] for k in MEMORY_PARTS)})

    slow = max(stages, key=lambda s: s["compute_s"] + s["a2a_s"] + s["tp_s"])
    bubble = bubble_fraction(P, V, mb)
    p2p_bytes = 2 * mb * V * T * m.hidden_size * b / (tp if tl.sp else 1) if P > 1 else 0.0
    p2p_s = exchange_seconds(p2p_bytes, 2 * mb * V, inter_gbps if stage_ranks >= gpus_per_node else intra_gbps,
                             alpha_us) if P > 1 else 0.0
    grad_bytes = max(s["grad_bytes"] for s in stages)
    grad_s = grad_bytes / (dp_gbps * 1e9 / 8)
    step_s = (slow["compute_s"] + slow["a2a_s"] + slow["tp_s"]) / (1 - bubble) + p2p_s + (0.0 if overlap else grad_s)
    worst = max(stages, key=lambda s: s["total_bytes"])
    total, expert, dense = total_params(m)
    tokens_per_gpu = t.global_batch_size * m.seq_length / world
    return {
        "world": world, "mbs": t.micro_batch_size, "pp": P, "vp": V,
        "stage_ends": (p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers), "tp": tp, "sp": tl.sp, "etp": etp,
        "dp": dp, "ep": ep, "edp": edp, "microbatches": mb,
        "precision": "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32",
        "distributed_optimizer": p.use_distributed_optimizer,
        "total_params": total, "active_params": active_params(m), "active_params_per_token": flops_token / 6,
        "local_params": worst["params"], "tokens_per_gpu_per_step": tokens_per_gpu,
        "compute_s": slow["compute_s"], "a2a_bytes_per_gpu": slow["a2a_bytes"], "a2a_s": slow["a2a_s"],
        "a2a_inter_node": spans_nodes, "tp_bytes_per_gpu": slow["tp_bytes"], "tp_s": slow["tp_s"],
        "bubble": bubble, "p2p_bytes_per_gpu": p2p_bytes, "p2p_s": p2p_s,
        "grad_reduce_bytes_per_gpu": grad_bytes, "grad_reduce_s": grad_s, "step_s": step_s,
        "tokens_per_s": t.global_batch_size * m.seq_length / step_s,
        "stages": stages, "worst_stage": worst["stage"],
        "memory_gib": worst["total_bytes"] / GIB,
        "mfu": flops_token * tokens_per_gpu / step_s / (peak_tflops * 1e12),
    }


MEMORY_PARTS = ("weights", "grads", "optimizer", "activations")


# ---------------------------------------------------------------- --fit: smallest world that fits

def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


TP_SIZES = (1, 2, 4, 8)
MICRO_BATCH_SIZES = (1, 2, 4, 8)


def with_layout(cfg, world: int, P: int = 1, V: int = 1, tp: int = 1, etp: int = 1, ep: int = 1,
                mbs: Optional[int] = None, training: Optional[dict] = None, parallel: Optional[dict] = None,
                ends: tuple = (None, None)):
    """`cfg` on `world` GPUs with P pipeline stages of V model chunks each (`ends`: the first and
    last stages' layers when the split is uneven), T tensor-parallel
    ranks (sequence-parallel when T > 1, as Megatron-LM requires for MoE), EP x ETP expert ranks
    and micro-batch size `mbs`; `training` / `parallel` override further fields. None when
    `validate` refuses the layout."""
    layers_per_chunk = cfg.model.num_layers // (P * V) if V > 1 and ends == (None, None) else None
    par = dataclasses.replace(
        cfg.parallel, world_size=world, pipeline_model_parallel_size=P, expert_model_parallel_size=ep,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1, expert_tensor_parallel_size=etp,
        virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=layers_per_chunk,
        decoder_first_pipeline_num_layers=ends[0], decoder_last_pipeline_num_layers=ends[1], **(parallel or {}))
    tr = dataclasses.replace(cfg.training, micro_batch_size=mbs or cfg.training.micro_batch_size, **(training or {}))
    c = dataclasses.replace(cfg, parallel=par, training=tr)
    try:
        validate(c)
    except ValueError:
        return None
    return c


def tensor_layouts(cfg, stage_ranks: int, max_tp: int = max(TP_SIZES)):
    """(T, ETP, EP) splits of one stage's ranks: T in {1, 2, 4, 8} up to `max_tp`, ETP in {1, T},
    EP dividing the experts with EP x ETP dividing the stage's ranks."""
    experts = cfg.model.moe.num_experts if cfg.model.moe else 1
    for tp in (x for x in TP_SIZES if stage_ranks % x == 0 and x <= max_tp):
        for etp in sorted({1, tp}) if cfg.model.moe else [tp]:
            for ep in (e for e in divisors(experts) if stage_ranks % (e * etp) == 0):
                yield tp, etp, ep


def candidate_configs(cfg, world: int):
    """Every layout of `world` GPUs for --fit: P (dividing world and the layers), `tensor_layouts`,
    distributed optimizer on/off, fp32/bf16, micro-batch sizes 1..8 keeping the global batch.
    Plain 1F1B with even stages (interleaving only adds activations); recompute flags are kept
    as given. Layouts that `validate` refuses are skipped."""
    for P in divisors(world):
        if cfg.model.num_layers % P:
            continue
        for tp, etp, ep in tensor_layouts(cfg, world // P):
            for dist in (False, True):
                for half in (False, True):
                    for mbs in MICRO_BATCH_SIZES:
                        c = with_layout(cfg, world, P, 1, tp, etp, ep, mbs,
                                        training={"bf16": half, "fp16": False},
                                        parallel={"use_distributed_optimizer": dist})
                        if c is not None:
                            yield c


def fit(cfg, budget_gib: float, gpus_per_node: int, max_gpus: int, **kw) -> list[tuple[int, dict, dict]]:
    """Per world size (powers of two): (world, smallest-memory estimate, fastest estimate that fits or None)."""
    rows = []
    world = 1
    while world <= max_gpus:
        nodes, gpn = (world // gpus_per_node, gpus_per_node) if world >= gpus_per_node else (1, world)
        results = [estimate(c, gpn, nodes, **kw) for c in candidate_configs(cfg, world)]
        if results:
            smallest = min(results, key=lambda r: r["memory_gib"])
            fitting = [r for r in results if r["memory_gib"] <= budget_gib]
            rows.append((world, smallest, max(fitting, key=lambda r: r["tokens_per_s"]) if fitting else None))
            if fitting:
                break
        world *= 2
    return rows


# ---------------------------------------------------------------- --plan: the fastest layout that fits

_NO_RECOMPUTE = dict(moe_layer_recompute=False, recompute_granularity=None, recompute_method=None,
                     recompute_num_layers=None)
RECOMPUTE = {
    "none": _NO_RECOMPUTE,
    "moe": {**_NO_RECOMPUTE, "moe_layer_recompute": True},
    "full": {**_NO_RECOMPUTE, "recompute_granularity": "full", "recompute_method": "uniform",
             "recompute_num_layers": 1},
}
"""Recompute choices, in order of memory saved (and time added), each setting every recompute
field: none, the MoE layers (--moe-layer-recompute), every layer (full, uniform runs of one layer)."""

PLANNER_CHOOSES = dict(
    tensor_model_parallel_size=1, sequence_parallel=False, pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
    decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
    expert_model_parallel_size=1, expert_tensor_parallel_size=None, micro_batch_size=1, **_NO_RECOMPUTE)
"""The flags --plan sets itself (a config's own values are replaced, not validated)."""


def pipeline_shapes(num_layers: int, world: int):
    """(P, V, (first, last)): P dividing world; V model chunks per rank (interleaved schedule;
    V = 1 plain 1F1B) dividing each stage's layers. When P does not divide the layers, the
    middle stages take ceil(L / P) layers each and the first and last stages split the rest
    (Megatron-LM's --decoder-first/last-pipeline-num-layers), with V = 1."""
    for P in divisors(world):
        if num_layers % P == 0:
            yield from ((P, V, (None, None)) for V in (divisors(num_layers // P) if P > 1 else [1]))
        elif num_layers > P:
            k = -(-num_layers // P)
            rest = num_layers - (P - 2) * k
            first, last = rest // 2, rest - rest // 2
            if 1 <= first and last <= k:
                yield P, 1, (first, last)


def plan(cfg, nodes: int, gpus_per_node: int, budget_gib: float, **hw) -> tuple[list[dict], int, Optional[dict]]:
    """Search the layouts of nodes x gpus_per_node GPUs: pipeline (P, V), tensor (T with
    sequence parallelism, within a node), expert (EP, ETP), micro-batch size and recompute; the
    precision, optimizer and global batch are the config's. Returns (estimates that fit in
    `budget_gib`, fastest first, each with its "cfg" and "recompute"; layouts estimated; the
    least-memory estimate seen). For each layout and micro-batch size only the least recompute
    that fits is kept (more recompute is only slower), and a micro-batch size that does not fit
    with full recompute ends the larger ones (activations grow with it)."""
    world = nodes * gpus_per_node
    moe = cfg.model.moe is not None
    recompute = [k for k in RECOMPUTE if moe or k != "moe"]
    fitting, tried, smallest = [], 0, None
    for P, V, ends in pipeline_shapes(cfg.model.num_layers, world):
        for tp, etp, ep in tensor_layouts(cfg, world // P, max_tp=gpus_per_node):
            for mbs in MICRO_BATCH_SIZES:
                valid = fits = False
                for name in recompute:
                    c = with_layout(cfg, world, P, V, tp, etp, ep, mbs, ends=ends, training=RECOMPUTE[name])
                    if c is None:
                        continue
                    valid = True
                    r = estimate(c, gpus_per_node, nodes, **hw)
                    tried += 1
                    if smallest is None or r["memory_gib"] < smallest["memory_gib"]:
                        smallest = {**r, "cfg": c, "recompute": name}
                    if r["memory_gib"] <= budget_gib:
                        fitting.append({**r, "cfg": c, "recompute": name})
                        fits = True
                        break
                if valid and not fits:
                    break
    fitting.sort(key=lambda r: (r["step_s"], r["memory_gib"]))
    return fitting, tried, smallest


def layout_flags(c) -> list[str]:
    """The pretrain_gpt.py flags that select `c`'s layout, recompute and micro-batch size (they
    override the config's)."""
    p, t = c.parallel, c.training
    flags = ["--tensor-model-parallel-size", str(p.tensor_model_parallel_size)]
    if p.sequence_parallel:
        flags.append("--sequence-parallel")
    flags += ["--pipeline-model-parallel-size", str(p.pipeline_model_parallel_size)]
    for flag, n in (("--decoder-first-pipeline-num-layers", p.decoder_first_pipeline_num_layers),
                    ("--decoder-last-pipeline-num-layers", p.decoder_last_pipeline_num_layers)):
        if n is not None:
            flags += [flag, str(n)]
    if p.num_layers_per_virtual_pipeline_stage:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(p.num_layers_per_virtual_pipeline_stage)]
    flags += ["--expert-model-parallel-size", str(p.expert_model_parallel_size)]
    if c.model.moe is not None:
        flags += ["--expert-tensor-parallel-size", str(p.expert_tensor_size)]
    flags += ["--micro-batch-size", str(t.micro_batch_size)]
    if t.moe_layer_recompute:
        flags.append("--moe-layer-recompute")
    if t.recompute_granularity == "full":
        flags += ["--recompute-granularity", "full", "--recompute-method", t.recompute_method,
                  "--recompute-num-layers", str(t.recompute_num_layers)]
    return flags


def layout_text(r: dict) -> str:
    """'T=4+SP P=4 V=7 DP=8 EP=8 ETP=1 EDP=4 mbs=1'; uneven pipeline ends as 'P=16 (2+..+3)'."""
    vp = f" V={r['vp']}" if r["vp"] > 1 else ""
    first, last = r["stage_ends"]
    vp += f" ({first}+..+{last})" if first is not None else ""
    etp = f" ETP={r['etp']}" if r["ep"] > 1 or r["etp"] > 1 else ""
    return (f"T={r['tp']}{'+SP' if r['sp'] else ''} P={r['pp']}{vp} DP={r['dp']} EP={r['ep']}{etp} "
            f"EDP={r['edp']} mbs={r['mbs']}")


def precision_text(r: dict) -> str:
    return f"{r['precision']}{' +distopt' if r['distributed_optimizer'] else ''}"


# ---------------------------------------------------------------- command line

def print_estimate(r: dict, nodes: int, gpus_per_node: int, overlap: bool) -> None:
    sp = ", sequence-parallel" if r["sp"] else ""
    print(f"world {r['world']} ({nodes} x {gpus_per_node}): tensor-parallel T={r['tp']}{sp}, pipeline P={r['pp']} "
          f"V={r['vp']}, data-parallel DP={r['dp']}, expert-parallel EP={r['ep']}, expert-tensor-parallel "
          f"ETP={r['etp']}, expert-data-parallel EDP={r['edp']}; {r['microbatches']} micro-batches per step")
    print(f"parameters: {r['total_params'] / 1e9:.2f} B total, {r['active_params'] / 1e9:.2f} B active, "
          f"{r['local_params'] / 1e9:.2f} B per GPU "
          f"(stage {r['worst_stage']}); training FLOPs per token / 6 = {r['active_params_per_token'] / 1e9:.2f} B")
    print(f"per step and GPU: {r['tokens_per_gpu_per_step']:.0f} tokens, compute {r['compute_s'] * 1e3:.1f} ms "
          f"(slowest stage)")
    print(f"all-to-all: {r['a2a_bytes_per_gpu'] / GIB:.2f} GiB sent per GPU per step "
          f"({'inter' if r['a2a_inter_node'] else 'intra'}-node), {r['a2a_s'] * 1e3:.1f} ms")
    if r["tp"] > 1 or r["etp"] > 1:
        print(f"tensor-parallel collectives: {r['tp_bytes_per_gpu'] / GIB:.2f} GiB sent per GPU per step "
              f"(slowest stage), {r['tp_s'] * 1e3:.1f} ms")
    if r["pp"] > 1:
        print(f"pipeline: bubble {100 * r['bubble']:.1f}% of the step ((P-1)/(V*m+P-1)), P2P "
              f"{r['p2p_bytes_per_gpu'] / GIB:.2f} GiB per GPU, {r['p2p_s'] * 1e3:.1f} ms")
    print(f"gradient reduction: {r['grad_reduce_bytes_per_gpu'] / GIB:.2f} GiB per GPU, {r['grad_reduce_s'] * 1e3:.1f} ms"
          f" ({'' if overlap else 'not '}overlapped)")
    w = r["stages"][r["worst_stage"]]
    opt = "distributed optimizer" if r["distributed_optimizer"] else "optimizer"
    print(f"memory, {r['precision']}, worst stage {r['worst_stage']} of {r['pp']}: weights {w['weights'] / GIB:.1f}, "
          f"grads {w['grads'] / GIB:.1f}, {opt} {w['optimizer'] / GIB:.1f}, activations "
          f"{w['activations'] / GIB:.1f} GiB")
    print(f"step {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}%, "
          f"memory ~{r['memory_gib']:.1f} GiB per GPU")


def print_fit(rows, budget_gib: float) -> None:
    print(f"smallest layout per world size (fits: <= {budget_gib:g} GiB per GPU)")
    for world, smallest, best in rows:
        print(f"  {world:5d} GPUs: least memory {smallest['memory_gib']:6.1f} GiB with {layout_text(smallest)} "
              f"{precision_text(smallest)}")
        if best:
            print(f"             fastest that fits: {best['memory_gib']:.1f} GiB, {best['tokens_per_s']:.0f} tokens/s, "
                  f"MFU {100 * best['mfu']:.1f}%, bubble {100 * best['bubble']:.1f}%, {layout_text(best)} "
                  f"{precision_text(best)}")
    if rows and rows[-1][2]:
        print(f"fits from {rows[-1][0]} GPUs")
    else:
        print("does not fit at any world size tried (raise --max-gpus)")


def print_plan(fitting: list[dict], tried: int, smallest: Optional[dict], cfg, config_path: Optional[str],
               nodes: int, gpus_per_node: int, capacity_gib: float, budget_gib: float, top: int) -> bool:
    """The best `top` layouts as a table and the flags of the best; False when none fits."""
    m, t, world = cfg.model, cfg.training, nodes * gpus_per_node
    total, _, _ = total_params(m)
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
    opt = ", distributed optimizer" if cfg.parallel.use_distributed_optimizer else ""
    print(f"plan: {nodes} node(s) x {gpus_per_node} GPUs = {world}; {count_text(total)} parameters, "
          f"{count_text(active_params(m))} active; {precision}{opt}; global batch {t.global_batch_size} x "
          f"{m.seq_length} tokens")
    print(f"{tried} layouts estimated, {len(fitting)} fit in {gib_text(budget_gib)} GiB per GPU "
          f"({capacity_gib:g} GiB less the margin)")
    if not fitting:
        if smallest is not None:
            print(f"nothing fits: the least memory is {gib_text(smallest['memory_gib'])} GiB per GPU with "
                  f"{layout_text(smallest)}, recompute {smallest['recompute']}; add nodes or use a "
                  f"larger --gpu-memory-gib")
        else:
            print("no valid layout for this world size (check the divisibility of layers, heads and experts)")
        return False
    header = ("#", "layout", "recompute", "memory GiB", "bubble", "a2a GiB/GPU", "TP GiB/GPU", "step s",
              "tokens/s", "MFU")
    rows = [(str(i + 1), layout_text(r), r["recompute"], gib_text(r["memory_gib"]), f"{100 * r['bubble']:.1f}%",
             gib_text(r["a2a_bytes_per_gpu"] / GIB), gib_text(r["tp_bytes_per_gpu"] / GIB), f"{r['step_s']:.3g}",
             f"{r['tokens_per_s']:.0f}", f"{100 * r['mfu']:.1f}%") for i, r in enumerate(fitting[:top])]
    widths = [max(len(x[j]) for x in [header, *rows]) for j in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(x.ljust(w) if j < 3 else x.rjust(w) for j, (x, w) in enumerate(zip(row, widths))))
    flags = " ".join(layout_flags(fitting[0]["cfg"]))
    config = f"--config {config_path} " if config_path else ""
    print(f"flags of the best: {flags}")
    print(f"launch: sbatch --nodes {nodes} scripts/slurm_pretrain.sbatch {config}{flags} --data-path ... "
          f"--save ... --load ...")
    return True


def count_text(n: float) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def gib_text(x: float) -> str:
    """GiB with one decimal from 10 up, three significant digits below (tiny models)."""
    return f"{x:.1f}" if x >= 10 or x == 0 else f"{x:.3g}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tflops", type=float, default=400.0, help="achieved dense TFLOP/s per GPU")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="spec peak for MFU (H100/H200 bf16 dense)")
    p.add_argument("--intra-node-gbps", type=float, default=3600.0, help="per-GPU intra-node bandwidth, Gbit/s")
    p.add_argument("--inter-node-gbps", type=float, default=400.0, help="per-GPU inter-node bandwidth, Gbit/s")
    p.add_argument("--alpha-us", type=float, default=10.0, help="latency per peer per exchange, microseconds")
    p.add_argument("--no-overlap", action="store_true", help="gradient reduction not hidden behind backward")
    p.add_argument("--fit", type=float, metavar="GIB",
                   help="search layouts for the smallest power-of-two world whose worst stage fits in GIB per GPU "
                        "(76 leaves ~4 GiB of an 80 GB GPU for the CUDA context and fragmentation)")
    p.add_argument("--max-gpus", type=int, default=1024, help="largest world --fit tries")
    p.add_argument("--plan", action="store_true",
                   help="rank the layouts of --nodes x --gpus-per-node GPUs that fit by modelled step time; "
                        "print the best --top and the flags of the best")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="--plan: memory of one GPU")
    p.add_argument("--memory-margin", type=float, default=0.10,
                   help="--plan: share of --gpu-memory-gib kept free (CUDA context, communication buffers, "
                        "allocator fragmentation)")
    p.add_argument("--top", type=int, default=5, help="--plan: layouts to print")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="override the config's precision (a YAML's bf16: true has no command-line off switch)")
    p.add_argument("--no-distributed-optimizer", action="store_true",
                   help="override the config's --use-distributed-optimizer")
    a, rest = p.parse_known_args(argv)
    world = a.nodes * a.gpus_per_node
    extra = [] if "--mock-data" in rest or "--data-path" in rest else ["--mock-data"]
    try:
        args = parse_args(rest + extra)
        if args.vocab_size is None and args.tokenizer_type is None:
            args.vocab_size = 32000  # neither the config nor the flags give one
        if a.plan:  # the planner chooses the layout: the config's own one need not fit this world
            vars(args).update(PLANNER_CHOOSES)
        cfg = config_from_args(args, world_size=1 if a.plan else world)
    except ValueError as e:
        print(f"estimate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if a.precision:
        cfg.training.bf16, cfg.training.fp16 = a.precision == "bf16", a.precision == "fp16"
    if a.no_distributed_optimizer:
        cfg.parallel.use_distributed_optimizer = False
    kw = dict(tflops=a.tflops, intra_gbps=a.intra_node_gbps, inter_gbps=a.inter_node_gbps, alpha_us=a.alpha_us,
              overlap=not a.no_overlap, peak_tflops=a.peak_tflops)
    if a.plan:
        if not 0 <= a.memory_margin < 1:
            print("estimate.py: error: --memory-margin must be in [0, 1)", file=sys.stderr)
            sys.exit(2)
        budget = a.gpu_memory_gib * (1 - a.memory_margin)
        fitting, tried, smallest = plan(cfg, a.nodes, a.gpus_per_node, budget, **kw)
        config_path = rest[rest.index("--config") + 1] if "--config" in rest[:-1] else None
        if not print_plan(fitting, tried, smallest, cfg, config_path, a.nodes, a.gpus_per_node,
                          a.gpu_memory_gib, budget, a.top):
            sys.exit(1)
        return
    if a.fit is not None:
        print_fit(fit(cfg, a.fit, a.gpus_per_node, a.max_gpus, **kw), a.fit)
        return
    print_estimate(estimate(cfg, a.gpus_per_node, a.nodes, **kw), a.nodes, a.gpus_per_node, not a.no_overlap)


if __name__ == "__main__":
    main()
