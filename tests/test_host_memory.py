"""vlpjax.host_memory: with `retain`, repeated XLA:CPU executions stop page-faulting their temps."""
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
import json, resource, sys
from vlpjax import host_memory
retained = host_memory.configure()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32) / 4096
f = jax.jit(lambda x: jnp.sum((x @ x) @ x + jnp.sin(x @ x.T)))
f(x).block_until_ready()
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"retained": retained, "faults": faults}))
"""


def _run(choice: str):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", host_memory.ENV_VAR: choice,
         "PYTHONPATH": REPO, "XLA_FLAGS": ""}
  proc = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True,
                        text=True, timeout=300, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
def test_retained_memory_stops_the_page_faults_of_every_step():
  system, retained = _run("system"), _run("retain")
  assert not system["retained"] and retained["retained"]
  pages = 2 * 4096 * 4096 * 4 // 4096  # the two 64 MiB temporaries, in 4 KiB pages
  # Without: every call faults its temporaries in again. With: most calls fault nothing (the
  # heap may still grow once by a buffer while it settles at the program's peak).
  assert min(system["faults"]) > pages // 2, system
  assert sorted(retained["faults"])[1] < pages // 20, retained
  assert sum(retained["faults"]) < sum(system["faults"]) / 20, (retained, system)


def test_configure_choices(monkeypatch):
  monkeypatch.setenv(host_memory.ENV_VAR, "system")
  assert host_memory.configure() is False
  monkeypatch.setenv(host_memory.ENV_VAR, "keep")
  with pytest.raises(ValueError, match="VLPJAX_HOST_MALLOC='keep'.*auto, retain, system"):
    host_memory.configure()


def test_auto_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.will_run_on_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not host_memory.will_run_on_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_memory.will_run_on_cpu()
