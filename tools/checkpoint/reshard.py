"""Change a checkpoint's parallel layout or format offline, optimizer state included.

    python tools/checkpoint/reshard.py --load-dir CKPT_EP2 --save-dir CKPT_EP4 \
        --ckpt-format torch --target-expert-parallel-size 4
    python tools/checkpoint/reshard.py --load-dir CKPT_PP2 --save-dir CKPT_PP4 \
        --ckpt-format torch --target-pipeline-parallel-size 4
    python tools/checkpoint/reshard.py --load-dir CKPT_TP2 --save-dir CKPT_TP1 \
        --ckpt-format torch --target-tensor-parallel-size 1
    python tools/checkpoint/reshard.py --load-dir LEGACY --save-dir DIST --ckpt-format torch_dist

Reads `torch` (legacy, any tensor-, pipeline- and expert-parallel size; ours or Megatron-LM's,
in any Megatron-Core layout) or `torch_dist` checkpoints, merges tensor-parallel slices, pipeline
stages and expert shards in one process, and writes the requested format. `torch_dist` output
(whole tensors) loads under any world size, T, pipeline and EP size, so it needs no target size
(only its args change); `torch` output is written for `--target-pipeline-parallel-size` stages
(default: the input's layer split, virtual stages and uneven stages included; another size
splits the layers evenly, one chunk a rank) times `--target-tensor-parallel-size` (default: the
input's) x `--target-expert-parallel-size` ranks, each file holding its tensor-parallel rank's
slices (experts: for `--target-expert-tensor-parallel-size`, default the input's at the same T,
else 1 if the input's is 1, else T), in the input's Megatron-Core layout (from torch_dist: the
one its `--transformer-impl`/`--moe-grouped-gemm` write). RNG states are dropped (they belong to the old ranks); everything else a resumed run
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
from megatron.training.model_checkpoint import (  # noqa: E402
    load_training_checkpoint,
    save_training_checkpoint,
    target_pipeline,
    target_tensor_parallel,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise ValueError(message)


def main(argv=None) -> int:
    p = _Parser(prog="reshard.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--load-dir", required=True, help="checkpoint root (with latest_checkpointed_iteration.txt)")
    p.add_argument("--save-dir", required=True, help="new or empty directory for the result")
    p.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist", "torch"])
    p.add_argument("--target-expert-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="pipeline stages of --ckpt-format torch output (default: the input's split)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="tensor-parallel size T of the output (default: the input's)")
    p.add_argument("--target-expert-tensor-parallel-size", type=int, default=None,
                   help="expert-tensor-parallel size of the output (default: see above)")
    try:
        a = p.parse_args(argv)
        for flag in ("target_expert_parallel_size", "target_pipeline_parallel_size", "target_tensor_parallel_size",
                     "target_expert_tensor_parallel_size"):
            if getattr(a, flag) is not None and getattr(a, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        check_output_dir(a.save_dir)
        ckpt = load_training_checkpoint(a.load_dir)
        pipeline = target_pipeline(ckpt, a.target_pipeline_parallel_size)
        T, ETP = target_tensor_parallel(ckpt, a.target_tensor_parallel_size, a.target_expert_tensor_parallel_size)
        out = save_training_checkpoint(a.save_dir, ckpt, a.ckpt_format, a.target_expert_parallel_size,
                                       pipeline.num_stages, T, ETP)
    except ValueError as e:
        print(f"reshard.py: error: {e}", file=sys.stderr)
        return 2
    optim = "with" if ckpt.optimizer else "without"
    sizes = (f"tensor-parallel size {T} x pipeline size {pipeline.num_stages} x expert-parallel size "
             f"{a.target_expert_parallel_size}" + (f", expert-tensor-parallel size {ETP}" if ETP != 1 else "")
             if a.ckpt_format == "torch" else "any tensor-, pipeline and expert-parallel size")
    print(f"wrote {out} ({a.ckpt_format}, {optim} optimizer state, {sizes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
