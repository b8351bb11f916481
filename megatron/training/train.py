"""The training loop: micro-batches -> forward/backward -> grad reduce -> clip -> AdamW -> LR.

    pretrain(cfg)                 set up groups, model, optimizer, data; resume; train; evaluate
      Trainer.train_step(batches) one optimizer step over this rank's micro-batches
      Trainer.evaluate(batches)   mean LM loss over the next `eval_iters` global batches

The reported LM loss never includes the MoE auxiliary losses; those are added only to what is
backpropagated, and reported separately (averaged over MoE layers).
"""

from __future__ import annotations

import argparse
import math
import signal
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.config import Config
from megatron.core.distributed import DataParallel, params_dtype
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer.grad_scaler import LossScaler
from megatron.core.optimizer.lr_scheduler import OptimizerParamScheduler
from megatron.core.parallel_state import ProcessGroups
from megatron.core.pipeline_parallel.schedules import NoPipelining, PipelineSchedule
from megatron.core.transformer.layer import RecomputePlan
from megatron.core.transformer.moe.health import mean_token_entropy
from megatron.core.transformer.moe.router import LOAD_BALANCING_LOSS_NAMES, RouterStats
from megatron.training import checkpointing
from megatron.training.data import build_datasets, build_loader, micro_batches
from megatron.training.flops import training_flops_per_iteration
from megatron.training.host_memory import keep_freed_host_memory
from megatron.training.logger import MoELayerLoad, StepResult, TrainingLogger, print_rank_0


