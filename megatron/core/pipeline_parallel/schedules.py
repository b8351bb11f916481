"""How one optimizer step's micro-batches run forward and backward: the schedule interface.

    schedule.train(batches, loss_scale) -> sum of this rank's micro-batch LM losses (0 on a
                                           rank that computes no loss), gradients accumulated
    schedule.evaluate(batches)          -> the same sum, forward only

`NoPipelining` is plain gradient accumulation (one stage). `PipelineSchedule` runs a pipeline
rank's stages under `torch.distributed.pipelining`'s 1F1B, or interleaved 1F1B with several
model chunks per rank. Each stage's forward takes and returns one tensor (token ids on the
first stage, hidden states after it); the last stage's loss function computes the LM loss.
Everything else a step needs is kept out of the activations: the MoE aux losses put their
gradient into the stage's own backward (`moe_layer.AuxLossGradient`), and the routers add their
statistics to their own buffers, read by the training loop after the step.

Gradients are sums over micro-batches of loss / micro-batches (times the fp16 loss scale),
exactly as in gradient accumulation; the schedules scale nothing themselves.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ProcessGroups
from megatron.core.pipeline_parallel.layout import PipelineLayout


class NoPipelining:
    """Gradient accumulation over micro-batches on one stage."""

    has_loss = True

    def __init__(self, model: GPTModel):
        self.model = model

    def train(self, batches: list[dict], loss_scale: float = 1.0) -> torch.Tensor:
        n = len(batches)
        lm_sum = torch.zeros((), device=batches[0]["tokens"].device)
        for batch in batches:
            lm_loss = self._loss(batch)
            (lm_loss * (loss_scale / n)).backward()
            lm_sum += lm_loss.detach().float()
        return lm_sum

    def evaluate(self, batches: list[dict]) -> torch.Tensor:
        total = torch.zeros((), device=batches[0]["tokens"].device)
        for batch in batches:
            total += self._loss(batch).float()
        return total

    def _loss(self, batch: dict) -> torch.Tensor:
        return self.model(batch["tokens"], batch["position_ids"], batch["labels"], batch["loss_mask"]).lm_loss


class StageModule(nn.Module):
    """One virtual pipeline stage of a rank's GPTModel: [embedding] -> chunk's layers -> [final norm].

    x: token ids_BS on the first stage, hidden states x_BSD on the others. Returns x_BSD (after
    the final norm on the last stage). The parameters stay registered in the GPTModel.
    """

    def __init__(self, model: GPTModel, chunk: int, first: bool, last: bool):
        super().__init__()
        self.model = model
        self.chunk, self.first, self.last = chunk, first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope = self.model.rope(x)
        x_BSD = self.model.embed(x) if self.first else x
        x_BSD, _ = self.model.decoder.run_chunk(self.chunk, x_BSD, rope)
        return self.model.decoder.final_layernorm(x_BSD) if self.last else x_BSD


class PipelineSchedule:
    """1F1B (one chunk per rank), interleaved 1F1B (several) or interleaved zero-bubble (which
    runs the weight-gradient half of some backward passes later, to fill the bubble).

    Built once per run for `n_microbatches` micro-batches of shape (micro_batch, seq_length).
    Under `--overlap-grad-reduce` a stage's gradient buckets start reducing during its last
    micro-batch's backward, as without pipelining.
    """

    def __init__(self, model: GPTModel, layout: PipelineLayout, groups: ProcessGroups, n_microbatches: int,
                 micro_batch_size: int, name: Optional[str] = None):
        from torch.distributed import pipelining

        self.model, self.n = model, n_microbatches
        ks = layout.virtual_stages(groups.pp_rank)
        self.first, self.has_loss = layout.is_first(ks[0]), layout.is_last(ks[-1])
        cfg = model.config
        dtype = next(model.parameters()).dtype
        device = groups.device
        # Example inputs and outputs: their shape, dtype, and that activations need gradients.
        S = cfg.seq_length // model.tp.size if model.tp.shards_sequence else cfg.seq_length  # x_BsD between stages
        hidden_BSD = torch.empty(micro_batch_size, S, cfg.hidden_size, dtype=dtype, device=device,
                                 requires_grad=True)
        tokens_BS = torch.empty(micro_batch_size, cfg.seq_length, dtype=torch.long, device=device)
        stages = [StageModule(model, c, layout.is_first(k), layout.is_last(k)) for c, k in enumerate(ks)]
        pipe = [pipelining.PipelineStage(stage, k, layout.num_virtual_stages, device,
                                         input_args=(tokens_BS if stage.first else hidden_BSD,),
                                         output_args=(hidden_BSD,), group=groups.pp)
                for stage, k in zip(stages, ks)]
        self._scale = 1.0
        self._lm_sum: Optional[torch.Tensor] = None
        name = name or ("1F1B" if layout.num_chunks == 1 else "Interleaved1F1B")
        schedule = getattr(pipelining, f"Schedule{name}")
        self.schedule = schedule(pipe[0] if name == "1F1B" else pipe, n_microbatches, loss_fn=self._loss_fn,
                                 scale_grads=False)

    def _loss_fn(self, h_BSD: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """target_B2S: labels and loss mask (0/1) of one micro-batch, stacked as int64."""
        lm_loss = self.model.loss(h_BSD, target[:, 0], target[:, 1].float())
        self._lm_sum += lm_loss.detach().float()
        return lm_loss * self._scale

    def _run(self, batches: list[dict], train: bool) -> torch.Tensor:
        device = batches[0]["tokens"].device
        self._lm_sum = torch.zeros((), device=device)
        args = (torch.cat([b["tokens"] for b in batches]),) if self.first else ()
        target = (torch.cat([torch.stack([b["labels"], b["loss_mask"].long()], dim=1) for b in batches])
                  if self.has_loss else None)
        if train:
            self.schedule.step(*args, target=target)
        else:
            self.schedule.eval(*args, target=target)
        return self._lm_sum

    def train(self, batches: list[dict], loss_scale: float = 1.0) -> torch.Tensor:
        self._scale = loss_scale / self.n
        return self._run(batches, train=True)

    def evaluate(self, batches: list[dict]) -> torch.Tensor:
        self._scale = 1.0
        return self._run(batches, train=False)
