"""Megatron's pretraining sampler: sequential sample indices split over data-parallel ranks.

Step after step the global batch is the next `global_batch_size` sample indices. It is cut
into chunks of `micro_batch_size * dp_size`; rank r takes slice [r*mbs, (r+1)*mbs) of each
chunk. So the same samples form the same global batch at any data-parallel size, and a run
resumed at `consumed_samples` continues with exactly the next batch.
"""

from __future__ import annotations

from typing import Iterator


class MegatronPretrainingSampler:
    """Yields this rank's micro-batches of sample indices, starting at `consumed_samples`."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, drop_last: bool = True):
        if consumed_samples > total_samples and drop_last:
            raise ValueError(f"consumed samples {consumed_samples} exceed the dataset's {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        chunk = self.micro_batch_size * self.dp_size
        lo = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - chunk + 1, chunk):
            yield list(range(start + lo, start + lo + self.micro_batch_size))
