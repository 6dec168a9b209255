"""tcmalloc for the training workers, where the machine has it.

A worker's input pipeline allocates large buffers that live for milliseconds: each encoded image (copied from
Parquet into Python, into a string tensor, out of its chunk), each decoded and resized frame. glibc's malloc hands
buffers of that size back to the kernel when they are freed, so every image costs fresh pages: perf showed ~30%
of a worker's CPU in page faults and munmap against ~3% for a textbook tf.data decode, and tcmalloc, which keeps
freed memory for reuse, made the pipeline 1.4-1.9x faster (`benchmarks/pipeline.py`, contender
`pipeline_tcmalloc`). glibc's own tunables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_ARENA_MAX)
did not change it. TensorFlow's performance guide recommends tcmalloc for the same reason.
"""

from __future__ import annotations

import glob
import os

# Debian/Ubuntu (libtcmalloc-minimal4, any architecture), RHEL/Fedora (gperftools-libs), the cluster image.
TCMALLOC_GLOBS = (
    "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/local/lib/libtcmalloc_minimal.so.4",
)
# tcmalloc prints a line for every allocation over 1 GiB by default; a large shuffle buffer or cache is not news.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def tcmalloc_path() -> str | None:
    """This machine's tcmalloc library, if installed."""
    found = (path for pattern in TCMALLOC_GLOBS for path in sorted(glob.glob(pattern)))
    return next(found, None)


def worker_env(ray_address: str | None) -> dict[str, str]:
    """What the job adds to its workers' environment so they run on tcmalloc: nothing when something is preloaded
    already (the cluster image sets LD_PRELOAD itself), when this machine has no tcmalloc, or for Ray Client
    (ray://), whose workers run on machines this one knows nothing of."""
    if os.environ.get("LD_PRELOAD") or (ray_address or "").startswith("ray://"):
        return {}
    path = tcmalloc_path()
    return {"LD_PRELOAD": path, **QUIET} if path else {}


def in_this_process() -> str:
    """The allocator this process runs on: 'tcmalloc' or 'system'."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "libtcmalloc" in f.read() else "system"
    except OSError:  # not Linux
        return "system"
