"""Typed configuration for model, MoE, parallelism, optimizer, data, training and checkpoints.

Every field has a docstring. Configs are built from command-line flags or YAML in exactly one
place (`megatron/training/arguments.py`) and validated in exactly one place (`validate`, below),
before any process group or large tensor exists. Validation errors are `ValueError`s whose
message names the offending flag and says how to fix it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron.core.pipeline_parallel.layout import PipelineLayout


@dataclass
class MoEConfig:
    """Mixture-of-Experts settings (Megatron-Core semantics; see docs/architecture.md)."""

    num_experts: int
    """Total experts per MoE layer (`--num-experts`)."""
    ffn_hidden_size: int
    """Hidden size of each expert's FFN (`--moe-ffn-hidden-size`, default `--ffn-hidden-size`)."""
    layer_pattern: tuple[int, ...]
    """Per layer, 1 for an MoE FFN and 0 for a dense FFN (from `--moe-layer-freq`)."""
    router_topk: int = 2
    """Experts chosen per token, K (`--moe-router-topk`)."""
    score_function: str = "softmax"
    """`softmax` or `sigmoid` (`--moe-router-score-function`)."""
    pre_softmax: bool = False
    """Softmax over all experts before top-k instead of over the chosen k; no effect with sigmoid
    scores (`--moe-router-pre-softmax`)."""
    topk_scaling_factor: Optional[float] = None
    """Multiplier applied to the routing probabilities (`--moe-router-topk-scaling-factor`)."""
    load_balancing_type: str = "aux_loss"
    """`aux_loss`, `seq_aux_loss`, `global_aux_loss`, `sinkhorn` (select on Sinkhorn-balanced scores
    while training, no aux loss) or `none` (`--moe-router-load-balancing-type`)."""
    aux_loss_coeff: float = 0.0
    """Coefficient of the load-balancing loss (`--moe-aux-loss-coeff`; with `noisy_topk`, of its
    importance + load loss)."""
    z_loss_coeff: Optional[float] = None
    """Coefficient of the router z-loss; None disables it (`--moe-z-loss-coeff`)."""
    input_jitter_eps: Optional[float] = None
    """Multiplicative uniform noise on router inputs while training (`--moe-input-jitter-eps`)."""
    capacity_factor: Optional[float] = None
    """Expert capacity factor; None means dropless (`--moe-expert-capacity-factor`; a negative
    value also means dropless, as in Megatron)."""
    token_drop_policy: str = "probs"
    """Which over-capacity tokens to drop: lowest `probs` or latest `position` (`--moe-token-drop-policy`)."""
    pad_to_capacity: bool = False
    """Pad each expert's input to exactly its capacity (`--moe-pad-expert-input-to-capacity`)."""
    shared_expert_ffn_hidden_size: Optional[int] = None
    """FFN size of a shared expert run on every token; None for none (`--moe-shared-expert-intermediate-size`)."""
    token_dispatcher_type: str = "allgather"
    """`alltoall` or `allgather` exchange over the expert-parallel group (`--moe-token-dispatcher-type`)."""
    enable_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert selection bias (`--moe-router-enable-expert-bias`)."""
    bias_update_rate: float = 1e-3
    """Step size of the expert-bias update (`--moe-router-bias-update-rate`)."""
    router_type: str = "topk"
    """The routing strategy (`--moe-router-type`): `topk` (Megatron-Core's top-k router, with
    group-limited routing and Sinkhorn as options), `noisy_topk` (Shazeer et al. 2017, a learned
    noise projection and importance + load losses) or `expert_choice` (Zhou et al. 2022: every
    expert takes its top ceil(T*K/E*c) tokens by softmax gate, c the capacity factor; see
    `router.ExpertChoiceRouter`)."""
    num_groups: Optional[int] = None
    """Group-limited routing: the experts form this many equal groups, consecutive by id
    (`--moe-router-num-groups`, e.g. the EP size for device-limited routing)."""
    group_topk: Optional[int] = None
    """Group-limited routing: each token picks its experts inside its best `group_topk` groups
    (`--moe-router-group-topk`)."""
    router_dtype: Optional[str] = None
    """`fp32` or `fp64`: the dtype of the router's logits and everything computed from them
    (`--moe-router-dtype`). None computes in fp32 too (Megatron-Core computes in the input's dtype
    then; we always route in at least fp32)."""
    force_load_balancing: bool = False
    """Replace the router's logits by N(0, 1) draws (gradient passed straight through) so that
    routing is uniform in expectation: for performance work only (`--moe-router-force-load-balancing`)."""

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether 0-based layer `layer_number` has an MoE FFN."""
        return bool(self.layer_pattern[layer_number])


