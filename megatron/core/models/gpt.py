"""GPTModel: embedding -> TransformerBlock -> final norm -> output layer -> loss.

Written once for a single device; parallelism enters through the process groups handed to the
MoE layers' dispatchers and routers, and through `TensorParallel`, which turns each whole layer
into this rank's slice: the word embedding and output layer are split by vocabulary rows, the
loss is the vocab-parallel fused cross-entropy, and under sequence parallelism the activations
between the embedding and the loss are this rank's shard of every sequence, x_BsD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.config import ModelConfig
from megatron.core.fusions.linear_cross_entropy import linear_cross_entropy
from megatron.core.parallel_state import ProcessGroups
from megatron.core.tensor_parallel import mappings, vocab_parallel_cross_entropy_loss
from megatron.core.tensor_parallel.context import TensorParallel
from megatron.core.tensor_parallel.random import TensorParallelRNG
from megatron.core.transformer import init
from megatron.core.transformer.layer import RecomputePlan, TransformerBlock
from megatron.core.transformer.moe.router import RouterOutput
from megatron.core.transformer.rope import RotaryEmbedding


def word_embedding(config: ModelConfig, tp: TensorParallel) -> nn.Module:
    """The V x D word embedding (this rank's V / T rows under tensor parallelism)."""
    embedding = nn.Embedding(config.vocab_size, config.hidden_size)
    init.normal_(embedding.weight, init.init_std(config))
    return tp.vocab_embedding(embedding)


class LanguageModelEmbedding(nn.Module):
    """tokens_BS (+ position_ids_BS) -> x_BSD (x_BsD under sequence parallelism): word embedding,
    learned positions, dropout."""

    def __init__(self, config: ModelConfig, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.tp = tp
        self.word_embeddings = word_embedding(config, tp)
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            init.normal_(self.position_embeddings.weight, init.init_std(config))
            tp.tag_replicated(self.position_embeddings.parameters())
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, tokens_BS: torch.Tensor, position_ids_BS: torch.Tensor) -> torch.Tensor:
        x_BSD = self.word_embeddings(tokens_BS)
        if self.position_embeddings is not None:
            x_BSD = x_BSD + self.position_embeddings(self.tp.sequence_shard(position_ids_BS))
        with self.tp.dropout_rng(sharded=self.tp.shards_sequence):
            return self.dropout(x_BSD)


class TiedOutputEmbedding(nn.Module):
    """The last pipeline stage's copy of the word embedding, used as the output layer when input
    and output weights are tied. Named like the first stage's (`embedding.word_embeddings`) and
    drawn from the same seed, so both copies start equal and a checkpoint holds one tensor; the
    training loop sums the two copies' gradients."""

    def __init__(self, config: ModelConfig, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.word_embeddings = word_embedding(config, tp)


@dataclass
class GPTOutput:
    """logits_BSV: output logits (None when a loss was asked for, to save memory).
    lm_loss: mean cross-entropy over tokens with loss_mask = 1 (None without labels).
    aux_loss: sum of the MoE layers' coefficient-scaled auxiliary losses (0 for dense), detached,
        for reporting: its gradient is already part of the backward pass (see
        `moe_layer.AuxLossGradient`), so add nothing to what is backpropagated.
    routings: one RouterOutput per MoE layer, in layer order.
    """

    logits_BSV: Optional[torch.Tensor]
    lm_loss: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    routings: list[RouterOutput] = field(default_factory=list)


class GPTModel(nn.Module):
    """A GPT decoder, dense or MoE, with Megatron-Core parameter names.

    groups: the run's process groups (default: one device); sequence_parallel: shard the
    activations along the sequence between tensor-parallel regions (T > 1 only).

    The whole model by default. A pipeline rank builds only its share: `chunks` lists the
    global indices of its layers (one list per model chunk), `pre_process` says whether it holds
    the embedding (first stage), `post_process` the final norm and output layer (last stage).
    With `init_seed`, every piece draws its weights from its own seed (`init.seeded`), so every
    layout starts from the same weights.
    """

    def __init__(self, config: ModelConfig, groups: Optional[ProcessGroups] = None, sequence_parallel: bool = False,
                 recompute: Optional[RecomputePlan | list[RecomputePlan]] = None,
                 chunks: Optional[list[list[int]]] = None, pre_process: bool = True, post_process: bool = True,
                 init_seed: Optional[int] = None):
        super().__init__()
        groups = groups or ProcessGroups()
        self.config = config
        rng = TensorParallelRNG(init_seed or 0, groups.tp_rank, torch.get_default_device()) if groups.tp_size > 1 else None
        self.tp = tp = TensorParallel(groups.tp, sequence_parallel, rng)
        self.embedding = None
        if pre_process:
            with init.seeded(init_seed, -1):
                self.embedding = LanguageModelEmbedding(config, tp)
        elif post_process and not config.untie_embeddings_and_output_weights:
            with init.seeded(init_seed, -1):
                self.embedding = TiedOutputEmbedding(config, tp)
        self.rotary_pos_emb = None
        if config.position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, config.rotary_percent, config.rotary_base)
        self.decoder = TransformerBlock(config, groups, tp, recompute, chunks, final_norm=post_process,
                                        init_seed=init_seed)
        self.output_layer = None
        if post_process and config.untie_embeddings_and_output_weights:
            with init.seeded(init_seed, config.num_layers):
                output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                init.normal_(output_layer.weight, init.init_std(config))
                self.output_layer = tp.column(output_layer)

    def output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def embed(self, tokens_BS: torch.Tensor, position_ids_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens_BS -> x_BSD (first stage)."""
        return self.embedding(tokens_BS, _positions(tokens_BS, position_ids_BS))

    def rope(self, x_BS_: torch.Tensor, position_ids_BS: Optional[torch.Tensor] = None):
        """The rotary tables for a batch of token ids_BS, or of hidden states x_BSD (x_BsD under
        sequence parallelism: the tables cover the whole sequence); None without RoPE."""
        if self.rotary_pos_emb is None:
            return None
        if position_ids_BS is None:
            B, S = x_BS_.shape[:2]
            if x_BS_.dim() == 3 and self.tp.shards_sequence:
                S *= self.tp.size
            position_ids_BS = torch.arange(S, device=x_BS_.device).expand(B, S)
        return self.rotary_pos_emb(position_ids_BS[0] if _same_rows(position_ids_BS) else position_ids_BS)

    def loss(self, h_BSD: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS: Optional[torch.Tensor] = None):
        """Mean LM loss of the final hidden states (last stage); h_BsD under sequence parallelism.
        Under tensor parallelism the cross-entropy is vocab-parallel and the loss is the same on
        every rank of the group."""
        if not self.tp.enabled:
            return fused_language_model_loss(h_BSD, self.output_weight(), labels_BS, loss_mask_BS)
        weights_T = _token_weights(labels_BS, loss_mask_BS)
        return vocab_parallel_cross_entropy_loss(h_BSD, self.output_weight(), labels_BS, weights_T, self.tp.group,
                                                 self.tp.shards_sequence)

    def logits(self, h_BSD: torch.Tensor) -> torch.Tensor:
        """Output logits_BSV over the whole vocabulary, on every rank (gathered under TP)."""
        if not self.tp.enabled:
            return F.linear(h_BSD, self.output_weight())
        if self.tp.shards_sequence:
            h_BSD = self.tp.gather_sequence(h_BSD)
        else:
            h_BSD = mappings.copy_to_tensor_parallel_region(h_BSD, self.tp.group)
        return mappings.gather_replicated(F.linear(h_BSD, self.output_weight()), self.tp.group, dim=-1)

    def forward(self, tokens_BS: torch.Tensor, position_ids_BS: Optional[torch.Tensor] = None,
                labels_BS: Optional[torch.Tensor] = None, loss_mask_BS: Optional[torch.Tensor] = None) -> GPTOutput:
        """The whole model (every piece must be held: a single stage)."""
        x_BSD = self.embed(tokens_BS, position_ids_BS)
        h_BSD, routings = self.decoder(x_BSD, self.rope(tokens_BS, position_ids_BS))
        aux = sum((r.aux_loss.detach() for r in routings), start=h_BSD.new_zeros((), dtype=torch.float32))
        if labels_BS is None:
            return GPTOutput(self.logits(h_BSD), None, aux, routings)
        return GPTOutput(None, self.loss(h_BSD, labels_BS, loss_mask_BS), aux, routings)


def _positions(tokens_BS: torch.Tensor, position_ids_BS: Optional[torch.Tensor]) -> torch.Tensor:
    if position_ids_BS is not None:
        return position_ids_BS
    B, S = tokens_BS.shape
    return torch.arange(S, device=tokens_BS.device).expand(B, S)


def _same_rows(position_ids_BS: torch.Tensor) -> bool:
    return position_ids_BS.stride(0) == 0 or position_ids_BS.shape[0] == 1


def fused_language_model_loss(h_BSD: torch.Tensor, w_VD: torch.Tensor, labels_BS: torch.Tensor,
                              loss_mask_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`language_model_loss(h_BSD @ w_VD^T, ...)` without materialising the logits."""
    weights_T = _token_weights(labels_BS, loss_mask_BS)
    return linear_cross_entropy(h_BSD.flatten(0, 1), w_VD, labels_BS.flatten(), weights_T)


def _token_weights(labels_BS: torch.Tensor, loss_mask_BS: Optional[torch.Tensor]) -> torch.Tensor:
    """weights_T (T = B*S): the loss mask over its sum, so that the weighted sum is the mean."""
    mask = (torch.ones(labels_BS.numel(), device=labels_BS.device) if loss_mask_BS is None
            else loss_mask_BS.flatten().float())
    return mask / mask.sum().clamp(min=1.0)


def language_model_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor,
                        loss_mask_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 over positions where loss_mask_BS is 1."""
    losses = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), reduction="none")
    if loss_mask_BS is None:
        return losses.mean()
    mask = loss_mask_BS.flatten().float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