@dataclass
class TrainState:
    """Progress that a checkpoint must carry to resume exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    floating_point_operations_so_far: float = 0.0
    consumed_valid_samples: int = 0
    """Validation samples read so far: each evaluation continues from here (Megatron-LM's)."""


def recompute_plan(cfg: Config, num_layers: Optional[int] = None) -> RecomputePlan:
    """The activation recompute that `--recompute-*` and `--moe-layer-recompute` ask for, for a
    stack of `num_layers` layers (default: the model's; a pipeline stage plans its own)."""
    t = cfg.training
    return RecomputePlan.build(num_layers or cfg.model.num_layers, t.recompute_granularity, t.recompute_method,
                               t.recompute_num_layers, t.moe_layer_recompute)


def build_model(cfg: Config, groups: ProcessGroups) -> GPTModel:
    """This rank's share of the model on its device: its pipeline stages' layers, the embedding
    on the first stage, the output layer on the last. Every piece is drawn from its own seed
    derived from `--seed`, so every pipeline and expert-parallel layout starts from the same
    weights as one process."""
    torch.manual_seed(cfg.training.seed)
    layout = cfg.parallel.pipeline_layout(cfg.model.num_layers)
    ks = layout.virtual_stages(groups.pp_rank)
    chunks = [list(layout.layers(k)) for k in ks]
    with torch.device(groups.device):
        return GPTModel(cfg.model, groups, cfg.parallel.sequence_parallel,
                        recompute=[recompute_plan(cfg, len(c)) if c else RecomputePlan() for c in chunks],
                        chunks=chunks, pre_process=layout.is_first(ks[0]), post_process=layout.is_last(ks[-1]),
                        init_seed=cfg.training.seed)


def build_schedule(cfg: Config, groups: ProcessGroups, model: GPTModel):
    """Plain gradient accumulation without pipelining, else (interleaved) 1F1B."""
    layout = cfg.parallel.pipeline_layout(cfg.model.num_layers)
    if layout.num_stages == 1:
        return NoPipelining(model)
    return PipelineSchedule(model, layout, groups, cfg.num_microbatches, cfg.training.micro_batch_size,
                            cfg.parallel.pipeline_schedule)


class Trainer:
    """Model, data-parallel gradients, optimizer, schedule and scaler of one run.

    On CPU it also sets the process's malloc to keep freed memory (`host_memory`)."""

    def __init__(self, cfg: Config, groups: ProcessGroups):
        if groups.device.type == "cpu":
            keep_freed_host_memory()
        self.cfg = cfg
        self.groups = groups
        t = cfg.training
        self.model = build_model(cfg, groups)  # fp32; DataParallel casts it to bf16/fp16
        tied = None if cfg.model.untie_embeddings_and_output_weights else "embedding.word_embeddings.weight"
        self.dp = DataParallel(self.model, groups, cfg.parallel, params_dtype(t), tied_embedding=tied)
        self.schedule = build_schedule(cfg, groups, self.model)  # after DataParallel cast the parameters
        self.optimizer = self.dp.build_optimizer(cfg.optimizer)
        self.scheduler = OptimizerParamScheduler(self.optimizer, cfg.optimizer)
        self.scaler = (LossScaler(t.initial_loss_scale, t.min_loss_scale, t.loss_scale_window, t.hysteresis,
                                  t.loss_scale) if t.fp16 else None)
        moe_layers = [layer for layer in self.model.decoder.layers if layer.is_moe]
        self.routers = [layer.mlp.router for layer in moe_layers]
        """This rank's routers (its pipeline stages' MoE layers)."""
        self.moe_layer_numbers = [i for i, moe in enumerate(cfg.model.moe.layer_pattern) if moe] if cfg.model.moe else []
        """Every MoE layer of the model, on whichever stage."""
        self.local_moe_slots = [self.moe_layer_numbers.index(layer.layer_number) for layer in moe_layers]
        self.state = TrainState()
        self.pending_save = None  # an asynchronous checkpoint in flight
        self.checkpoint_group = None  # process group of asynchronous checkpoint writes

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: list[dict]) -> StepResult:
        """Forward/backward over this rank's micro-batches (through the pipeline schedule), then
        one optimizer step."""
        self.model.train()
        n = len(batches)
        self.dp.zero_grad(backward_passes=n)
        loss_scale = self.scaler.scale if self.scaler else 1.0
        for router in self.routers:
            router.start_step(self.state.iteration)
            router.aux_loss_grad_scale = loss_scale / n
        lm_sum = self.schedule.train(batches, loss_scale)
        self.dp.finish_grad_sync()
        lm_loss, aux, loads, routed = self._reduce_metrics(lm_sum / n, [r.step_stats for r in self.routers], n)

        if self.scaler is not None:
            self.dp.scale_grads(1.0 / self.scaler.scale)
        grad_norm = self.dp.grad_norm()
        nan = not math.isfinite(lm_loss)
        if nan and self.cfg.training.check_for_nan_in_loss_and_grad:
            raise FloatingPointError(
                f"NaN lm loss at iteration {self.state.iteration + 1} (rank {self.groups.rank}); "
                "pass --no-check-for-nan-in-loss-and-grad to skip such steps instead")
        skipped = not math.isfinite(grad_norm)
        if self.scaler is not None:
            self.scaler.update(found_inf=skipped)
        if not skipped:
            clip = self.cfg.optimizer.clip_grad
            if clip > 0 and grad_norm > clip:
                self.dp.scale_grads(clip / (grad_norm + 1e-6))
            self.optimizer.step()
            self.scheduler.step()
            for router, slot in zip(self.routers, self.local_moe_slots):
                router.update_expert_bias(routed[slot])
        return StepResult(lm_loss, aux, loads, grad_norm, self.scheduler.lr,
                          self.scaler.scale if self.scaler else None, skipped, nan)

    def _reduce_metrics(self, lm_loss: torch.Tensor, stats: list[RouterStats], n: int):
        """Average losses over data-parallel ranks and sum expert counts, in one all-reduce over
        every rank (each MoE layer's numbers come from the stage holding it, the LM loss from
        the last stage).

        Each layer's slice of the packed tensor: balancing loss, z-loss, dropped, assignments,
        tokens_per_expert_E, routed_per_expert_E, token entropy [sum, tokens] (`RouterStats`).

        Returns the LM loss; the aux losses as Megatron-LM logs them (without coefficients,
        averaged over micro-batches, data-parallel ranks and all MoE layers; the global balancing
        loss is each rank's share, so it is summed over ranks); each MoE layer's load and
        losses; and each layer's routed counts for the expert-bias update.
        """
        dp = self.groups.dp_size
        E = self.cfg.model.moe.num_experts if self.cfg.model.moe else 0
        width = 6 + 2 * E
        packed = torch.zeros(1 + width * len(self.moe_layer_numbers), device=self.groups.device)
        if self.schedule.has_loss and self.groups.tp_rank == 0:  # the same loss on every TP rank
            packed[0] = lm_loss
        for slot, s in zip(self.local_moe_slots, stats):
            if s is None:
                continue
            entropy = s.token_entropy if s.token_entropy is not None else torch.zeros(2)  # [sum, tokens]
            parts = [(s.load_balancing_loss / n).reshape(1), (s.z_loss / n).reshape(1), s.dropped.reshape(1),
                     s.assignments.reshape(1), s.tokens_per_expert_E, s.routed_per_expert_E, entropy.reshape(2)]
            packed[1 + slot * width:1 + (slot + 1) * width] = torch.cat([p.float().to(packed.device) for p in parts])
        if self.groups.world_size > 1:
            dist.all_reduce(packed)
        lm = float(packed[0]) / dp
        loads, routed = [], []
        for slot, layer in enumerate(self.moe_layer_numbers):
            chunk = packed[1 + slot * width:1 + (slot + 1) * width]
            losses = self._logged_losses(float(chunk[0]), float(chunk[1]), dp)
            loads.append(MoELayerLoad(chunk[4:4 + E].cpu(), float(chunk[2]) / max(float(chunk[3]), 1.0), layer, losses,
                                      mean_token_entropy(chunk[4 + 2 * E:])))
            routed.append(chunk[4 + E:4 + 2 * E])
        aux = {k: sum(load.losses[k] for load in loads) / len(loads) for k in (loads[0].losses if loads else {})}
        return lm, aux, loads, routed

    def _logged_losses(self, lb_sum: float, z_sum: float, dp: int) -> dict[str, float]:
        """One layer's balancing and z-loss under Megatron-LM's names, from their sums over ranks."""
        moe, out = self.cfg.model.moe, {}
        if moe.load_balancing_type in LOAD_BALANCING_LOSS_NAMES:
            share = moe.load_balancing_type == "global_aux_loss"  # each rank holds its share
            out[LOAD_BALANCING_LOSS_NAMES[moe.load_balancing_type]] = lb_sum if share else lb_sum / dp
        if moe.z_loss_coeff is not None:
            out["z_loss"] = z_sum / dp
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches: Iterator[dict]) -> float:
        """Mean LM loss over the next `eval_iters` global batches of this rank's micro-batches."""
        self.model.eval()
        total = torch.zeros((), device=self.groups.device)
        count = 0
        for _ in range(self.cfg.training.eval_iters):
            total += self.schedule.evaluate(_take(batches, self.cfg.num_microbatches, "evaluation data ran out"))
            count += self.cfg.num_microbatches
        counted = self.schedule.has_loss and self.groups.tp_rank == 0  # the same loss on every TP rank
        packed = torch.stack([total if counted else torch.zeros_like(total),
                              torch.tensor(float(count if counted else 0), device=total.device)])
        if self.groups.world_size > 1:
            dist.all_reduce(packed)
        self.model.train()
        return float(packed[0] / packed[1].clamp(min=1))


