"""Launcher environments and Megatron's data-parallel sample order."""

from megatron.core.datasets.samplers import MegatronPretrainingSampler
from megatron.core.parallel_state import first_slurm_host, launch_env, restart_prefix


def test_torchrun_environment_wins_over_slurm():
    env = {"WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}
    e = launch_env(env)
    assert (e.rank, e.world_size, e.local_rank) == (3, 8, 1)


def test_plain_srun_environment():
    e = launch_env({"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"})
    assert (e.rank, e.world_size, e.local_rank) == (9, 16, 1)
    assert launch_env({}).world_size == 1


def test_first_slurm_host():
    assert first_slurm_host("gpu[012-015,020],cpu1") == "gpu012"
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("a[3,5]") == "a3"


def test_restart_prefix_only_for_one_agent_sharing_its_store():
    """Each restart of a single torchrun agent's workers gets its own store namespace; several
    agents (whose restart counts can differ) or a store of the workers' own get none."""
    one = {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "1", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert restart_prefix(one) == "restart_2"
    assert restart_prefix({**one, "GROUP_WORLD_SIZE": "4"}) is None
    assert restart_prefix({**one, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert restart_prefix({}) is None


def global_batches(dp: int, mbs: int, gbs: int, steps: int, consumed: int = 0) -> list[list[int]]:
    """The samples of each global batch, gathered over dp ranks in their micro-batch order."""
    samplers = [iter(MegatronPretrainingSampler(10_000, consumed, mbs, r, dp)) for r in range(dp)]
    per_rank_micro = gbs // (mbs * dp)
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(per_rank_micro):
            for s in samplers:
                batch += next(s)
        out.append(sorted(batch))
    return out


def test_same_samples_form_the_same_global_batch_at_any_dp_size():
    reference = global_batches(dp=1, mbs=2, gbs=16, steps=3)
    assert reference[0] == list(range(16)) and reference[2] == list(range(32, 48))
    for dp in (2, 4, 8):
        assert global_batches(dp=dp, mbs=2, gbs=16, steps=3) == reference


def test_rank_slices_follow_megatron_order_and_resume():
    s = list(MegatronPretrainingSampler(100, 8, micro_batch_size=2, dp_rank=1, dp_size=2))
    assert s[:2] == [[10, 11], [14, 15]]  # chunk of mbs*dp = 4 from sample 8; rank 1 takes [10, 12)
