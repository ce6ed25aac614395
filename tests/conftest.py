"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""
import os
import shutil
import tempfile

# Compiling is most of the suite's time (XLA:CPU's backend alone: 14 of the 37 minutes the
# in-process tests took on 2 cores), and how XLA:CPU turns HLO into machine code is none of
# what the tests check: every HLO pass (fusion, SPMD partitioning, remat) runs as before, so a
# program differs from the one a user's run compiles only in its speed and float round-off
# (1.5e-6 in the tiny SigLIP's params after 3 steps). Tests compare runs compiled alike. So:
# - no LLVM optimisation of the generated code (~40% of compiling a tiny model's step);
# - fused loops emitted by XLA:CPU's classic emitters, not its MLIR fusion emitters, whose
#   pipeline costs more to run than the code it makes saves here (the tiny SigLIP's step:
#   backend compile 5.8 -> 3.8 s; the whole suite's: 13.8 -> 9.3 min, and `make test`
#   19:09 -> 14:37-16:45 on the same 2-core host).
# `make test-all` sets VLPJAX_TEST_FULL_OPT=1: the compiler settings users run.
_FAST_COMPILE = "" if os.environ.get("VLPJAX_TEST_FULL_OPT") == "1" else (
    " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _FAST_COMPILE +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# CPU devices only, even with libtpu installed (the TPU compile tests load it themselves).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow is only the input pipeline's engine: keep it off the accelerators and small.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_threefry_partitionable", True)

# Many tests compile the same programs (the trainer's step for one tiny config runs in the
# trainer, resilience, prefetch and steps-per-call tests, often several times per test). One
# compilation cache for this run, shared by its xdist workers, compiles each once: on 2 cores
# that halves those files' time. It lives only as long as the run, so no test ever reads what
# another checkout or another JAX compiled; a cached executable is the same program (the key
# is the HLO, the compile options and the XLA flags), so what the tests assert is unchanged.
# The command lines the tests start (`python -m vlpjax.train ...`) read the same settings from
# their environment, so a resumed run loads the program its killed run compiled. The run's own
# variable (not JAX_COMPILATION_CACHE_DIR, which a user may have set) tells workers the directory.
_COMPILE_CACHE = "VLPJAX_TEST_COMPILE_CACHE"


def pytest_configure(config):
  cache = os.environ.get(_COMPILE_CACHE)
  if cache is None:  # The controller (or a run without xdist): it makes the run's directory,
    cache = tempfile.mkdtemp(prefix="vlpjax-test-compile-cache-")  # and workers inherit it.
    os.environ[_COMPILE_CACHE] = cache
    config.vlpjax_compile_cache_owned = cache
  settings = {
      "jax_compilation_cache_dir": cache,
      "jax_persistent_cache_min_compile_time_secs": 0.2,
      # A size bound turns on JAX's file lock around reads and writes: two workers (or two
      # processes of one multi-host run) may write and read one entry at once.
      "jax_compilation_cache_max_size": 4 << 30,
  }
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)


def pytest_unconfigure(config):
  owned = getattr(config, "vlpjax_compile_cache_owned", None)
  if owned:
    shutil.rmtree(owned, ignore_errors=True)
