"""Pretrain a GPT (dense or Mixture-of-Experts) model with Megatron-LM's flags.

    python pretrain_gpt.py --config configs/tiny_moe.yaml
    torchrun --nproc-per-node 4 pretrain_gpt.py --config configs/tiny_moe.yaml --expert-model-parallel-size 4

Bad flags are reported as one line naming the flag, with exit status 2, before anything is
allocated. An unreadable checkpoint or damaged data is also one line, naming the file, exit 2.
"""

import sys
import warnings


def main(argv=None) -> int:
    from megatron.core.parallel_state import launch_env

    if launch_env().rank != 0:  # one copy of each warning, from rank 0
        warnings.simplefilter("ignore")
    else:
        warnings.formatwarning = lambda msg, category, *a, **k: f"WARNING: {msg}\n"
    from megatron.training.arguments import config_from_args, parse_args
    from megatron.training.train import pretrain

    from megatron.core.datasets.errors import DataError
    from megatron.training.checkpointing import CheckpointError

    try:
        args = parse_args(argv)
        cfg = config_from_args(args)
    except ValueError as e:
        return _fail(e)
    try:
        pretrain(cfg, args)
    except (CheckpointError, DataError) as e:
        return _fail(e)
    return 0


def _fail(error: Exception) -> int:
    print(f"pretrain_gpt.py: error: {error}", file=sys.stderr)
    return 2

if __name__ == "__main__":
    sys.exit(main())
