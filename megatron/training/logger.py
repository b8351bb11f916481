"""Console lines in Megatron-LM's format and the matching TensorBoard scalars (rank 0 only).

One line per `--log-interval`, labels exactly as Megatron-LM prints them (people parse them):

  iteration       10/     100 | consumed samples:           80 | elapsed time per iteration (ms): 812.3 |
  throughput per GPU (TFLOP/s/GPU): 0.1 | learning rate: 2.900000E-04 | global batch size:     8 |
  lm loss: 6.123456E+00 | load_balancing_loss: 1.000321E-02 | grad norm: 1.234 |
  number of skipped iterations:   0 | number of nan iterations:   0 |

followed by this framework's fields: the expert-load summary of an MoE model (the layer with
the highest max/mean load, and its Gini coefficient), tokens per second, ETA and peak memory.

Expert-load health (`megatron.core.transformer.moe.health`), per MoE layer: max/mean load, Gini
coefficient, normalised load entropy, normalised per-token routing entropy and the dropped
fraction, each computed from one step's global counts and averaged over the log interval, go to
TensorBoard as `moe/layer_NN/{max_over_mean_load,gini,entropy,token_entropy,dropped_fraction}`
next to the interval's mean tokens per expert, `moe/layer_NN/tokens_per_expert/expert_EEE`.
A `CollapseMonitor` prints a one-line warning when an expert stays above 3x its layer's mean
load, or receives no tokens, for several log intervals (judged on the interval's summed counts).
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron.core.transformer.moe import health


@dataclass
class MoELayerLoad:
    """One MoE layer over a step (or a sum of steps), over micro-batches and data-parallel ranks.

    tokens_per_expert_E: assignments per expert (summed). dropped_fraction: of assignments.
    layer: the model layer's 0-based index. losses: its aux losses as Megatron-LM logs them.
    token_entropy: mean normalised entropy of the tokens' routing distributions (None when the
    router does not report it; see `health`).
    """

    tokens_per_expert_E: torch.Tensor
    dropped_fraction: float
    layer: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    token_entropy: Optional[float] = None

    def __add__(self, other: "MoELayerLoad") -> "MoELayerLoad":
        losses = {k: v + other.losses.get(k, 0.0) for k, v in self.losses.items()}
        entropy = (None if self.token_entropy is None or other.token_entropy is None
                   else self.token_entropy + other.token_entropy)
        return MoELayerLoad(self.tokens_per_expert_E + other.tokens_per_expert_E,
                            self.dropped_fraction + other.dropped_fraction, self.layer, losses, entropy)

    @property
    def max_over_mean(self) -> float:
        return health.max_over_mean(self.tokens_per_expert_E)

    def health(self) -> dict[str, float]:
        """This (one step's) load's health numbers under their TensorBoard names."""
        return health.layer_health(self.tokens_per_expert_E, self.dropped_fraction, self.token_entropy)


@dataclass
class StepResult:
    """What one optimizer step reports (already averaged over data-parallel ranks)."""

    lm_loss: float
    aux_losses: dict[str, float]
    moe_loads: list[MoELayerLoad]
    grad_norm: float
    learning_rate: float
    loss_scale: Optional[float]
    skipped: bool
    nan: bool


@dataclass
class _Interval:
    iterations: int = 0
    counted: int = 0
    lm_loss: float = 0.0
    aux: dict = field(default_factory=dict)
    grad_norm: float = 0.0
    skipped: int = 0
    nan: int = 0
    loads: Optional[list[MoELayerLoad]] = None
    health: Optional[list[dict[str, float]]] = None
    """Per MoE layer, the sums over the interval's steps of each step's health numbers."""
    start: float = field(default_factory=time.perf_counter)


def print_rank_0(is_main: bool, *args) -> None:
    if is_main:
        print(*args, flush=True)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, or the CPU resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


class TrainingLogger:
    """Accumulates step results and prints / writes them every `log_interval` iterations."""

    def __init__(self, is_main: bool, train_iters: int, log_interval: int, global_batch_size: int,
                 seq_length: int, flops_per_iteration: float, world_size: int, device: torch.device,
                 tensorboard_dir: Optional[str] = None, per_layer: bool = False):
        self.is_main = is_main
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.global_batch_size = global_batch_size
        self.seq_length = seq_length
        self.flops_per_iteration = flops_per_iteration
        self.world_size = world_size
        self.device = device
        self.per_layer = per_layer
        self.writer = None
        if is_main and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)
        self.interval = _Interval()
        self.collapse = health.CollapseMonitor()

    def record(self, r: StepResult) -> None:
        iv = self.interval
        iv.iterations += 1
        iv.skipped += int(r.skipped)
        iv.nan += int(r.nan)
        if r.skipped or r.nan:
            return
        iv.counted += 1
        iv.lm_loss += r.lm_loss
        iv.grad_norm += r.grad_norm
        for k, v in r.aux_losses.items():
            iv.aux[k] = iv.aux.get(k, 0.0) + v
        if r.moe_loads:
            iv.loads = list(r.moe_loads) if iv.loads is None else [a + b for a, b in zip(iv.loads, r.moe_loads)]
            step = [load.health() for load in r.moe_loads]
            iv.health = step if iv.health is None else [{k: a[k] + b[k] for k in a if k in b}
                                                         for a, b in zip(iv.health, step)]

    def maybe_log(self, iteration: int, consumed_samples: int, last: StepResult, elapsed_total_s: float,
                  iterations_this_run: int) -> None:
        if iteration % self.log_interval and iteration != self.train_iters:
            return
        iv = self.interval
        now = time.perf_counter()
        per_iter_s = (now - iv.start) / max(iv.iterations, 1)
        n = max(iv.counted, 1)
        tflops = self.flops_per_iteration / per_iter_s / self.world_size / 1e12
        tokens_per_s = self.global_batch_size * self.seq_length / per_iter_s
        remaining = self.train_iters - iteration
        eta_s = elapsed_total_s / max(iterations_this_run, 1) * remaining
        parts = [
            f" iteration {iteration:8d}/{self.train_iters:8d}",
            f" consumed samples: {consumed_samples:12d}",
            f" elapsed time per iteration (ms): {per_iter_s * 1000:.1f}",
            f" throughput per GPU (TFLOP/s/GPU): {tflops:.1f}",
            f" learning rate: {last.learning_rate:.6E}",
            f" global batch size: {self.global_batch_size:5d}",
            f" lm loss: {iv.lm_loss / n:.6E}",
        ]
        parts += [f" {k}: {v / n:.6E}" for k, v in iv.aux.items()]
        if last.loss_scale is not None:
            parts.append(f" loss scale: {last.loss_scale:.1f}")
        parts += [
            f" grad norm: {iv.grad_norm / n:.3f}",
            f" number of skipped iterations: {iv.skipped:3d}",
            f" number of nan iterations: {iv.nan:3d}",
        ]
        layer_health = self._layer_health(n)
        if layer_health:
            worst = max(layer_health, key=lambda lh: lh[1]["max_over_mean_load"])
            parts += [f" expert load max/mean: {worst[1]['max_over_mean_load']:.3f} (layer {worst[0]})",
                      f" expert load gini: {worst[1]['gini']:.3f}"]
        parts += [
            f" tokens per second: {tokens_per_s:.0f}",
            f" ETA: {datetime.timedelta(seconds=int(eta_s))}",
            f" peak memory (GiB): {peak_memory_gib(self.device):.2f}",
        ]
        print_rank_0(self.is_main, " |".join(parts) + " |")
        if self.per_layer:
            for load, (_, h) in zip(iv.loads or [], layer_health):
                fields = [f" {k}: {v / n:.6E}" for k, v in load.losses.items()]
                fields += [f" max/mean load: {h['max_over_mean_load']:.3f}", f" gini: {h['gini']:.3f}",
                           f" load entropy: {h['entropy']:.3f}"]
                if "token_entropy" in h:
                    fields.append(f" token entropy: {h['token_entropy']:.3f}")
                fields.append(f" dropped: {100 * h['dropped_fraction']:.2f}%")
                print_rank_0(self.is_main, f"   moe layer {load.layer:3d} |" + " |".join(fields) + " |")
        for load in iv.loads or []:
            for message in self.collapse.update(load.layer, load.tokens_per_expert_E, iteration):
                log_warning(self.is_main, message)
        if self.writer is not None:
            self._write_scalars(iteration, consumed_samples, last, per_iter_s, tflops, tokens_per_s, n, layer_health)
        self.interval = _Interval()

    def _layer_health(self, n: int) -> list[tuple[int, dict[str, float]]]:
        """(layer, its health numbers averaged over the interval's counted steps) per MoE layer."""
        iv = self.interval
        if not iv.health or not iv.loads:
            return []
        return [(load.layer, {k: v / n for k, v in h.items()}) for load, h in zip(iv.loads, iv.health)]

    def _write_scalars(self, it, samples, last, per_iter_s, tflops, tokens_per_s, n, layer_health) -> None:
        w, iv = self.writer, self.interval
        w.add_scalar("learning-rate", last.learning_rate, it)
        w.add_scalar("batch-size", self.global_batch_size, it)
        w.add_scalar("lm loss", iv.lm_loss / n, it)
        w.add_scalar("lm loss vs samples", iv.lm_loss / n, samples)
        for k, v in iv.aux.items():
            w.add_scalar(k, v / n, it)
        w.add_scalar("grad-norm", iv.grad_norm / n, it)
        if last.loss_scale is not None:
            w.add_scalar("loss-scale", last.loss_scale, it)
        w.add_scalar("iteration-time", per_iter_s, it)
        w.add_scalar("throughput", tflops, it)
        w.add_scalar("tokens-per-second", tokens_per_s, it)
        w.add_scalar("mem-max-allocated-gib", peak_memory_gib(self.device), it)
        w.add_scalar("skipped-iterations", iv.skipped, it)
        w.add_scalar("nan-iterations", iv.nan, it)
        for load, (_, h) in zip(iv.loads or [], layer_health):
            if self.per_layer:  # Megatron-LM's per-layer tags
                for k, v in load.losses.items():
                    w.add_scalar(f"moe/{k}_layer_{load.layer}", v / n, it)
            tag = f"moe/layer_{load.layer:02d}"
            for k, v in h.items():
                w.add_scalar(f"{tag}/{k}", v, it)
            for e, count in enumerate((load.tokens_per_expert_E / n).tolist()):
                w.add_scalar(f"{tag}/tokens_per_expert/expert_{e:03d}", count, it)
        w.flush()

    def log_evaluation(self, label: str, iteration: int, loss: float, consumed_samples: int, split: str) -> None:
        ppl = math.exp(min(20.0, loss))
        line = f" {split} loss at {label} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
        bar = "-" * (len(line) + 1)
        print_rank_0(self.is_main, f"{bar}\n{line}\n{bar}")
        if self.writer is not None:
            w = self.writer
            w.add_scalar(f"lm loss {split}", loss, iteration)
            w.add_scalar(f"lm loss {split} vs samples", loss, consumed_samples)
            w.add_scalar(f"lm loss {split} ppl", ppl, iteration)
            w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def log_warning(is_main: bool, message: str) -> None:
    if is_main:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
