"""One XLA CPU device per core, so that independent runs use every core.

Import and call `use_all_cores()` before jax is imported. It only affects the CPU
platform (GPU/TPU devices are unchanged) and does nothing if XLA_FLAGS already sets
the host device count. Results do not depend on it (tests/test_runner.py).
"""

import os


def use_all_cores() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count or 1}".strip()
