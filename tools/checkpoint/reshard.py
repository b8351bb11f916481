"""Change a checkpoint's parallel layout or format offline, optimizer state included.

    python tools/checkpoint/reshard.py --load-dir CKPT_EP2 --save-dir CKPT_EP4 \
        --ckpt-format torch --target-expert-parallel-size 4
    python tools/checkpoint/reshard.py --load-dir LEGACY --save-dir DIST --ckpt-format torch_dist

Reads `torch` (legacy, any expert-parallel size; ours or Megatron-LM's, in any Megatron-Core
layout) or `torch_dist` checkpoints, merges expert shards in one process, and writes the
requested format. `torch_dist` output loads under any world size and EP size, so it needs no
target size; `torch` output is written for `--target-expert-parallel-size` ranks, in the input's
Megatron-Core layout (from torch_dist: the one its `--transformer-impl`/`--moe-grouped-gemm`
write). RNG states are dropped (they belong to the old ranks); everything else a resumed run
needs is kept, except Megatron-LM's optimizer state, which is not read. The output directory
must be new or empty and appears only when complete. Bad input is one `reshard.py: error: ...`
line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))

from megatron.training.atomic_dir import check_output_dir  # noqa: E402
from megatron.training.model_checkpoint import load_training_checkpoint, save_training_checkpoint  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise ValueError(message)


def main(argv=None) -> int:
    p = _Parser(prog="reshard.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--load-dir", required=True, help="checkpoint root (with latest_checkpointed_iteration.txt)")
    p.add_argument("--save-dir", required=True, help="new or empty directory for the result")
    p.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist", "torch"])
    p.add_argument("--target-expert-parallel-size", type=int, default=1)
    try:
        a = p.parse_args(argv)
        if a.target_expert_parallel_size < 1:
            raise ValueError("--target-expert-parallel-size must be >= 1")
        check_output_dir(a.save_dir)
        ckpt = load_training_checkpoint(a.load_dir)
        out = save_training_checkpoint(a.save_dir, ckpt, a.ckpt_format, a.target_expert_parallel_size)
    except ValueError as e:
        print(f"reshard.py: error: {e}", file=sys.stderr)
        return 2
    optim = "with" if ckpt.optimizer else "without"
    print(f"wrote {out} ({a.ckpt_format}, {optim} optimizer state, expert-parallel size "
          f"{a.target_expert_parallel_size if a.ckpt_format == 'torch' else 'any'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