@dataclass
class ModelConfig:
    """Shape and numerics of the GPT decoder."""

    num_layers: int
    """Transformer layers, L (`--num-layers`)."""
    hidden_size: int
    """Model width, D (`--hidden-size`)."""
    num_attention_heads: int
    """Query heads, H (`--num-attention-heads`)."""
    ffn_hidden_size: int
    """Dense FFN hidden size, F (`--ffn-hidden-size`)."""
    seq_length: int
    """Training sequence length, S (`--seq-length`)."""
    vocab_size: int
    """Vocabulary size after padding to `--make-vocab-size-divisible-by`, V."""
    num_query_groups: int
    """Key/value heads, G (`--num-query-groups` with `--group-query-attention`; else H)."""
    kv_channels: int
    """Per-head dimension (`--kv-channels`, default D / H)."""
    max_position_embeddings: int
    """Rows of the learned position table (`--max-position-embeddings`)."""
    position_embedding_type: str = "learned_absolute"
    """`learned_absolute`, `rope` or `none` (`--position-embedding-type`)."""
    rotary_base: float = 10000.0
    """RoPE base frequency (`--rotary-base`)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates (`--rotary-percent`)."""
    normalization: str = "LayerNorm"
    """`LayerNorm` or `RMSNorm` (`--normalization`)."""
    norm_epsilon: float = 1e-5
    """Epsilon of every norm (`--norm-epsilon`)."""
    swiglu: bool = False
    """SwiGLU FFNs instead of GELU (`--swiglu`)."""
    untie_embeddings_and_output_weights: bool = False
    """Separate output layer instead of reusing the input embedding (`--untie-embeddings-and-output-weights`)."""
    init_method_std: float = 0.02
    """Std of the normal weight init; output projections use std / sqrt(2 L) (`--init-method-std`)."""
    hidden_dropout: float = 0.1
    """Dropout after attention and FFN outputs, and on embeddings (`--hidden-dropout`)."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities (`--attention-dropout`)."""
    add_bias_linear: bool = True
    """Biases in linear layers; `--disable-bias-linear` turns them off."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection even when other biases are off (`--add-qkv-bias`)."""
    qk_layernorm: bool = False
    """Normalize queries and keys per head before RoPE (`--qk-layernorm`)."""
    moe: Optional[MoEConfig] = None
    """MoE settings; None for a dense model."""

    @property
    def qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias


