"""Host memory on CPU: keep freed heap memory for the next step instead of returning it.

XLA:CPU gives each execution of a compiled program one buffer for all its temporaries (10.7 GB
for a SigLIP B/16 train step at batch 32) from `posix_memalign`, and frees it when the step
ends. glibc serves a request that large with a fresh `mmap` and hands it back with `munmap`,
so the next step page-faults every page of it again: 2.7 M minor faults and ~7 s of kernel
time per step on 2 cores, a quarter of the step (docs/benchmarks.md). tcmalloc avoids this by
design; so does glibc once told to (what `retain()` does, through `mallopt`):

  M_ARENA_MAX=1     every thread allocates from the main heap: glibc's per-thread arenas are
                    64 MiB heaps that cannot hold such a buffer and fall back to mmap for it;
  M_MMAP_MAX=0      no request is served by mmap, so none is unmapped when freed;
  M_TRIM_THRESHOLD  -1: the heap is never trimmed, so freed pages stay mapped and warm.

The process then keeps its peak footprint (which every step reaches again anyway); steps after
the first run without page faults (SigLIP B/16: 16.0 -> 11.9 s).

It must run before JAX starts its CPU client: a thread picks its malloc arena at its first
allocation, and the arena setting binds only threads that have not picked one yet. The entry
points (`vlpjax.train`, `vlpjax.evaluate`, `tools.benchmark`) call `configure()` first thing.

`VLPJAX_HOST_MALLOC` chooses: `auto` (default) retains when the run will use the CPU backend
(`JAX_PLATFORMS` says cpu, or the machine has no GPU/TPU device; with accelerators the big
buffers live in device memory, and one shared arena could slow a busy input pipeline),
`retain` always, `system` never.
"""
import ctypes
import ctypes.util
import glob
import os
import platform

ENV_VAR = "VLPJAX_HOST_MALLOC"
CHOICES = ("auto", "retain", "system")

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Device files of accelerators JAX would use: NVIDIA GPUs, AMD GPUs, TPU chips (v4+ / older).
_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")

_applied = False


def will_run_on_cpu() -> bool:
  """Whether JAX will pick the CPU backend, judged without starting any backend.

  `JAX_PLATFORMS` decides when set; otherwise the machine's accelerator device files (NVIDIA,
  AMD, TPU): JAX falls back to the CPU when there are none, even with a GPU or TPU plugin
  installed (the `[tpu]` extra installs libtpu on CPU machines for AOT compilation).
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def retain() -> bool:
  """Sets glibc's malloc to keep freed memory (module docstring). False if not glibc."""
  global _applied
  if _applied:
    return True
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  _applied = ok
  return ok


def release() -> None:
  """Returns the heap's free memory to the OS now (glibc `malloc_trim`); a no-op elsewhere.

  For a process about to run a different program (e.g. a second model in a benchmark), so the
  memory the first one retained does not add to the second's.
  """
  if _applied:
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def configure() -> bool:
  """Applies `VLPJAX_HOST_MALLOC` (default auto); returns whether memory is now retained."""
  choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
  if choice not in CHOICES:
    raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {', '.join(CHOICES)}.")
  if choice == "system" or (choice == "auto" and not will_run_on_cpu()):
    return False
  return retain()
