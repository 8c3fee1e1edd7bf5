"""The entry points' re-execution with glibc malloc tunables that keep XLA:CPU's scratch buffer mapped."""
import os
import platform
import subprocess
import sys

import pytest

from instructgpt_jax import host_memory

ALL = ":".join(f"{key}={value}" for key, value in host_memory.TUNABLES.items())


def test_reexec_adds_the_missing_tunables_and_keeps_the_users():
    env = host_memory.reexec_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "A": "1"}, "glibc")
    others = [f"{k}={v}" for k, v in host_memory.TUNABLES.items() if k != "glibc.malloc.hugetlb"]
    want = ["glibc.malloc.hugetlb=0", *others]
    assert env == {"GLIBC_TUNABLES": ":".join(want), "A": "1"}
    assert host_memory.reexec_environment({}, "glibc") == {"GLIBC_TUNABLES": ALL}


@pytest.mark.parametrize("environ, libc", [
    ({"GLIBC_TUNABLES": ALL}, "glibc"),  # already re-executed: no loop
    ({"INSTRUCTGPT_JAX_KEEP_MALLOC": "1"}, "glibc"),
    ({}, ""),  # musl and others: no glibc tunables
])
def test_no_reexec_where_it_cannot_change_the_allocator(environ, libc):
    assert host_memory.reexec_environment(environ, libc) is None


def test_a_process_reexecutes_once_with_the_tunables():
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("needs Linux and glibc")
    code = ("import os, sys; from instructgpt_jax import host_memory; print('start', flush=True); "
            "host_memory.keep_scratch_memory_mapped(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", code, "an argument"], capture_output=True, text=True, env=env,
                         check=True).stdout.split("\n")
    assert out[:3] == ["start", "start", f"{ALL} ['an argument']"]  # ran twice, the second time with them


def test_large_allocations_stay_mapped_across_calls_under_the_tunables():
    """A 256 MiB buffer malloc'ed, touched and freed four times faults its pages in only the first time."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("needs Linux and glibc")
    code = ("import ctypes, resource; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; faults = []\n"
            "for _ in range(4):\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; p = libc.malloc(1 << 28)\n"
            "    ctypes.memset(p, 1, 1 << 28); libc.free(ctypes.c_void_p(p))\n"
            "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
            "print(*faults)")
    def faults(tunables):
        env = {**os.environ, "GLIBC_TUNABLES": tunables}
        return [int(x) for x in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                               check=True).stdout.split()]
    default, kept = faults(""), faults(ALL)
    assert min(default[1:]) > 100  # mmap'ed and unmapped every time: faulted in again
    assert max(kept[1:]) < 10  # reused
