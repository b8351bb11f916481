"""Faults under torchrun, 4 gloo ranks of a tiny MoE (expert-parallel 2): a killed rank makes
torchrun restart the group, which resumes from the last complete checkpoint on the same loss
curve; a hung rank stops the whole job within --distributed-timeout-minutes, the error naming
the ranks that waited for it."""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron.core.parallel_state import _suspects, groups_from_mesh
from tests.distributed.harness import run_distributed
from tests.helpers import TINY_FLAGS

REPO = Path(__file__).resolve().parents[2]
WORLD = 4
VICTIM = 2
"""Local rank that is killed or stopped (neither rank 0, which logs, nor the last)."""
TRAIN_ITERS = 12
FLAGS = (TINY_FLAGS + f" --micro-batch-size 1 --global-batch-size 4 --train-iters {TRAIN_ITERS} "
         "--expert-model-parallel-size 2 --distributed-backend gloo")
TIMING_FIELDS = ("elapsed time per iteration (ms)", "throughput per GPU (TFLOP/s/GPU)", "tokens per second",
                 "peak memory (GiB)", "ETA")
ITERATION = re.compile(r"^\s*iteration\s+(\d+)/")
LOADED = re.compile(r"loaded checkpoint from \S+ at iteration (\d+)")
SAVED = re.compile(r"saved checkpoint at iteration\s+(\d+)")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds torchrun's workers in /proc and stops them with SIGSTOP")


class Job:
    """`torchrun --standalone --nproc-per-node 4 pretrain_gpt.py ...` with its merged output
    collected line by line in a background thread."""

    def __init__(self, flags: str, max_restarts: int):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.1", "pretrain_gpt.py", *flags.split()]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.times: list[float] = []
        """time.monotonic() when each line arrived"""
        self.seen: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.times.append(time.monotonic())
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> None:
        """Block until a line matches `pattern`; fail if the job ends or `timeout` passes first."""
        regex, deadline = re.compile(pattern), time.monotonic() + timeout
        while not any(regex.search(line) for line in list(self.lines)):
            assert self.proc.poll() is None, f"job ended before {pattern!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{self.output}"
            time.sleep(0.01)

    def worker_pid(self, local_rank: int, restart: int = 0) -> int:
        """The pid of the worker with `local_rank` in torchrun's `restart`-th worker group."""
        for pid, env in self._workers():
            if env.get("LOCAL_RANK") == str(local_rank) and env.get("TORCHELASTIC_RESTART_COUNT") == str(restart):
                return pid
        raise AssertionError(f"no worker with local rank {local_rank} (restart {restart}):\n{self.output}")

    def _workers(self) -> list[tuple[int, dict]]:
        """Torchrun's child processes and their environments (Linux /proc)."""
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) != self.proc.pid:
                    continue
                raw = Path(f"/proc/{entry}/environ").read_bytes().decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            out.append((int(entry), dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)))
        self.seen.update(pid for pid, _ in out)
        return out

    def finish(self, timeout: float) -> int:
        """Torchrun's exit status; fail if it runs longer than `timeout` seconds."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"job still running after {timeout} s:\n{self.output}") from None
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """SIGKILL (then SIGCONT) every worker of this job still running, and torchrun itself."""
        self._workers()
        for pid in self.seen:
            if not _is_worker(pid):  # exited (its pid may since be another process's)
                continue
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _is_worker(pid: int) -> bool:
    try:
        return b"pretrain_gpt.py" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
            b"TORCHELASTIC_RUN_ID=" in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def iteration_logs(lines: list[str]) -> dict[int, dict[str, str]]:
    """{iteration: every field of its log line except timings} (learning rate, losses, grad norm, ...)."""
    out = {}
    for line in lines:
        m = ITERATION.match(line)
        if m:
            parts = [p.strip().split(": ", 1) for p in line.split("|")[1:]]
            out[int(m.group(1))] = {p[0]: p[1] for p in parts if len(p) == 2 and p[0] not in TIMING_FIELDS}
    return out


def split_attempts(lines: list[str]) -> tuple[list[str], list[str], int]:
    """The output before and after the restarted group's 'loaded checkpoint' line, and its iteration."""
    for i, line in enumerate(lines):
        m = LOADED.search(line)
        if m:
            return lines[:i], lines[i + 1:], int(m.group(1))
    raise AssertionError("no 'loaded checkpoint' line: the restarted group did not resume:\n" + "".join(lines))


