"""scripts/slurm_pretrain.sbatch under a real one-node slurm cluster: train, stop, requeue, resume.

    python -m pytest -q -m slow tests/slurm

Needs root: tests/slurm/cluster.sh installs Debian's slurm-wlm and munge (apt-get, skipped when
installed) and runs munged, slurmctld and slurmd from a temporary directory. Skips when not root
or when slurm cannot be installed. One job of the tiny config, 2 tasks (ranks) on gloo, goes
through three runs under the same job id:

  1. trains and checkpoints; USR1 to the batch script (what `--signal=B:USR1@300` sends before
     the time limit) makes every rank save and exit at the iteration reached, and the script
     requeues the job;
  2. resumes at the next iteration; SIGTERM to the ranks (what preemption or
     `scancel --signal=TERM` sends) saves and exits again, and the job completes, not requeued;
  3. after `scontrol requeue`, resumes at the next iteration and trains to the end.

Slurm holds a requeued job for two minutes before it may start; the test starts it at once
(`scontrol update StartTime=now`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
CLUSTER = Path(__file__).with_name("cluster.sh")
TRAIN_ITERS = 24
SAVE_INTERVAL = 4
WAIT_S = 600  # per phase; generous because the test shares the CPUs with other work


class Cluster:
    """Client side of the test cluster: slurm commands run with this cluster's SLURM_CONF."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                    and not k.startswith("SLURM_")}
        self.env.update(SLURM_CONF=str(root / "slurm.conf"), PYTHON=sys.executable, OMP_NUM_THREADS="1")

    def run(self, *cmd: str) -> str:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    last_state = None
    """The JobState `job` last saw."""

    def job(self, job_id: str) -> dict:
        """scontrol's fields of a job (JobState, Restarts, ExitCode, ...)."""
        fields = dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "-o", job_id)))
        self.last_state = fields.get("JobState")
        return fields

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted(self.root.glob("*.log")))


def _cluster_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node slurm cluster for this module's tests, torn down (jobs and daemons) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: installs slurm-wlm and munge and runs slurm's daemons")
    installed = _cluster_sh("install")
    if installed.returncode:
        pytest.skip(f"slurm is not available: {installed.stderr.strip()}")
    root = tmp_path_factory.mktemp("slurm")
    try:
        up = _cluster_sh("up", str(root))
        if up.returncode:
            pytest.fail(f"cluster.sh up failed: {up.stderr.strip()}\n{Cluster(root).logs()}")
        yield Cluster(root)
    finally:
        down = _cluster_sh("down", str(root))
        assert down.returncode == 0, f"cluster.sh down failed: {down.stderr.strip()}"


def _wait(what: str, predicate, output: Path, cluster: Cluster, timeout: float = WAIT_S):
    """Poll `predicate` until it returns a true value, which is returned; fail with the job's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if cluster.last_state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL"):
            break  # it will not get there
        time.sleep(0.5)
    text = output.read_text(errors="replace") if output.exists() else "(no output file)"
    waited = time.monotonic() - deadline + timeout
    pytest.fail(f"gave up after {waited:.0f} s (job {cluster.last_state}) waiting for {what}\n"
                f"--- job output:\n{text[-6000:]}\n{cluster.logs()}")


def _runs(output: Path) -> list[str]:
    """The job's output split into its runs (the script prints 'run K' at the start of each)."""
    text = output.read_text(errors="replace") if output.exists() else ""
    return re.split(r"^slurm_pretrain\.sbatch: job \d+, run \d+, .*$", text, flags=re.M)[1:]


def _iterations(run: str) -> list[int]:
    """Iterations logged with an lm loss in one run's output."""
    return [int(i) for i in re.findall(r"^ iteration\s+(\d+)/\s*\d+ \|.*\| lm loss: [0-9.E+-]+ \|", run, flags=re.M)]


def _latest(ckpt: Path) -> int:
    f = ckpt / "latest_checkpointed_iteration.txt"
    return int(f.read_text()) if f.exists() else 0


def _exited_at(run: str) -> int | None:
    m = re.search(r"^exiting program at iteration (\d+)$", run, flags=re.M)
    return int(m.group(1)) if m else None


