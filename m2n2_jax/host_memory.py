"""Freed host memory handed back to the operating system.

glibc keeps the pages of freed heap blocks for reuse, and its threshold for giving a
block its own mapping rises to 32 MB once large blocks are freed, so a model's leaves
live on its heap. A run that stacks donated seeds (their leaves freed one by one) and
compiles its step leaves about 1.5 GB of such pages on SmolLM2 (docs/recipes.md), none
of them in use. `release` asks glibc to return them (`malloc_trim(0)`); elsewhere it
does nothing. `run` calls it once the seeds are stacked, once the run has started,
once the step has compiled (before its first call, whose temporaries would otherwise
come on top of what compiling left) and after that call; not at every call: returned
pages are faulted in afresh when used again.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or none loaded)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def release() -> bool:
    """Return the pages of freed heap blocks to the system: whether any were (False
    where the C library is not glibc)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
