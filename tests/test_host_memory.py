"""vlpjax.host_memory: with huge pages or `retain`, XLA:CPU steps stop faulting every 4 KiB page."""
import json
import os
import subprocess
import sys

import pytest

from vlpjax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted program whose temporaries (two 64 MiB matmul results) are far above glibc's mmap
# threshold: by default each call maps them afresh and faults every page in again.
_PROGRAM = """
import json, os, resource, sys
from vlpjax import host_memory
mode = host_memory.configure(command_line=True)
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32) / 4096
f = jax.jit(lambda x: jnp.sum((x @ x) @ x + jnp.sin(x @ x.T)))
f(x).block_until_ready()
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"mode": mode, "faults": faults, "pid": os.getpid(),
                  "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""


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


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
def test_retained_memory_stops_the_page_faults_of_every_step():
  system, retained = _run("system"), _run("retain")
  assert system["mode"] == "system" and retained["mode"] == "retain"
  pages = 2 * 4096 * 4096 * 4 // 4096  # the two 64 MiB temporaries, in 4 KiB pages
  # Without: every call faults its temporaries in again. With: most calls fault nothing (the
  # heap may still grow once by a buffer while it settles at the program's peak).
  assert min(system["faults"]) > pages // 2, system
  assert sorted(retained["faults"])[1] < pages // 20, retained
  assert sum(retained["faults"]) < sum(system["faults"]) / 20, (retained, system)


@pytest.mark.skipif(not host_memory.hugepages_supported(),
                    reason="needs glibc >= 2.35 and transparent huge pages not `never`")
def test_huge_pages_cut_the_faults_and_the_process_re_executes_itself_once():
  system, huge = _run("system"), _run("hugepages")
  assert huge["mode"] == "hugepages" and system["mode"] == "system"
  # Re-executed in place: the same process (pid) now started with glibc's tunable.
  assert huge["pid"] == huge["launched_pid"]
  assert huge["tunables"].split(":").count(host_memory.HUGEPAGES_TUNABLE) == 1
  assert host_memory.HUGEPAGES_TUNABLE not in system["tunables"]
  pages = 2 * 4096 * 4096 * 4 // 4096
  # Memory still goes back every call, but comes in 2 MiB pages: far fewer faults (allow for
  # the kernel not finding some huge pages on a busy machine).
  assert min(system["faults"]) > pages // 2, system
  assert sorted(huge["faults"])[1] < min(system["faults"]) // 8, (huge, system)


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
