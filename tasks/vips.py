"""libvips (pyvips), imported and set up once per process, on first use.

``vips()`` returns the ``pyvips`` module after:

- ``block_untrusted_set(True)``: loaders libvips marks untrusted (ImageMagick, MATLAB, ...)
  refuse to run, whatever bytes reach them; callers also name their loader
  (``pngload_buffer``...) rather than let libvips sniff;
- ``cache_set_max(0)`` (and its memory and file limits): no operation cache, so nothing an image
  computed stays alive after its call and memory stays flat over a run;
- ``concurrency_set(1)``: one worker thread per pipeline. Our callers already run on worker
  threads (``asyncio.to_thread``) on a 2-core machine; libvips' default (one thread per core for
  every pipeline) would oversubscribe them. ``VIPS_CONCURRENCY`` in the environment wins.

The import (about 60 ms) waits for the first caller, so commands that decode nothing with
libvips never pay it.
"""

from __future__ import annotations

import os
import threading
from types import ModuleType

__all__ = ["vips"]

_LOCK = threading.Lock()
_MODULE: ModuleType | None = None


def vips() -> ModuleType:
    """The ``pyvips`` module, hardened and set up for this process (see the module docstring)."""
    global _MODULE
    module = _MODULE
    if module is not None:
        return module
    with _LOCK:
        if _MODULE is None:
            import pyvips

            pyvips.block_untrusted_set(True)
            pyvips.cache_set_max(0)
            pyvips.cache_set_max_mem(0)
            pyvips.cache_set_max_files(0)
            if not os.environ.get("VIPS_CONCURRENCY"):
                pyvips.concurrency_set(1)
            _MODULE = pyvips
        return _MODULE
