"""Host memory on CPU: stop XLA's per-step temporaries from costing a page fault per 4 KiB.

XLA:CPU gives each execution of a compiled program one buffer for all its temporaries (10.7 GB
for a SigLIP B/16 train step at batch 32) from `posix_memalign`, and frees it when the step
ends. glibc serves a request that large with a fresh `mmap` and hands it back with `munmap`,
so the next step page-faults every 4 KiB page of it again: 2.7 M minor faults and ~7 s of
kernel time per step on 2 cores, a quarter of the step (docs/benchmarks.md). Two remedies:

  hugepages  glibc's `glibc.malloc.hugetlb=1` tunable: malloc asks for transparent huge pages
             (`madvise`), so the same buffer faults in 2 MiB pages (100x fewer faults in
             tests/test_host_memory.py; SigLIP B/16: 16.0 -> 12.7-13.7 s per step). Memory
             still goes back to the OS every step, so the footprint is what the program
             needs. glibc reads tunables only at start-up: from the command line the entry
             point re-executes itself once with `GLIBC_TUNABLES` set (same pid, same
             arguments; ~0.1 s).
  retain     `mallopt`: one arena, no mmap, no trimming; freed pages stay mapped, so steps after
             the first fault nothing (12.1 s). But the heap cannot move a live block: when a small
             allocation lands in the freed buffer, the next step's buffer comes from fresh heap,
             and the process can hold two steps' temporaries (a scanned SigLIP B/16 step, 13.7 GB
             of temporaries, was killed for memory on this 24 GiB machine). Opt-in only.

`VLPJAX_HOST_MALLOC` chooses: `auto` (default) = `hugepages` when the run will use the CPU
backend (`JAX_PLATFORMS` says cpu, or the machine has no GPU/TPU device: with accelerators the
big buffers live in device memory), the kernel allows transparent huge pages and glibc is 2.35
or newer, and the process was started from the command line (a library caller, a notebook or
a test process is never re-executed); otherwise glibc's defaults. `hugepages` and `retain`
force those; `system` leaves malloc alone. The entry points (`vlpjax.train`, `vlpjax.evaluate`,
`tools.benchmark`) call `configure()` first thing, before JAX starts its CPU client.
"""
import ctypes
import ctypes.util
import glob
import os
import platform
import sys

ENV_VAR = "VLPJAX_HOST_MALLOC"
CHOICES = ("auto", "hugepages", "retain", "system")
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# Set in the re-executed process: it never re-executes again, whatever it finds.
_REEXECUTED = "VLPJAX_HOST_MALLOC_REEXECUTED"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"

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


def hugepages_active() -> bool:
  """Whether this process started with glibc's huge-page tunable (inherited or re-executed)."""
  return HUGEPAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def hugepages_supported() -> bool:
  """glibc >= 2.35 (the tunable's first release) and a kernel whose transparent huge pages
  are not `never` (`madvise` or `always`)."""
  if platform.system() != "Linux":
    return False
  libc, version = platform.libc_ver()
  try:
    if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
      return False
    with open(_THP_MODE) as f:
      return "[never]" not in f.read()
  except (OSError, ValueError):
    return False


def use_hugepages(command_line: bool) -> bool:
  """Makes malloc use huge pages: True if it already does; else, from the command line,
  re-executes this process (same pid and arguments) with the tunable set, which does not
  return. False where that cannot or must not happen (not a command line, unsupported)."""
  if hugepages_active():
    return True
  if not command_line or os.environ.get(_REEXECUTED) or not hugepages_supported():
    return False
  env = dict(os.environ, **{_REEXECUTED: "1"})
  env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), HUGEPAGES_TUNABLE)))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
  return True  # not reached


def configure(command_line: bool = False) -> str:
  """Applies `VLPJAX_HOST_MALLOC` (default auto); returns the mode now in effect: "hugepages",
  "retain" or "system". `command_line`: the caller is a program's entry point started from
  the command line (`main()` with no argv), which may re-execute itself for `hugepages`."""
  choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
  if choice not in CHOICES:
    raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {', '.join(CHOICES)}.")
  if choice == "retain":
    return "retain" if retain() else "system"
  if choice == "hugepages" or (choice == "auto" and will_run_on_cpu()):
    return "hugepages" if use_hugepages(command_line) else "system"
  return "system"
