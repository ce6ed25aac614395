"""Running vlpjax command lines as separate processes: one, or several joined as one JAX run."""
import os
import random
import socket
import subprocess
import sys
import time
from typing import List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(low: int = 0) -> int:
  """A free TCP port on 127.0.0.1; with `low`, one in [low, 65535] (not the OS's pick)."""
  candidates = [0] if not low else random.sample(range(low, 65536), 200)
  for port in candidates:
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return s.getsockname()[1]
  raise RuntimeError(f"no free port in [{low}, 65535]")


def env_with_devices(devices: int) -> dict:
  """This environment with `devices` CPU devices (the other XLA flags kept)."""
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  return {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": " ".join(flags)}


def env_compiling_everything() -> dict:
  """This environment without the test run's compilation cache (see conftest.py)."""
  return {name: value for name, value in os.environ.items()
          if name != "JAX_COMPILATION_CACHE_DIR"}


def start_processes(args: Sequence[str], *, num_processes: int = 2, devices_each: int = 4,
                    **popen_kwargs) -> List[subprocess.Popen]:
  """`python -m <args>` as `num_processes` processes of one jax.distributed run on 127.0.0.1.

  Each process gets `devices_each` CPU devices; JAX's CPU collectives (gloo) connect them.
  """
  port = free_port()
  popen_kwargs.setdefault("stdout", subprocess.PIPE)
  popen_kwargs.setdefault("stderr", subprocess.STDOUT)
  return [subprocess.Popen(
      [sys.executable, "-m", *args,
       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       f"--config.distributed.num_processes={num_processes}",
       f"--config.distributed.process_id={i}"],
      env=env_with_devices(devices_each), cwd=REPO, text=True, **popen_kwargs)
          for i in range(num_processes)]


def communicate_all(procs: Sequence[subprocess.Popen], timeout: float) -> List[str]:
  """Waits for every process and returns their outputs. Past `timeout` it kills them all (a
  process of a joined run must not keep the coordinator's port) and fails with every
  process's output: which one hung, and where, is the whole diagnosis."""
  deadline = time.monotonic() + timeout
  try:
    return [p.communicate(timeout=max(0.0, deadline - time.monotonic()))[0] for p in procs]
  except subprocess.TimeoutExpired:
    states = ["still running" if p.poll() is None else f"exited {p.returncode}" for p in procs]
    for p in procs:
      p.kill()
    logs = [f"process {i}, {state}:\n{(p.communicate()[0] or '')[-3000:]}"
            for i, (p, state) in enumerate(zip(procs, states))]
    raise AssertionError(f"not all {len(procs)} processes ended within {timeout} s:\n"
                         + "\n".join(logs)) from None
  finally:
    for p in procs:
      p.kill()


def run_processes(args: Sequence[str], *, timeout: float = 600, **kwargs) -> List[str]:
  """Starts them, waits, asserts every process exited 0; returns their logs."""
  procs = start_processes(args, **kwargs)
  logs = communicate_all(procs, timeout)
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log[-3000:]}"
  return logs
