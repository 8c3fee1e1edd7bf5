"""The entry points' re-execution with glibc's huge-page malloc tunable."""
import os
import platform
import subprocess
import sys

import pytest

from instructgpt_jax import host_memory


def test_reexec_adds_the_tunable_to_existing_ones():
    env = host_memory.reexec_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"}, "madvise", "glibc")
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "1"}
    assert host_memory.reexec_environment({}, "madvise", "glibc") == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize("environ, thp, libc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", "glibc"),  # the user's own choice stands
    ({"INSTRUCTGPT_JAX_KEEP_MALLOC": "1"}, "madvise", "glibc"),
    ({}, "never", "glibc"), ({}, "always", "glibc"), ({}, None, "glibc"),
    ({}, "madvise", ""),  # musl and others: no glibc tunables
])
def test_no_reexec_where_it_cannot_change_the_allocator(environ, thp, libc):
    assert host_memory.reexec_environment(environ, thp, libc) is None


def test_thp_mode_is_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.transparent_huge_page_mode(str(path)) == "madvise"
    assert host_memory.transparent_huge_page_mode(str(tmp_path / "missing")) is None


def test_a_process_reexecutes_once_with_the_tunable():
    applies = (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
               and host_memory.transparent_huge_page_mode() == "madvise")
    if not applies:
        pytest.skip("needs Linux, glibc and transparent huge pages in madvise mode")
    code = ("import os, sys; from instructgpt_jax import host_memory; print('start', flush=True); "
            "host_memory.use_huge_pages_for_large_allocations(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", code, "an argument"], capture_output=True, text=True, env=env,
                         check=True).stdout.split("\n")
    assert out[:3] == ["start", "start", "glibc.malloc.hugetlb=1 ['an argument']"]  # ran twice, then once with it