def run_flags(save: Path, save_interval: int) -> str:
    return f"{FLAGS} --log-interval 1 --save {save} --load {save} --save-interval {save_interval}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, dict[str, str]]:
    """The log of every iteration of an uninterrupted run."""
    job = Job(run_flags(tmp_path_factory.mktemp("reference"), 4), max_restarts=0)
    try:
        code = job.finish(timeout=150)
    finally:
        job.kill()
    assert code == 0, job.output
    logs = iteration_logs(job.lines)
    assert sorted(logs) == list(range(1, TRAIN_ITERS + 1)), job.output
    return logs


def assert_same_iterations(logs: dict[int, dict[str, str]], reference: dict[int, dict[str, str]], what: str):
    for iteration, fields in logs.items():
        assert fields == reference[iteration], (what, iteration, fields, reference[iteration])


@linux_only
def test_killed_rank_is_restarted_and_resumes_on_the_same_curve(tmp_path, reference):
    """SIGKILL local rank 2 after the checkpoint of iteration 4 is published: torchrun restarts
    the group, which loads iteration 4 and finishes (exit 0); every logged iteration of both
    attempts (losses, grad norm, learning rate, consumed samples) is the uninterrupted run's."""
    save = tmp_path / "ckpt"
    job = Job(run_flags(save, 4), max_restarts=1)
    try:
        job.wait_for(r"saved checkpoint at iteration\s+4 ", timeout=150)
        os.kill(job.worker_pid(VICTIM), signal.SIGKILL)
        code = job.finish(timeout=150)
    finally:
        job.kill()
    assert code == 0, job.output
    first, resumed, loaded = split_attempts(job.lines)
    published = [int(m.group(1)) for m in map(SAVED.search, first) if m]
    assert loaded >= 4 and loaded == max(published), job.output
    first_logs, resumed_logs = iteration_logs(first), iteration_logs(resumed)
    assert max(first_logs) < TRAIN_ITERS, "the kill came after the run ended"
    assert sorted(resumed_logs) == list(range(loaded + 1, TRAIN_ITERS + 1)), job.output
    assert_same_iterations(first_logs, reference, "first attempt")
    assert_same_iterations(resumed_logs, reference, "after the restart")
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(TRAIN_ITERS)


def read_latest(save: Path) -> int | None:
    try:
        return int((save / "latest_checkpointed_iteration.txt").read_text())
    except (OSError, ValueError):
        return None


def kill_during_save(job: Job, save: Path, after: int, timeout: float) -> None:
    """SIGKILL local rank 2 as soon as the save after a published iteration >= `after` has begun."""
    deadline = time.monotonic() + timeout
    while True:
        latest = read_latest(save)
        if latest is not None and latest >= after and (save / f"iter_{latest + 1:07d}.tmp").is_dir():
            os.kill(job.worker_pid(VICTIM), signal.SIGKILL)
            return
        assert job.proc.poll() is None and time.monotonic() < deadline, job.output
        time.sleep(0.001)


@linux_only
def test_rank_killed_while_saving_resumes_from_the_previous_checkpoint(tmp_path, reference):
    """Save every iteration; SIGKILL local rank 2 while a checkpoint is being written. The partial
    `iter_N.tmp` is never published or loaded: the restarted group loads iteration N - 1 (what
    `latest` named when it started), trains on the uninterrupted run's curve, finishes with exit 0
    and leaves no temporary directory behind."""
    save = tmp_path / "ckpt"
    job = Job(run_flags(save, 1), max_restarts=1)
    try:
        kill_during_save(job, save, after=2, timeout=150)
        time.sleep(0.5)  # the survivors fail; the restarted group needs seconds to start
        latest = read_latest(save)
        partial = sorted(p.name for p in save.glob("iter_*.tmp"))
        published = (save / f"iter_{latest + 1:07d}").exists()
        code = job.finish(timeout=150)
    finally:
        job.kill()
    assert partial == [f"iter_{latest + 1:07d}.tmp"] and not published, (partial, latest, published)
    assert code == 0, job.output
    first, resumed, loaded = split_attempts(job.lines)
    assert loaded == latest, job.output
    assert_same_iterations(iteration_logs(first), reference, "first attempt")
    resumed_logs = iteration_logs(resumed)
    assert sorted(resumed_logs) == list(range(loaded + 1, TRAIN_ITERS + 1)), job.output
    assert_same_iterations(resumed_logs, reference, "after the restart")
    assert read_latest(save) == TRAIN_ITERS and not list(save.glob("*.tmp")) and not list(save.glob("*.old"))


