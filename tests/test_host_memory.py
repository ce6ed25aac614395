"""vlpjax.host_memory: with huge pages or `retain`, XLA:CPU steps stop faulting every 4 KiB page."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vlpjax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted program whose temporary (a 64 MiB matmul result) is far above glibc's mmap threshold:
# by default each call maps it afresh and faults every page in again. Cheap (~50 ms a call), so
# a run makes enough calls to judge the typical one.
_PROGRAM = """
import json, os, resource, sys
from vlpjax import host_memory
mode = host_memory.configure(command_line=True)
import jax, jax.numpy as jnp
a = jnp.ones((4096, 256), jnp.float32) / 256
f = jax.jit(lambda a: jnp.sum(jnp.sin(a @ a.T) * ((2 * a) @ a.T)))
f(a).block_until_ready()
faults = []
for _ in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"mode": mode, "faults": faults, "pid": os.getpid(),
                  "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""
PAGES = 4096 * 4096 * 4 // 4096  # the 64 MiB temporary, in 4 KiB pages


def _run(choice: str):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", host_memory.ENV_VAR: choice,
         "PYTHONPATH": REPO, "XLA_FLAGS": ""}
  env.pop("GLIBC_TUNABLES", None)
  with subprocess.Popen([sys.executable, "-c", _PROGRAM], env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True) as proc:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
  lines = out.strip().splitlines()
  assert len(lines) == 1, out   # the program ran to the end once (re-executed before output)
  return dict(json.loads(lines[0]), launched_pid=proc.pid)


@pytest.fixture(scope="module")
def system_faults():
  system = _run("system")
  assert system["mode"] == "system"
  assert host_memory.HUGEPAGES_TUNABLE not in system["tunables"]
  # Without a remedy every call faults its temporary in again.
  assert min(system["faults"]) > PAGES // 2, system
  return system["faults"]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
def test_retained_memory_stops_the_page_faults_of_every_step(system_faults):
  retained = _run("retain")
  assert retained["mode"] == "retain"
  # Most calls fault nothing. The heap cannot move a live block, so now and then a small
  # allocation lands in a freed buffer and the heap grows by one buffer before it settles
  # again (seen: up to 3 such calls in 16), hence the median, not every call.
  assert np.median(retained["faults"]) < PAGES // 20, retained
  assert sum(retained["faults"]) < sum(system_faults) / 2, (retained, system_faults)


@pytest.mark.skipif(not host_memory.hugepages_supported(),
                    reason="needs glibc >= 2.35 and transparent huge pages not `never`")
def test_huge_pages_cut_the_faults_and_the_process_re_executes_itself_once(system_faults):
  huge = _run("hugepages")
  assert huge["mode"] == "hugepages"
  # Re-executed in place: the same process (pid) now started with glibc's tunable.
  assert huge["pid"] == huge["launched_pid"]
  assert huge["tunables"].split(":").count(host_memory.HUGEPAGES_TUNABLE) == 1
  # Memory still goes back every call, but comes in 2 MiB pages: far fewer faults (the median:
  # on a busy machine the kernel does not always find huge pages).
  assert np.median(huge["faults"]) < min(system_faults) // 8, (huge, system_faults)


def test_configure_choices(monkeypatch):
  monkeypatch.setenv(host_memory.ENV_VAR, "system")
  assert host_memory.configure() == "system"
  # In-process (not a command line) the default never re-executes or changes malloc here.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv(host_memory.ENV_VAR, "auto")
  assert host_memory.configure() == ("hugepages" if host_memory.hugepages_active() else "system")
  monkeypatch.setenv(host_memory.ENV_VAR, "keep")
  with pytest.raises(ValueError, match="VLPJAX_HOST_MALLOC='keep'.*auto, hugepages, retain, system"):
    host_memory.configure()


def test_auto_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.will_run_on_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not host_memory.will_run_on_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_memory.will_run_on_cpu()
