"""The vocab-parallel output layer and cross-entropy, fused and chunked over tokens.

Rank r holds rows [r*v, (r+1)*v) of the output weight W_VD (v = V / T) and never more than one
chunk's logits of its slice, [chunk, v]; `fusions.linear_cross_entropy` with the tensor-parallel
group does the per-chunk work (two small all-reduces a chunk, see its docstring). Backward gives
this rank's partial sum of dh, so the input must enter through `copy_to_tensor_parallel_region`
(all-reduce in backward) or, with sequence parallelism, `gather_from_sequence_parallel_region`
(reduce-scatter in backward), as `vocab_parallel_cross_entropy_loss` does. The loss is the same on
every rank of the group.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.fusions.linear_cross_entropy import linear_cross_entropy
from megatron.core.tensor_parallel import mappings


def vocab_parallel_linear_cross_entropy(h_TD: torch.Tensor, w_vD: torch.Tensor, labels_T: torch.Tensor,
                                        weights_T: torch.Tensor, group,
                                        vocab_start: Optional[int] = None,
                                        chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """sum_t weights_T[t] * CE(h_TD[t] @ W_VD^T, labels_T[t]) from this rank's rows w_vD of W_VD.

    h_TD, labels_T and weights_T are the same on every rank of `group`; `vocab_start` defaults
    to rank * v; `chunk_tokens` overrides the chunk size (tokens per chunk, the same on every
    rank; by default the fused loss's size for the full vocabulary). Backward gives this rank's
    partial dh (see the module docstring) and its dw_vD.
    """
    if vocab_start is None:
        vocab_start = mappings.group_rank(group) * w_vD.shape[0]
    return linear_cross_entropy(h_TD, w_vD, labels_T, weights_T, group, vocab_start, chunk_tokens)


def vocab_parallel_cross_entropy_loss(h_BSD: torch.Tensor, w_vD: torch.Tensor, labels_BS: torch.Tensor,
                                      weights_T: torch.Tensor, group,
                                      sequence_parallel: bool = False,
                                      chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """The output layer's loss on TP ranks: h_BSD (h_BsD under sequence parallelism, the rank's
    sequence shard) enters the TP region, then the fused vocab-parallel loss over all B*S tokens
    (labels_BS and weights_T, T = B*S in (b, s) order, are full on every rank)."""
    if sequence_parallel:
        h_BSD = mappings.gather_from_sequence_parallel_region(h_BSD, group)
    else:
        h_BSD = mappings.copy_to_tensor_parallel_region(h_BSD, group)
    return vocab_parallel_linear_cross_entropy(h_BSD.flatten(0, 1), w_vD, labels_BS.flatten(), weights_T, group,
                                               chunk_tokens=chunk_tokens)