@dataclass
class ParallelConfig:
    """How the job is spread over processes. Every process group derives from one device mesh."""

    world_size: int = 1
    """Number of processes (from the launcher's WORLD_SIZE)."""
    expert_model_parallel_size: int = 1
    """Ranks over which each MoE layer's experts are split, EP (`--expert-model-parallel-size`)."""
    tensor_model_parallel_size: int = 1
    """Ranks splitting attention heads, dense FFN width and the vocabulary, T; the innermost
    mesh dimension (`--tensor-model-parallel-size`)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence between tensor-parallel regions (norms, dropout,
    residual, MoE routing run on S / T positions); off when T = 1 (`--sequence-parallel`)."""
    expert_tensor_parallel_size: Optional[int] = None
    """Ranks splitting each expert's FFN width, ETP; None means T, as in Megatron-Core. ETP = 1
    with T > 1 folds the expert-parallel group over the tensor-parallel ranks
    (`--expert-tensor-parallel-size`)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages the layers are split into, P; the outermost mesh dimension
    (`--pipeline-model-parallel-size`)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank, V, for the interleaved 1F1B schedule
    (`--virtual-pipeline-model-parallel-size`); None for plain 1F1B."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per model chunk; another way to set V (`--num-layers-per-virtual-pipeline-stage`)."""
    decoder_first_pipeline_num_layers: Optional[int] = None
    """Layers of the first pipeline stage when uneven (`--decoder-first-pipeline-num-layers`)."""
    decoder_last_pipeline_num_layers: Optional[int] = None
    """Layers of the last pipeline stage when uneven (`--decoder-last-pipeline-num-layers`)."""
    account_for_embedding_in_pipeline_split: bool = False
    """Count the embedding as a layer when splitting, so the first stage holds one layer less
    (`--account-for-embedding-in-pipeline-split`)."""
    pipeline_schedule: Optional[str] = None
    """`1F1B`, `Interleaved1F1B` or `InterleavedZeroBubble` (torch.distributed.pipelining's
    schedules, named as torchtitan names them); None picks 1F1B, or Interleaved1F1B with virtual
    stages, as Megatron-LM does (`--pipeline-schedule`)."""
    account_for_loss_in_pipeline_split: bool = False
    """Count the output layer and loss as a layer, so the last stage holds one layer less
    (`--account-for-loss-in-pipeline-split`)."""
    distributed_backend: Optional[str] = None
    """`nccl` or `gloo`; None picks nccl on CUDA and gloo on CPU (`--distributed-backend`)."""
    distributed_timeout_minutes: float = 10.0
    """Timeout of collectives before a hang is reported (`--distributed-timeout-minutes`)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks, ZeRO-1 (`--use-distributed-optimizer`)."""
    overlap_grad_reduce: bool = False
    """Reduce gradient buckets while backward runs (`--overlap-grad-reduce`)."""
    ddp_bucket_size: Optional[int] = None
    """Gradient bucket size in elements (`--ddp-bucket-size`); None picks a default."""

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def expert_tensor_size(self) -> int:
        """ETP, resolved: `expert_tensor_parallel_size`, else T."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def pipeline_layout(self, num_layers: int) -> PipelineLayout:
        """Which layers each (virtual) pipeline stage holds; ValueError naming the flag if they do not split."""
        return PipelineLayout.build(num_layers, self.pipeline_model_parallel_size,
                                    self.virtual_pipeline_model_parallel_size,
                                    self.num_layers_per_virtual_pipeline_stage,
                                    self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers,
                                    self.account_for_embedding_in_pipeline_split,
                                    self.account_for_loss_in_pipeline_split)


@dataclass
class OptimizerConfig:
    """AdamW, gradient clipping and the learning-rate schedule (in iterations)."""

    lr: float = 1e-4
    """Peak learning rate (`--lr`)."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate (`--min-lr`)."""
    lr_decay_style: str = "linear"
    """`constant`, `linear`, `cosine`, `inverse-square-root` or `WSD` (`--lr-decay-style`)."""
    lr_warmup_iters: int = 0
    """Iterations of linear warmup from `lr_warmup_init` (`--lr-warmup-iters` / `--lr-warmup-fraction`)."""
    lr_warmup_init: float = 0.0
    """Learning rate at iteration 0 of warmup (`--lr-warmup-init`)."""
    lr_decay_iters: int = 0
    """Iteration at which decay reaches `min_lr` (`--lr-decay-iters`, default `--train-iters`)."""
    lr_wsd_decay_iters: int = 0
    """For WSD: length of the final decay phase (`--lr-wsd-decay-iters`)."""
    lr_wsd_decay_style: str = "exponential"
    """For WSD: `exponential`, `linear`, `cosine` or `minus_sqrt` (`--lr-wsd-decay-style`)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, not applied to norms and biases (`--weight-decay`)."""
    adam_beta1: float = 0.9
    """(`--adam-beta1`)"""
    adam_beta2: float = 0.999
    """(`--adam-beta2`)"""
    adam_eps: float = 1e-8
    """(`--adam-eps`)"""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables (`--clip-grad`)."""


@dataclass
class DataConfig:
    """Where batches come from."""

    mock_data: bool = False
    """Deterministic, learnable synthetic sequences; needs no files (`--mock-data`)."""
    data_path: list[str] = field(default_factory=list)
    """`[weight] prefix ...` of `.bin/.idx` datasets, split by `split` (`--data-path`)."""
    split: str = "969,30,1"
    """Train/valid/test proportions of documents (`--split`)."""
    train_data_path: list[str] = field(default_factory=list)
    """Explicit training datasets (`--train-data-path`)."""
    valid_data_path: list[str] = field(default_factory=list)
    """Explicit validation datasets (`--valid-data-path`)."""
    test_data_path: list[str] = field(default_factory=list)
    """Explicit test datasets (`--test-data-path`)."""
    data_cache_path: Optional[str] = None
    """Directory for cached document/sample/shuffle indices (`--data-cache-path`)."""
    num_workers: int = 2
    """DataLoader worker processes (`--num-workers`)."""
    tokenizer_type: Optional[str] = None
    """Tokenizer class name (`--tokenizer-type`)."""
    tokenizer_model: Optional[str] = None
    """Tokenizer model file or directory (`--tokenizer-model`)."""
    vocab_size: Optional[int] = None
    """Unpadded vocabulary size for `NullTokenizer` and mock data (`--vocab-size`)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (`--make-vocab-size-divisible-by`)."""
    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss (`--eod-mask-loss`)."""


