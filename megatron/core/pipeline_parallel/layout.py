"""Which transformer layers each pipeline stage holds (Megatron-LM's split, flag for flag).

The decoder is cut into P x V *virtual stages* (P pipeline ranks, V model chunks per rank;
V = 1 without interleaving). Virtual stage k = v * P + r is chunk v of pipeline rank r, and
the stages hold consecutive layers in k order: with 8 layers, P = 2 and V = 2, rank 0 holds
layers [0, 1] and [4, 5], rank 1 holds [2, 3] and [6, 7].

Stage sizes:
* even: L / P layers a rank, then / V a chunk;
* `--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers`: the first
  (last) rank holds that many, the others share the rest evenly;
* `--account-for-embedding-in-pipeline-split` / `--account-for-loss-in-pipeline-split`: the
  embedding (loss) counts as one layer, so the first (last) virtual stage holds one layer less.

The embedding lives on virtual stage 0, the final norm, output layer and loss on the last one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PipelineLayout:
    """layer_counts: transformer layers of each virtual stage, indexed by k = v * P + r."""

    num_stages: int
    num_chunks: int
    layer_counts: tuple[int, ...]

    @property
    def num_virtual_stages(self) -> int:
        return self.num_stages * self.num_chunks

    def layers(self, k: int) -> range:
        """Global indices of the layers of virtual stage k."""
        start = sum(self.layer_counts[:k])
        return range(start, start + self.layer_counts[k])

    def virtual_stages(self, pp_rank: int) -> list[int]:
        """The virtual stages pipeline rank `pp_rank` runs, in chunk order."""
        return [v * self.num_stages + pp_rank for v in range(self.num_chunks)]

    def rank_layers(self, pp_rank: int) -> list[int]:
        """Every layer pipeline rank `pp_rank` holds, in order."""
        return [i for k in self.virtual_stages(pp_rank) for i in self.layers(k)]

    def is_first(self, k: int) -> bool:
        return k == 0

    def is_last(self, k: int) -> bool:
        return k == self.num_virtual_stages - 1

    def stage_of_layer(self, layer: int) -> int:
        """The virtual stage holding global layer `layer`."""
        for k in range(self.num_virtual_stages):
            if layer in self.layers(k):
                return k
        raise IndexError(layer)

    @staticmethod
    def build(num_layers: int, pp_size: int = 1, vp_size: Optional[int] = None,
              layers_per_virtual_stage: Optional[int] = None, first_stage_layers: Optional[int] = None,
              last_stage_layers: Optional[int] = None, account_for_embedding: bool = False,
              account_for_loss: bool = False) -> "PipelineLayout":
        """Megatron-LM's layer split. Raises ValueError naming the flag when it does not divide."""
        P = pp_size
        if P < 1:
            raise ValueError(f"--pipeline-model-parallel-size must be positive, got {P}")
        V = _chunks(num_layers, P, vp_size, layers_per_virtual_stage, first_stage_layers, last_stage_layers)
        uneven = first_stage_layers is not None or last_stage_layers is not None
        if P == 1:
            if uneven or account_for_embedding or account_for_loss:
                raise ValueError("--decoder-first/last-pipeline-num-layers and --account-for-*-in-pipeline-split "
                                 "need --pipeline-model-parallel-size > 1")
            return PipelineLayout(1, 1, (num_layers,))
        if uneven:
            per_rank = _uneven_per_rank(num_layers, P, first_stage_layers, last_stage_layers)
            if account_for_embedding or account_for_loss:
                raise ValueError("--account-for-embedding/loss-in-pipeline-split cannot be combined with "
                                 "--decoder-first/last-pipeline-num-layers (as in Megatron-LM)")
        else:
            slots = num_layers + int(account_for_embedding) + int(account_for_loss)
            if slots % P:
                what = "--num-layers" + (" plus the accounted embedding/loss" if slots != num_layers else "")
                raise ValueError(f"{what} ({slots}) must be divisible by --pipeline-model-parallel-size ({P}); "
                                 "or set --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers")
            per_rank = [slots // P] * P
        counts = []
        for v in range(V):
            for r in range(P):
                if per_rank[r] % V:
                    raise ValueError(f"pipeline rank {r} holds {per_rank[r]} layers, which its {V} virtual stages "
                                     "(--virtual-pipeline-model-parallel-size) cannot split evenly")
                counts.append(per_rank[r] // V)
        if account_for_embedding:
            counts[0] -= 1
        if account_for_loss:
            counts[-1] -= 1
        if min(counts) < 0:
            raise ValueError("--account-for-embedding/loss-in-pipeline-split leaves a virtual stage with fewer than "
                             "0 layers; use fewer stages")
        return PipelineLayout(P, V, tuple(counts))


def _chunks(num_layers: int, P: int, vp_size: Optional[int], per_virtual: Optional[int],
            first: Optional[int], last: Optional[int]) -> int:
    """V, from --virtual-pipeline-model-parallel-size or --num-layers-per-virtual-pipeline-stage."""
    if vp_size is not None and per_virtual is not None:
        raise ValueError("--num-layers-per-virtual-pipeline-stage and --virtual-pipeline-model-parallel-size "
                         "are exclusive; give one")
    if vp_size is None and per_virtual is None:
        return 1
    if P == 1:
        raise ValueError("virtual pipeline stages (--virtual-pipeline-model-parallel-size / "
                         "--num-layers-per-virtual-pipeline-stage) need --pipeline-model-parallel-size > 1")
    if per_virtual is not None:
        if per_virtual <= 0:
            raise ValueError(f"--num-layers-per-virtual-pipeline-stage must be positive, got {per_virtual}")
        if first is not None or last is not None:
            raise ValueError("--num-layers-per-virtual-pipeline-stage cannot be combined with uneven stages; "
                             "use --virtual-pipeline-model-parallel-size")
        if num_layers % (P * per_virtual):
            raise ValueError(f"--num-layers ({num_layers}) must be divisible by --pipeline-model-parallel-size ({P}) "
                             f"x --num-layers-per-virtual-pipeline-stage ({per_virtual})")
        return num_layers // (P * per_virtual)
    if vp_size <= 0:
        raise ValueError(f"--virtual-pipeline-model-parallel-size must be positive, got {vp_size}")
    return vp_size


def _uneven_per_rank(num_layers: int, P: int, first: Optional[int], last: Optional[int]) -> list[int]:
    for value, flag in [(first, "--decoder-first-pipeline-num-layers"), (last, "--decoder-last-pipeline-num-layers")]:
        if value is not None and value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    rest = num_layers - (first or 0) - (last or 0)
    middle = P - (first is not None) - (last is not None)
    if rest < 0 or (middle == 0 and rest != 0):
        raise ValueError(f"--decoder-first/last-pipeline-num-layers ({first}, {last}) must add up to --num-layers "
                         f"({num_layers}) with {P} stages")
    if middle and rest % middle:
        raise ValueError(f"with --decoder-first/last-pipeline-num-layers, the remaining {rest} layers must be "
                         f"divisible by the {middle} other pipeline stages")
    each = rest // middle if middle else 0
    per_rank = [each] * P
    if first is not None:
        per_rank[0] = first
    if last is not None:
        per_rank[-1] = last
    return per_rank
