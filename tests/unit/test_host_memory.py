"""keep_freed_host_memory: freed activations are reused instead of page-faulted in again."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from megatron.training.host_memory import keep_freed_host_memory

    def faults_per_step():
        for _ in range(3):
            torch.ones(4 * 2**20)  # 16 MiB, allocated, written and freed like an activation
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.ones(4 * 2**20)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10

    before = faults_per_step()
    assert keep_freed_host_memory()
    print(before, faults_per_step())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert before > 1000  # each 16 MiB tensor is fresh mmap pages: ~4096 faults
    assert after < 50
