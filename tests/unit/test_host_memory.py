"""keep_freed_host_memory: freed activations are reused instead of page-faulted in again."""

import subprocess
import sys
import textwrap

import pytest

# A step-like pattern: activations of 2 to 24 MiB allocated, held, then all freed. glibc's
# own default adapts its thresholds as it goes, so whether it faults depends on the history of
# the process; the probe starts from glibc's initial thresholds (128 KiB) to be deterministic.
PROBE = textwrap.dedent("""
    import ctypes, resource, torch
    from megatron.training.host_memory import keep_freed_host_memory

    def faults_per_step():
        def step():
            held = [torch.ones(n * 2**18) for n in (4, 16, 8, 24, 2, 12, 16, 4)]
            del held
        for _ in range(3):
            step()
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, glibc's initial value
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD, likewise
    before = faults_per_step()
    assert keep_freed_host_memory()
    print(before, faults_per_step())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert before > 20000  # 86 MiB of fresh pages a step: ~22,000 faults
    assert after < 2000
