"""glibc malloc settings that keep XLA:CPU's per-call scratch buffer mapped between calls (Linux, glibc).

At every call an XLA:CPU executable mallocs its scratch buffer (2.2 GB for bench train's step: 8 layers,
d_model 512, T=512, batch 8) and frees it at the end. By default glibc serves an allocation that large with
a fresh mmap and unmaps it on free, so the kernel faults in and zeroes 2.2 GB at every step, 4 KiB at a
time: ~630k page faults and 1-3 s of system time per 3-4 s step on the 2-core CPU. The tunables below

  glibc.malloc.arena_max=1          every thread allocates from the main arena (a worker thread's arena
                                    would mmap any allocation this large, whatever the other settings),
  glibc.malloc.mmap_max=0           which grows its heap instead of mapping large chunks separately,
  glibc.malloc.trim_threshold=1 TiB and keeps what was freed instead of returning it to the kernel,
  glibc.malloc.hugetlb=1            in transparent huge pages (2 MiB) where the kernel grows it,

make the second and later steps reuse the same memory: 0 page faults per step. The cost is that the process
keeps its peak heap until it exits, as jemalloc and tcmalloc also do. Measured on bench train's step in
alternating processes (4 steps each, each step bracketed by the matmul; median utilisation per process):
by default 0.56 and 0.51 against 0.66 and 0.66 with hugetlb=1 alone (~1.5k faults per step); in a later
run, after the flash attention kernel, hugetlb=1 alone 0.70 / 0.71 / 0.74 (0.15-1.0 s of system time per
step) against all four 0.75 / 0.70 / 0.74 (0.03-0.13 s).

glibc reads tunables once, at process start, so the command-line entry points re-execute themselves once
with the missing ones added. Nothing happens off Linux/glibc, when every key is already in GLIBC_TUNABLES
(a key the user set keeps the user's value), or with INSTRUCTGPT_JAX_KEEP_MALLOC=1 in the environment.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLES = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
    "glibc.malloc.hugetlb": "1",
}
OPT_OUT = "INSTRUCTGPT_JAX_KEEP_MALLOC"


def reexec_environment(environ, libc: str) -> dict | None:
    """The environment to re-execute with, or None when re-executing would not change the allocator."""
    current = environ.get("GLIBC_TUNABLES", "")
    present = {item.split("=", 1)[0] for item in current.split(":") if item}
    missing = [f"{key}={value}" for key, value in TUNABLES.items() if key not in present]
    if environ.get(OPT_OUT) == "1" or libc != "glibc" or not missing:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (current, *missing)))}


def keep_scratch_memory_mapped() -> None:
    """Re-executes this process (same interpreter, same arguments) with the tunables, if any is missing."""
    if sys.platform != "linux":
        return
    env = reexec_environment(os.environ, platform.libc_ver()[0])
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