def _assert_resumed(run: str, iteration: int) -> None:
    assert re.search(rf"^  loaded checkpoint from \S+ at iteration {iteration}$", run, flags=re.M), run[-3000:]
    assert _iterations(run)[0] == iteration + 1, run[-3000:]


def _assert_saved_on_signal(run: str, ckpt: Path) -> int:
    """The run stopped at iteration N on the signal, with a checkpoint of N; returns N."""
    n = _exited_at(run)
    assert n is not None and n < TRAIN_ITERS, run[-3000:]
    assert _iterations(run)[-1] == n, run[-3000:]
    assert re.search(rf"saved checkpoint at iteration\s+{n} ", run), run[-3000:]
    assert _latest(ckpt) == n and (ckpt / f"iter_{n:07d}").is_dir()
    return n


def _start_now(cluster: Cluster, job_id: str) -> None:
    """Start a requeued job now instead of after slurm's two-minute requeue hold. Not within the
    second its last run ended: slurm revokes that run's credential with one-second resolution,
    and a run launched in the same second is killed ("Job credential revoked")."""
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def test_sbatch_trains_saves_on_signal_requeues_and_resumes(cluster, tmp_path):
    ckpt, output = tmp_path / "ckpt", tmp_path / "slurm-%j.out"
    job_id = cluster.run(
        "sbatch", "--parsable", "--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0",
        "--time", "30", "--chdir", str(REPO), "--output", str(output),
        str(REPO / "scripts" / "slurm_pretrain.sbatch"),
        "--config", "configs/tiny_moe.yaml", "--mock-data", "--distributed-backend", "gloo",
        "--train-iters", str(TRAIN_ITERS), "--save-interval", str(SAVE_INTERVAL), "--log-interval", "1",
        "--save", str(ckpt), "--load", str(ckpt)).strip().split(";")[0]
    output = tmp_path / f"slurm-{job_id}.out"
    try:
        # run 1: trains (iterations with losses) and writes the interval checkpoint
        _wait("the first interval checkpoint", lambda: _latest(ckpt) >= SAVE_INTERVAL, output, cluster)
        run = _runs(output)[0]
        assert _iterations(run)[:SAVE_INTERVAL] == list(range(1, SAVE_INTERVAL + 1)), run
        assert f"saved checkpoint at iteration {SAVE_INTERVAL:7d}" in run

        # time limit near: slurm sends USR1 to the batch script; it stops the ranks and requeues
        cluster.run("scancel", "--batch", "--signal=USR1", job_id)
        _wait("the job to requeue itself", lambda: cluster.job(job_id)["JobState"] == "PENDING", output, cluster)
        assert cluster.job(job_id)["Restarts"] == "1"
        n = _assert_saved_on_signal(_runs(output)[0], ckpt)
        assert "requeueing job" in _runs(output)[0]

        # run 2: resumes at n + 1; SIGTERM to the ranks (preemption) saves and ends the job
        _start_now(cluster, job_id)
        _wait("run 2 to train", lambda: len(_runs(output)) == 2 and _iterations(_runs(output)[1]), output, cluster)
        _assert_resumed(_runs(output)[1], n)
        cluster.run("scancel", "--signal=TERM", job_id)
        _wait("run 2 to end", lambda: cluster.job(job_id)["JobState"] == "COMPLETED", output, cluster)
        job = cluster.job(job_id)
        assert job["ExitCode"] == "0:0" and job["Restarts"] == "1", job
        m = _assert_saved_on_signal(_runs(output)[1], ckpt)
        assert m > n

        # run 3: requeued by hand (as a cluster requeues preempted jobs), resumes and finishes
        cluster.run("scontrol", "requeue", job_id)
        _wait("the requeue", lambda: cluster.job(job_id)["JobState"] == "PENDING", output, cluster)
        _start_now(cluster, job_id)
        _wait("run 3 to finish", lambda: len(_runs(output)) == 3 and cluster.job(job_id)["JobState"] == "COMPLETED",
              output, cluster)
        run = _runs(output)[2]
        _assert_resumed(run, m)
        assert _iterations(run)[-1] == TRAIN_ITERS and _exited_at(run) is None, run[-3000:]
        assert cluster.job(job_id)["ExitCode"] == "0:0" and _latest(ckpt) == TRAIN_ITERS
    finally:
        subprocess.run(["scancel", job_id], env=cluster.env, capture_output=True)
