"""m2n2_jax/host_memory.py: freed heap pages handed back, and where `run` does it."""

import ctypes

import jax
import jax.numpy as jnp
import problems as P
import pytest

import m2n2_jax as mj
from m2n2_jax import host_memory, runner

GLIBC = host_memory._malloc_trim() is not None


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_returns_the_pages_of_freed_heap_blocks():
    """256 MB of 64 kB blocks (below glibc's mmap threshold: on the heap), written,
    then freed under a block still held above them (so glibc cannot trim the heap's
    top): the counter-case, their pages stay resident; `release` returns them."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 4096
    before = resident_bytes()
    blocks = [libc.malloc(size) for _ in range(count)]
    guard = libc.malloc(size)
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
    kept = resident_bytes()
    assert kept - before > 200e6  # glibc kept the freed pages
    assert host_memory.release()
    assert kept - resident_bytes() > 200e6
    libc.free(guard)


def test_run_releases_after_stacking_after_starting_and_around_the_first_step(monkeypatch):
    """Four releases: after the donated seeds were deleted (once stacked; once the start
    has compiled), once the step is compiled but before its first call, and right
    after that call; none later."""
    seeds = [P.init_model(jax.random.key(i)) for i in range(3)]
    calls, lowered, releases = [], [], []

    class Step:  # runner._step_program, counting its calls and compilations
        def __init__(self, jitted):
            self.jitted = jitted

        def __call__(self, *args, **kwargs):
            calls.append(1)
            return self.jitted(*args, **kwargs)

        def lower(self, *args, **kwargs):
            lowered.append(1)
            return self.jitted.lower(*args, **kwargs)

    monkeypatch.setattr(runner, "_step_program", Step(runner._step_program))
    monkeypatch.setattr(host_memory, "release", lambda: releases.append(
        (len(lowered), len(calls), all(x.is_deleted() for x in jax.tree.leaves(seeds)))) or True)
    algo = mj.M2N2(archive_size=4, mutation=False)
    mj.run(algo, P.KEYS, P.score_fn, P.TRAIN, 40, params=algo.default_params().replace(warmup=jnp.int32(3)),
           seed_models=seeds, donate_seeds=True, log_every=5, steps_per_call=5, progress=False)
    assert len(calls) > 2 and len(lowered) == 1
    assert releases == [(0, 0, True), (0, 0, True), (1, 0, True), (1, 1, True)]