class _StopRequest:
    """Turns SIGTERM (slurm preemption) into a request to save and exit at the next step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _any_rank(flag: bool, groups: ProcessGroups) -> bool:
    if groups.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=groups.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def pretrain(cfg: Config, args: Optional[argparse.Namespace] = None,
             groups: Optional[ProcessGroups] = None) -> TrainState:
    """Run training (and evaluation) end to end. Returns the final TrainState."""
    own_groups = groups is None
    groups = groups or parallel_state.initialize(cfg.parallel)
    try:
        # SIGTERM from the start: one that arrives while the model builds or the checkpoint loads
        # stops the run after its first step, with a checkpoint, instead of killing the rank
        with parallel_state.report_hangs(groups, cfg.parallel.distributed_timeout_minutes), _StopRequest() as stop:
            return _pretrain(cfg, args, groups, stop)
    finally:
        if own_groups:
            parallel_state.destroy(groups)


def _pretrain(cfg: Config, args, groups: ProcessGroups, stop: "_StopRequest") -> TrainState:
    start_time = time.time()
    t = cfg.training
    trainer = Trainer(cfg, groups)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print_rank_0(groups.is_main, f"> number of parameters on rank 0: {n_params:,} "
                 f"(world size {groups.world_size}, tensor-parallel {groups.tp_size}, pipeline-parallel {groups.pp_size}, "
                 f"data-parallel {groups.dp_size}, expert-parallel {groups.ep_size}, "
                 f"expert-tensor-parallel {groups.etp_size})")
    checkpointing.load_checkpoint(trainer, cfg, groups)
    state = trainer.state

    train_ds, valid_ds, test_ds = build_datasets(cfg, groups)
    batches = micro_batches(build_loader(train_ds, cfg, groups, state.consumed_train_samples), groups.device)
    valid_batches = (micro_batches(build_loader(valid_ds, cfg, groups, state.consumed_valid_samples), groups.device)
                     if valid_ds is not None else None)
    flops_per_iter = training_flops_per_iteration(cfg.model, t.global_batch_size)
    logger = TrainingLogger(groups.is_main, t.train_iters, t.log_interval, t.global_batch_size,
                            cfg.model.seq_length, flops_per_iter, groups.world_size, groups.device,
                            t.tensorboard_dir, t.moe_per_layer_logging)
    print_rank_0(groups.is_main, f"> training from iteration {state.iteration} to {t.train_iters} "
                 f"({cfg.num_microbatches} micro-batches of {t.micro_batch_size} per rank per step)")
    save = cfg.checkpoint.save is not None
    last_saved = first_iteration = state.iteration
    loop_start = time.perf_counter()
    exiting = False
    while state.iteration < t.train_iters and not exiting:
        result = trainer.train_step(_take(batches, cfg.num_microbatches))
        state.iteration += 1
        state.consumed_train_samples += t.global_batch_size
        state.floating_point_operations_so_far += flops_per_iter
        logger.record(result)
        logger.maybe_log(state.iteration, state.consumed_train_samples, result,
                         time.perf_counter() - loop_start, state.iteration - first_iteration)
        if valid_batches is not None and state.iteration % t.eval_interval == 0:
            loss = _validate(trainer, valid_batches)
            logger.log_evaluation(f"iteration {state.iteration}", state.iteration, loss,
                                  state.consumed_train_samples, "validation")
        if save and cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0:
            checkpointing.save_checkpoint(trainer, cfg, groups, args)
            last_saved = state.iteration
        exiting = _should_exit(cfg, state, start_time, stop, groups)

    if save and last_saved != state.iteration:
        checkpointing.save_checkpoint(trainer, cfg, groups, args)
    checkpointing.finalize(trainer)
    if exiting:
        print_rank_0(groups.is_main, f"exiting program at iteration {state.iteration}")
    else:
        if valid_batches is not None:
            loss = _validate(trainer, valid_batches)
            logger.log_evaluation(f"iteration {state.iteration} on validation set", state.iteration, loss,
                                  state.consumed_train_samples, "validation")
        if test_ds is not None:
            loss = trainer.evaluate(micro_batches(build_loader(test_ds, cfg, groups), groups.device))
            logger.log_evaluation(f"iteration {state.iteration} on test set", state.iteration, loss,
                                  state.consumed_train_samples, "test")
    logger.close()
    return state


def _validate(trainer: Trainer, valid_batches: Iterator[dict]) -> float:
    """One evaluation on the next validation batches; advances `consumed_valid_samples`."""
    loss = trainer.evaluate(valid_batches)
    trainer.state.consumed_valid_samples += trainer.cfg.training.eval_iters * trainer.cfg.training.global_batch_size
    return loss


def _take(batches: Iterator[dict], n: int, what: str = "training data ran out before --train-iters") -> list[dict]:
    out = []
    for _ in range(n):
        try:
            out.append(next(batches))
        except StopIteration:
            raise RuntimeError(f"{what}; the dataset is too small") from None
    return out


def _should_exit(cfg: Config, state: TrainState, start_time: float, stop: _StopRequest,
                 groups: ProcessGroups) -> bool:
    """Exit interval reached, time budget spent, or SIGTERM seen on any rank (agreed by all)."""
    t = cfg.training
    if t.exit_interval and state.iteration % t.exit_interval == 0:
        return True
    timed_out = t.exit_duration_in_mins is not None and (time.time() - start_time) / 60.0 > t.exit_duration_in_mins
    return _any_rank(timed_out or stop.requested, groups)