def _group_timeouts(rank: int, world: int, seconds: float) -> dict[str, datetime.timedelta]:
    groups = groups_from_mesh(2, torch.device("cpu"), "gloo", timeout=datetime.timedelta(seconds=seconds))
    return {name: getattr(groups, name)._get_backend(torch.device("cpu")).options._timeout
            for name in ("dp", "tp", "tp_dp", "ep", "etp", "ep_etp", "expert_dp")}


def test_every_group_gets_the_distributed_timeout():
    """DeviceMesh makes its groups with torch's default timeout (30 min for gloo), not
    init_process_group's: the expert all-to-all and gradient reductions must get
    --distributed-timeout-minutes too."""
    for rank_timeouts in run_distributed(_group_timeouts, WORLD, 12.0):
        assert rank_timeouts == dict.fromkeys(rank_timeouts, datetime.timedelta(seconds=12)), rank_timeouts


TIMEOUT_MINUTES = 0.2
TORCHRUN_GRACE_S = 30
"""How long torchrun waits for a worker to exit on SIGTERM before it sends SIGKILL (a stopped or
hung worker never exits on SIGTERM); fixed in torch.distributed.elastic's _stop_workers."""


@linux_only
def test_hung_rank_stops_the_job_within_the_timeout_naming_it():
    """SIGSTOP local rank 2 (the others block in collectives with it): within
    --distributed-timeout-minutes (12 s) plus a few seconds the other ranks each print one line
    naming themselves, the flag, the ranks that timed out and rank 2 as the suspect; torchrun
    (--max-restarts 0) then exits non-zero once its grace period for the stopped rank is over."""
    timeout_s = TIMEOUT_MINUTES * 60
    job = Job(f"{FLAGS} --log-interval 1 --train-iters 100000 --distributed-timeout-minutes {TIMEOUT_MINUTES}",
              max_restarts=0)
    try:
        job.wait_for(r"iteration\s+3/", timeout=150)
        os.kill(job.worker_pid(VICTIM), signal.SIGSTOP)
        stopped = time.monotonic()
        code = job.finish(timeout=timeout_s + TORCHRUN_GRACE_S + 60)
        elapsed = time.monotonic() - stopped
    finally:
        job.kill()
    errors = [(t - stopped, line) for t, line in zip(job.times, job.lines) if "CollectiveTimeout: " in line]
    assert code != 0 and errors, job.output
    exact = f"timed out: ranks 0, 1, 3; did not time out, so probably hung or crashed: rank {VICTIM} (check its log)"
    assert any(exact in line for _, line in errors), job.output
    for after, line in errors:
        # a survivor may have begun waiting for rank 2 up to an iteration before the SIGSTOP
        assert timeout_s - 3 <= after < timeout_s + 15, (after, line)
        assert "a collective did not finish within 0.2 min (--distributed-timeout-minutes)" in line, line
        suspects = re.search(r"did not time out, so probably hung or crashed: ranks? ([0-9, ]+)", line).group(1)
        assert str(VICTIM) in suspects.replace(" ", "").split(","), line
    assert {int(re.search(r"rank (\d) of 4", line).group(1)) for _, line in errors} <= {0, 1, 3}
    assert elapsed < timeout_s + TORCHRUN_GRACE_S + 20, elapsed


def test_suspects_line_stays_short():
    """The hang report lists at most 8 ranks per list; every rank timing out means mismatched collectives."""
    line = _suspects(1024, [r for r in range(1024) if r != 700])
    assert line == ("timed out: ranks 0, 1, 2, 3, 4, 5, 6, 7, ... (1023 in all); did not time out, so probably "
                    "hung or crashed: rank 700 (check its log)")
    assert _suspects(2, [0, 1]).startswith("every rank timed out")
    assert "check the log of one that does not" in _suspects(4, None)