@dataclass
class TrainingConfig:
    """The loop: batches, iterations, precision, evaluation, logging."""

    micro_batch_size: int = 1
    """Sequences per forward pass per data-parallel rank (`--micro-batch-size`)."""
    global_batch_size: int = 1
    """Sequences per optimizer step over all ranks (`--global-batch-size`)."""
    train_iters: int = 0
    """Optimizer steps to run (`--train-iters`, or `--train-samples` // global batch)."""
    train_samples: Optional[int] = None
    """`--train-samples`: the training set's size when given (else train_iters x global batch)."""
    seed: int = 1234
    """Seed of every random number generator (`--seed`)."""
    bf16: bool = False
    """bf16 model parameters, activations and gradients, Megatron's mixed-precision layout
    (`--bf16`): the model is initialised in fp32 and rounded; gradients accumulate and are
    reduced in fp32 buffers; the optimizer updates fp32 main parameters (part of the optimizer
    state, sharded with `--use-distributed-optimizer`) and rounds them into the model after
    each step. The loss, softmax and router stay fp32. False: everything fp32."""
    fp16: bool = False
    """The `bf16` layout with fp16 parameters, plus dynamic loss scaling (`--fp16`)."""
    loss_scale: Optional[float] = None
    """Static fp16 loss scale; None for dynamic (`--loss-scale`)."""
    initial_loss_scale: float = 2.0**32
    """Starting dynamic loss scale (`--initial-loss-scale`)."""
    min_loss_scale: float = 1.0
    """Floor of the dynamic loss scale (`--min-loss-scale`)."""
    loss_scale_window: int = 1000
    """Good steps before the dynamic loss scale doubles (`--loss-scale-window`)."""
    hysteresis: int = 2
    """Overflows tolerated before the dynamic loss scale halves (`--hysteresis`)."""
    eval_interval: int = 1000
    """Iterations between validation runs (`--eval-interval`)."""
    eval_iters: int = 100
    """Batches per validation run (`--eval-iters`)."""
    exit_interval: Optional[int] = None
    """Stop (after saving) when the iteration is a multiple of this (`--exit-interval`)."""
    exit_duration_in_mins: Optional[float] = None
    """Stop (after saving) after this many minutes (`--exit-duration-in-mins`)."""
    log_interval: int = 100
    """Iterations between console log lines (`--log-interval`)."""
    tensorboard_dir: Optional[str] = None
    """Where TensorBoard scalars go; None disables (`--tensorboard-dir`)."""
    recompute_granularity: Optional[str] = None
    """`full` or `selective` activation recompute (`--recompute-granularity`)."""
    recompute_method: Optional[str] = None
    """With `full`: `uniform` (runs of `recompute_num_layers` layers, each keeping only its input)
    or `block` (only the first `recompute_num_layers` layers); None acts as `uniform`
    (`--recompute-method`)."""
    recompute_num_layers: Optional[int] = None
    """Layers per recomputed run (`uniform`) or recomputed layers (`block`) (`--recompute-num-layers`)."""
    moe_per_layer_logging: bool = False
    """Log each MoE layer's aux losses and load: a console line per layer (its losses, max/mean
    load, Gini, load and token entropy, dropped share), and Megatron-LM's `moe/<loss>_layer_<i>`
    TensorBoard scalars (`--moe-per-layer-logging`). The `moe/layer_NN/...` load-health scalars
    and the collapse warnings (`megatron.core.transformer.moe.health`) are written without it."""
    moe_layer_recompute: bool = False
    """Recompute MoE layers in backward (`--moe-layer-recompute`)."""
    check_for_nan_in_loss_and_grad: bool = True
    """Count and skip steps whose gradient norm is not finite (`--no-check-for-nan-in-loss-and-grad` to apply them)."""


@dataclass
class CheckpointConfig:
    """Saving and loading."""

    save: Optional[str] = None
    """Directory checkpoints are written to (`--save`)."""
    load: Optional[str] = None
    """Directory checkpoints are read from (`--load`)."""
    save_interval: Optional[int] = None
    """Iterations between checkpoints (`--save-interval`)."""
    no_load_optim: bool = False
    """Do not restore optimizer and scheduler state (`--no-load-optim`)."""
    no_load_rng: bool = False
    """Do not restore random number generator states (`--no-load-rng`)."""
    no_save_optim: bool = False
    """Do not write optimizer state (`--no-save-optim`)."""
    no_save_rng: bool = False
    """Do not write random number generator states (`--no-save-rng`)."""
    finetune: bool = False
    """Load model weights only and start at iteration 0 (`--finetune`)."""
    ckpt_format: str = "torch_dist"
    """`torch_dist` (reshardable directory) or `torch` (legacy per-rank files) (`--ckpt-format`)."""
    async_save: bool = False
    """Write checkpoints in the background (`--async-save`)."""
    transformer_impl: str = "local"
    """Megatron-Core layer spec whose tensor names `--ckpt-format torch` writes: `local` or
    `transformer_engine` (`--transformer-impl`; computation here is the same either way)."""
    moe_grouped_gemm: bool = False
    """With `--ckpt-format torch`, write experts as Megatron-Core's grouped-GEMM modules (TEGroupedMLP,
    or GroupedMLP under `local`) instead of SequentialMLP (`--moe-grouped-gemm`)."""


@dataclass
class Config:
    """Everything one run needs."""

    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    data: DataConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig

    @property
    def num_microbatches(self) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step."""
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.parallel.data_parallel_size)


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int = 1) -> int:
    """Round the vocabulary up to a multiple of `divisible_by * tensor_parallel_size`."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _positive(value, flag: str) -> None:
    if value is None or value <= 0:
        raise ValueError(f"{flag} must be a positive number, got {value}")


def validate(cfg: Config) -> None:
    """Check every cross-field constraint. Raises ValueError naming the flag and the fix."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.training, cfg.optimizer
    for value, flag in [
        (m.num_layers, "--num-layers"),
        (m.hidden_size, "--hidden-size"),
        (m.num_attention_heads, "--num-attention-heads"),
        (m.ffn_hidden_size, "--ffn-hidden-size"),
        (m.seq_length, "--seq-length"),
        (m.num_query_groups, "--num-query-groups"),
        (m.kv_channels, "--kv-channels"),
        (m.vocab_size, "--vocab-size"),
        (t.micro_batch_size, "--micro-batch-size"),
        (t.global_batch_size, "--global-batch-size"),
        (t.train_iters, "--train-iters"),
        (t.log_interval, "--log-interval"),
        (t.eval_interval, "--eval-interval"),
        (p.expert_model_parallel_size, "--expert-model-parallel-size"),
        (p.world_size, "world size"),
    ]:
        _positive(value, flag)
    if m.num_attention_heads % m.num_query_groups:
        raise ValueError(
            f"--num-query-groups ({m.num_query_groups}) must divide --num-attention-heads "
            f"({m.num_attention_heads})"
        )
    if m.position_embedding_type not in ("learned_absolute", "rope", "none"):
        raise ValueError("--position-embedding-type must be learned_absolute, rope or none")
    if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings < m.seq_length:
        raise ValueError(
            f"--max-position-embeddings ({m.max_position_embeddings}) must be at least "
            f"--seq-length ({m.seq_length}) with learned positions"
        )
    if not 0.0 < m.rotary_percent <= 1.0:
        raise ValueError(f"--rotary-percent must be in (0, 1], got {m.rotary_percent}")
    if m.position_embedding_type == "rope" and int(m.kv_channels * m.rotary_percent) % 2:
        raise ValueError("--rotary-percent times --kv-channels must be an even number of dimensions")
    for rate, flag in [(m.hidden_dropout, "--hidden-dropout"), (m.attention_dropout, "--attention-dropout")]:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{flag} must be in [0, 1), got {rate}")
    if m.moe is not None:
        _validate_moe(m.moe, m, p)
    _positive(p.pipeline_model_parallel_size, "--pipeline-model-parallel-size")
    stage_ranks = p.world_size // p.pipeline_model_parallel_size
    if p.world_size % p.pipeline_model_parallel_size:
        raise ValueError(f"world size ({p.world_size}) must be divisible by --pipeline-model-parallel-size "
                         f"({p.pipeline_model_parallel_size})")
    _validate_tensor_parallel(m, p)
    per_stage = f" / --pipeline-model-parallel-size = {stage_ranks}" if p.pipeline_model_parallel_size > 1 else ""
    if stage_ranks % p.tensor_model_parallel_size:
        raise ValueError(f"world size ({p.world_size}){per_stage} must be divisible by "
                         f"--tensor-model-parallel-size ({p.tensor_model_parallel_size})")
    expert_ranks = p.expert_model_parallel_size * p.expert_tensor_size
    if stage_ranks % expert_ranks:
        etp = f" x --expert-tensor-parallel-size ({p.expert_tensor_size})" if p.expert_tensor_size > 1 else ""
        raise ValueError(f"world size ({p.world_size}){per_stage} must be divisible by "
                         f"--expert-model-parallel-size ({p.expert_model_parallel_size}){etp}")
    if p.expert_model_parallel_size > 1 and m.moe is None:
        raise ValueError("--expert-model-parallel-size > 1 needs --num-experts")
    if p.distributed_backend not in (None, "nccl", "gloo"):
        raise ValueError("--distributed-backend must be nccl or gloo")
    dp = p.data_parallel_size
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"--global-batch-size ({t.global_batch_size}) must be divisible by --micro-batch-size "
            f"({t.micro_batch_size}) x data-parallel size ({dp})"
        )
    if t.bf16 and t.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive; pick one")
    _validate_pipeline(cfg)
    _validate_recompute(t, m.num_layers)
    if o.lr < 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ValueError(f"need 0 <= --min-lr ({o.min_lr}) <= --lr ({o.lr})")
    if o.lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root", "WSD"):
        raise ValueError("--lr-decay-style must be constant, linear, cosine, inverse-square-root or WSD")
    if o.lr_warmup_iters < 0 or o.lr_warmup_iters > max(o.lr_decay_iters, 1):
        raise ValueError(
            f"--lr-warmup-iters ({o.lr_warmup_iters}) must be between 0 and --lr-decay-iters ({o.lr_decay_iters})"
        )
    if o.lr_decay_style == "WSD" and not 0 < o.lr_wsd_decay_iters <= o.lr_decay_iters:
        raise ValueError("--lr-decay-style WSD needs 0 < --lr-wsd-decay-iters <= --lr-decay-iters")
    if o.clip_grad < 0:
        raise ValueError("--clip-grad must be >= 0")
    if cfg.checkpoint.ckpt_format not in ("torch_dist", "torch"):
        raise ValueError("--ckpt-format must be torch_dist or torch")
    if cfg.checkpoint.save_interval is not None and cfg.checkpoint.save_interval <= 0:
        raise ValueError("--save-interval must be positive")
    if cfg.checkpoint.async_save and cfg.checkpoint.ckpt_format != "torch_dist":
        raise ValueError("--async-save needs --ckpt-format torch_dist")
    if (cfg.checkpoint.ckpt_format == "torch" and cfg.checkpoint.moe_grouped_gemm and m.moe is not None
            and m.add_bias_linear and cfg.checkpoint.transformer_impl == "local"):
        raise ValueError("--moe-grouped-gemm with --transformer-impl local writes Megatron-Core's GroupedMLP, which "
                         "has no expert biases: add --disable-bias-linear, or use --transformer-impl transformer_engine")


PIPELINE_SCHEDULES = ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble")


def _validate_tensor_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    """T must divide heads, query groups, FFN widths and the padded vocabulary; ETP the expert FFN."""
    T = p.tensor_model_parallel_size
    _positive(T, "--tensor-model-parallel-size")
    if p.expert_tensor_parallel_size is not None:
        _positive(p.expert_tensor_parallel_size, "--expert-tensor-parallel-size")
    has_dense_ffn = m.moe is None or not all(m.moe.layer_pattern)
    for value, flag in [(m.num_attention_heads, "--num-attention-heads"), (m.num_query_groups, "--num-query-groups"),
                        (m.ffn_hidden_size if has_dense_ffn else 0, "--ffn-hidden-size"),
                        (m.vocab_size, "the padded vocabulary size")]:
        if value % T:
            raise ValueError(f"--tensor-model-parallel-size ({T}) must divide {flag} ({value})")
    if m.moe is not None:
        etp = p.expert_tensor_size
        if m.moe.ffn_hidden_size % etp:
            raise ValueError(f"--expert-tensor-parallel-size ({etp}) must divide --moe-ffn-hidden-size "
                             f"({m.moe.ffn_hidden_size})")
        shared = m.moe.shared_expert_ffn_hidden_size
        if shared and shared % T:
            raise ValueError(f"--tensor-model-parallel-size ({T}) must divide "
                             f"--moe-shared-expert-intermediate-size ({shared})")
    if p.sequence_parallel and m.seq_length % T:
        raise ValueError(f"--sequence-parallel needs --seq-length ({m.seq_length}) divisible by "
                         f"--tensor-model-parallel-size ({T})")


def _validate_pipeline(cfg: Config) -> None:
    p = cfg.parallel
    layout = p.pipeline_layout(cfg.model.num_layers)
    if p.pipeline_schedule not in (None, *PIPELINE_SCHEDULES):
        raise ValueError(f"--pipeline-schedule must be one of {', '.join(PIPELINE_SCHEDULES)}")
    if layout.num_stages == 1:
        if p.pipeline_schedule is not None:
            raise ValueError("--pipeline-schedule needs --pipeline-model-parallel-size > 1")
        return
    if p.pipeline_schedule == "1F1B" and layout.num_chunks > 1:
        raise ValueError("--pipeline-schedule 1F1B runs one model chunk a rank; drop "
                         "--virtual-pipeline-model-parallel-size or use Interleaved1F1B")
    n, P = cfg.num_microbatches, layout.num_stages
    if n < P:
        raise ValueError(f"--pipeline-model-parallel-size {P} needs at least {P} micro-batches per step, got {n} "
                         "(--global-batch-size / (--micro-batch-size x data-parallel size)); raise --global-batch-size")
    interleaved = layout.num_chunks > 1 or (p.pipeline_schedule or "").startswith("Interleaved")
    if interleaved and n % (n // P):
        raise ValueError(f"the interleaved schedule runs micro-batches in rounds of {P} (the pipeline size): "
                         f"{n} micro-batches per step do not split into {n // P} equal rounds; "
                         f"use a multiple of {P} (--global-batch-size)")


def _validate_recompute(t: TrainingConfig, num_layers: int) -> None:
    if t.recompute_granularity not in (None, "full", "selective"):
        raise ValueError("--recompute-granularity must be full or selective")
    if t.recompute_method not in (None, "uniform", "block"):
        raise ValueError("--recompute-method must be uniform or block")
    if t.recompute_method is not None and t.recompute_granularity != "full":
        raise ValueError("--recompute-method needs --recompute-granularity full")
    if t.recompute_num_layers is not None:
        if t.recompute_granularity != "full":
            raise ValueError("--recompute-num-layers needs --recompute-granularity full "
                             "(selective recompute takes no layer count)")
        if not 1 <= t.recompute_num_layers <= num_layers:
            raise ValueError(f"--recompute-num-layers must be between 1 and --num-layers ({num_layers}), "
                             f"got {t.recompute_num_layers}")


def _validate_moe(moe: MoEConfig, m: ModelConfig, p: ParallelConfig) -> None:
    _positive(moe.num_experts, "--num-experts")
    _positive(moe.ffn_hidden_size, "--moe-ffn-hidden-size")
    _positive(moe.router_topk, "--moe-router-topk")
    if moe.router_topk > moe.num_experts:
        raise ValueError(
            f"--moe-router-topk ({moe.router_topk}) cannot exceed --num-experts ({moe.num_experts})"
        )
    if len(moe.layer_pattern) != m.num_layers:
        raise ValueError(
            f"--moe-layer-freq gives {len(moe.layer_pattern)} layers but --num-layers is {m.num_layers}; "
            "the list must have one 0/1 entry per layer"
        )
    if any(v not in (0, 1) for v in moe.layer_pattern):
        raise ValueError("--moe-layer-freq list entries must be 0 (dense) or 1 (MoE)")
    if moe.num_experts % p.expert_model_parallel_size:
        raise ValueError(
            f"--num-experts ({moe.num_experts}) must be divisible by --expert-model-parallel-size "
            f"({p.expert_model_parallel_size})"
        )
    if moe.score_function not in ("softmax", "sigmoid"):
        raise ValueError("--moe-router-score-function must be softmax or sigmoid")
    if (moe.router_topk == 1 and moe.score_function == "softmax" and not moe.pre_softmax
            and moe.load_balancing_type != "sinkhorn" and moe.router_type != "expert_choice"):
        raise ValueError("--moe-router-topk 1 with softmax scores needs --moe-router-pre-softmax: a softmax over "
                         "the one chosen expert is always 1, so the router would learn nothing from the LM loss")
    if moe.enable_expert_bias and moe.score_function != "sigmoid":
        raise ValueError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid "
                         "(aux-loss-free balancing is defined for sigmoid scores, as in Megatron-Core)")
    if moe.load_balancing_type not in ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"):
        raise ValueError("--moe-router-load-balancing-type must be aux_loss, seq_aux_loss, global_aux_loss, sinkhorn "
                         "or none")
    if moe.aux_loss_coeff < 0:
        raise ValueError("--moe-aux-loss-coeff must be >= 0")
    if moe.z_loss_coeff is not None and moe.z_loss_coeff < 0:
        raise ValueError("--moe-z-loss-coeff must be >= 0")
    if moe.input_jitter_eps is not None and not 0 < moe.input_jitter_eps < 1:
        raise ValueError("--moe-input-jitter-eps must be in (0, 1)")
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        raise ValueError("--moe-expert-capacity-factor must be positive (or negative for dropless, as in Megatron)")
    if moe.token_drop_policy not in ("probs", "position"):
        raise ValueError("--moe-token-drop-policy must be probs or position")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        raise ValueError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    _validate_router(moe)
    if moe.shared_expert_ffn_hidden_size is not None:
        _positive(moe.shared_expert_ffn_hidden_size, "--moe-shared-expert-intermediate-size")
        if m.add_bias_linear:
            raise ValueError("--moe-shared-expert-intermediate-size needs --disable-bias-linear: shared experts "
                             "have no biases (Megatron-Core refuses them too)")
    if moe.token_dispatcher_type not in ("alltoall", "allgather"):
        raise ValueError("--moe-token-dispatcher-type must be alltoall or allgather")


def _validate_router(moe: MoEConfig) -> None:
    """The routing strategy's flags (see `router.build_router`)."""
    if moe.router_type not in ("topk", "noisy_topk", "expert_choice"):
        raise ValueError("--moe-router-type must be topk, noisy_topk or expert_choice")
    if moe.router_dtype not in (None, "fp32", "fp64"):
        raise ValueError("--moe-router-dtype must be fp32 or fp64")
    if (moe.num_groups is None) != (moe.group_topk is None):
        raise ValueError("--moe-router-num-groups and --moe-router-group-topk go together (group-limited routing)")
    if moe.num_groups is not None:
        _positive(moe.num_groups, "--moe-router-num-groups")
        _positive(moe.group_topk, "--moe-router-group-topk")
        if moe.num_experts % moe.num_groups:
            raise ValueError(f"--moe-router-num-groups ({moe.num_groups}) must divide --num-experts ({moe.num_experts})")
        if moe.group_topk > moe.num_groups:
            raise ValueError(f"--moe-router-group-topk ({moe.group_topk}) cannot exceed --moe-router-num-groups "
                             f"({moe.num_groups})")
        if moe.group_topk > moe.router_topk:
            raise ValueError(f"--moe-router-group-topk ({moe.group_topk}) cannot exceed --moe-router-topk "
                             f"({moe.router_topk}): a group's score is the sum of its top topk/group_topk experts")
        if moe.router_topk > moe.group_topk * (moe.num_experts // moe.num_groups):
            raise ValueError(f"--moe-router-topk ({moe.router_topk}) exceeds the experts of "
                             f"--moe-router-group-topk ({moe.group_topk}) groups")
        if moe.router_type != "topk" or moe.load_balancing_type == "sinkhorn":
            raise ValueError("--moe-router-num-groups needs --moe-router-type topk without sinkhorn balancing")
    if moe.load_balancing_type == "sinkhorn":
        if moe.router_type != "topk":
            raise ValueError("--moe-router-load-balancing-type sinkhorn needs --moe-router-type topk")
        if moe.aux_loss_coeff != 0:
            raise ValueError("--moe-router-load-balancing-type sinkhorn has no aux loss: --moe-aux-loss-coeff must be 0")
        if moe.enable_expert_bias:
            raise ValueError("--moe-router-enable-expert-bias is not used by sinkhorn routing")
        if moe.capacity_factor is not None:
            raise ValueError("--moe-expert-capacity-factor does not work with sinkhorn balancing (as in Megatron-Core)")
    if moe.force_load_balancing and moe.router_type != "topk":
        raise ValueError("--moe-router-force-load-balancing needs --moe-router-type topk")
    if moe.router_type == "noisy_topk":
        if moe.score_function != "softmax" or moe.pre_softmax or moe.enable_expert_bias:
            raise ValueError("--moe-router-type noisy_topk takes softmax scores over the chosen experts: no "
                             "--moe-router-score-function sigmoid, --moe-router-pre-softmax or expert bias")
        if moe.load_balancing_type not in ("aux_loss", "none"):
            raise ValueError("--moe-router-type noisy_topk has its own importance and load losses: "
                             "--moe-router-load-balancing-type must be aux_loss (default) or none")
    if moe.router_type == "expert_choice":
        if moe.capacity_factor is None:
            raise ValueError("--moe-router-type expert_choice needs --moe-expert-capacity-factor c: every expert "
                             "takes ceil(T * topk / num_experts * c) tokens")
        if moe.score_function != "softmax" or moe.enable_expert_bias or moe.topk_scaling_factor:
            raise ValueError("--moe-router-type expert_choice gates with the softmax over all experts: no "
                             "--moe-router-score-function sigmoid, expert bias or --moe-router-topk-scaling-factor")
        if moe.aux_loss_coeff != 0 or moe.load_balancing_type not in ("aux_loss", "none"):
            raise ValueError("--moe-router-type expert_choice is balanced by construction: no balancing loss "
                             "(--moe-aux-loss-coeff 0, --moe-router-load-balancing-type none)")
        if moe.token_drop_policy != "probs":
            raise ValueError("--moe-router-type expert_choice picks each expert's highest-gate tokens: "
                             "--moe-token-drop-policy must be probs")
