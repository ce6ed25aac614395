"""`tools.benchmark train` (tools/bench_train.py, tools/bench_reference.py) and the CLI.

Timings are never asserted. What is checked is what the figures are made of: the FLOP counts
against independent arithmetic, MFU against its definition, the peak against the matmuls
measured, the synthetic batch against the family's specs, and the dispatch of the CLI.
"""
import glob
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tools import bench_reference
from tools import bench_train
from tools import benchmark
from vlpjax import config as config_lib
from vlpjax import families
from vlpjax import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMOS = ("siglip_shapes", "coca_shapes", "vlm_shapes", "vlm_interleaved", "udop_docs",
         "vid2seq_shapes")


def _family(name: str, arg: str = ""):
  config = config_lib.finalize(config_lib.load(os.path.join(REPO, "experiments", name + ".py")
                                               + (":" + arg if arg else "")))
  return config, families.get_family(config)


@pytest.mark.parametrize("name", DEMOS)
def test_synthetic_batch_has_the_familys_shapes_and_valid_values(name):
  config, family = _family(name)
  specs = family.input_specs(4)
  batch = bench_train.synthetic_batch(specs)
  assert set(batch) == set(specs)
  for key, spec in specs.items():
    assert batch[key].shape == tuple(spec.shape), key
    assert batch[key].dtype == np.dtype(spec.dtype), key
  for key, value in batch.items():
    if key.endswith("positions"):
      np.testing.assert_array_equal(value[0], np.arange(value.shape[-1]))
    if key.endswith("boxes"):
      assert np.all(value[..., 0] <= value[..., 2]) and np.all(value[..., 1] <= value[..., 3])
      assert value.min() >= 0 and value.max() <= 1
    if np.issubdtype(value.dtype, np.floating) and key in ("image", "images"):
      assert -1 <= value.min() and value.max() <= 1


def test_model_dots_ranks_the_steps_matmuls_by_total_flops():
  def f(a, b, c):
    # a@b twice (same shapes): its total doubles; a@c once but bigger per call.
    return jnp.sum(a @ b) + jnp.sum((a + 1) @ b) + jnp.sum(a @ c)
  a, b, c = jnp.ones((8, 16)), jnp.ones((16, 4)), jnp.ones((16, 32))
  dots = bench_train.model_dots(jax.make_jaxpr(f)(a, b, c))
  assert [(lhs.shape, rhs.shape) for lhs, rhs, _, _ in dots] == [((8, 16), (16, 32)),
                                                                 ((8, 16), (16, 4))]
  assert [total for *_, total in dots] == [2 * 8 * 16 * 32, 2 * (2 * 8 * 16 * 4)]


def test_measure_matmul_peak_counts_flops_and_takes_the_best():
  lhs = jax.ShapeDtypeStruct((3, 40, 24), jnp.float32)
  rhs = jax.ShapeDtypeStruct((24, 56), jnp.float32)
  dims = (((2,), (0,)), ((), ()))
  measured = bench_train.measure_matmul_peak(jnp.float32, [(lhs, rhs, dims, 0.0)], repeats=2,
                                             squares=(64,))
  square, model = measured["matmuls"]
  assert square["flops"] == 2 * 64 ** 3
  assert model["flops"] == 2 * 3 * 40 * 56 * 24
  for m in measured["matmuls"]:
    assert m["flops_per_s"] == pytest.approx(m["flops"] / m["seconds"])
  assert measured["peak_flops_per_s"] == max(m["flops_per_s"] for m in measured["matmuls"])


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H200", 989e12), ("TPU v5 lite", 197e12),
                                       ("TPU v5p", 459e12), ("TPU v4", 275e12)])
def test_spec_peak_by_device_kind(kind, peak):
  assert bench_train.spec_peak(types.SimpleNamespace(device_kind=kind)) == peak


def test_spec_peak_unknown_device_says_what_to_do():
  with pytest.raises(ValueError, match="--peak_flops"):
    bench_train.spec_peak(types.SimpleNamespace(device_kind="Abacus 9000"))


def counted_step(state, batch):
  """A train step whose state counts the steps that ran."""
  return state + 1, {"loss": jnp.sum(batch) * state}


@pytest.mark.parametrize("sync", [False, True])
def test_time_steps_times_each_step_and_runs_them_all(sync):
  # Every step counts: warm-up, timed, and (queued as the trainer queues) one untimed step
  # ahead of the timed ones and one behind them.
  step = jax.jit(counted_step, donate_argnums=(0,))
  seconds, state = bench_train.time_steps(step, jnp.zeros((), jnp.int32),
                                          jnp.ones((64, 64)), warmup=2, steps=3, sync=sync)
  assert len(seconds) == 3 and all(s > 0 for s in seconds)
  assert int(state) == 2 + 3 + (0 if sync else 2)


def test_time_alternating_takes_the_steps_in_turns():
  # Each step logs its name when it runs: warm-ups first, then rounds whose order flips.
  ran = []

  def named_step(name):
    def step(state, batch):
      ran.append(name)
      return counted_step(state, batch)
    return step

  runs = {name: (named_step(name), jnp.zeros((), jnp.int32), jnp.ones((8, 8)))
          for name in ("a", "b")}
  clocks = bench_train.time_alternating(runs, warmup=2, steps=3)
  assert ran == ["a", "a", "b", "b"] + ["a", "b", "b", "a", "a", "b"]
  assert {name: len(c.seconds) for name, c in clocks.items()} == {"a": 3, "b": 3}
  assert all(s > 0 for c in clocks.values() for s in c.seconds)


def test_step_clock_tells_a_busy_process_from_one_that_waits():
  # Busy in this process: its CPU seconds count the loop. Waiting on a child that burns the CPU:
  # the wall passes, this process's CPU seconds do not (the host "had someone else"). The
  # bounds are in CPU seconds, not CPU per wall second: under a loaded CI (pytest-xdist on two
  # cores) the busy loop itself is descheduled and its wall time stretches.
  clock = bench_train.StepClock()
  clock.start()
  deadline = time.process_time() + 0.3
  while time.process_time() < deadline:
    pass
  clock.lap()
  subprocess.run([sys.executable, "-c", "import time\nt = time.process_time() + 0.3\n"
                  "while time.process_time() < t: pass"], check=True)
  clock.lap()
  busy, waiting = (c / s for c, s in zip(clock.cpu_seconds, clock.seconds))
  tick = 0.02  # os.times() counts in clock ticks (10 ms on Linux)
  assert 0.3 - tick <= clock.cpu_seconds[0] <= clock.seconds[0] + tick
  assert clock.seconds[1] >= 0.3 and clock.cpu_seconds[1] < 0.15
  summary = clock.summary()
  assert summary["process_cpu_seconds_all"] == clock.cpu_seconds
  assert summary["cores_busy"] == pytest.approx((busy + waiting) / 2)
  assert all(s is None or s >= 0 for s in summary["steal_seconds_all"])


def test_interleaved_timing_needs_a_reference_and_no_profile(tmp_path, capsys):
  # Refused before anything is built; a trace would hold both models' steps.
  code = benchmark.main(["train", "--config", "experiments/siglip_shapes.py", "--reference",
                         "big_vision", "--interleave", "--profile", str(tmp_path)])
  assert code == 2 and "--interleave" in capsys.readouterr().err
  # And without a reference there is nothing to take turns with.
  code = benchmark.main(["train", "--config", "experiments/siglip_shapes.py", "--interleave"])
  assert code == 2 and "--reference big_vision" in capsys.readouterr().err


def test_reference_steps_per_call_needs_a_reference(capsys):
  code = benchmark.main(["train", "--config", "experiments/siglip_shapes.py",
                         "--reference_steps_per_call", "4"])
  assert code == 2 and "--reference" in capsys.readouterr().err


def test_time_steps_profiles_the_timed_steps_alone(tmp_path):
  step = jax.jit(counted_step, donate_argnums=(0,))
  _, state = bench_train.time_steps(step, jnp.zeros((), jnp.int32), jnp.ones((64, 64)),
                                    warmup=1, steps=2, profile_dir=str(tmp_path))
  assert int(state) == 1 + 2 + 2
  [trace] = glob.glob(str(tmp_path / "**" / "*.xplane.pb"), recursive=True)
  events = [e.name for plane in jax.profiler.ProfileData.from_file(trace).planes
            for line in plane.lines for e in line.events]
  # The queued steps ran inside the trace; the warm-up, which compiled, did not.
  assert sum(name == "PjitFunction(counted_step)" for name in events) >= 2 + 2
  assert "backend_compile_and_load" not in events


def test_train_benchmark_figures_are_consistent(tmp_path):
  out = tmp_path / "train.json"
  code = benchmark.main(["--out", str(out), "train", "--config",
                         os.path.join(REPO, "experiments", "siglip_shapes.py") + ":batch=16",
                         "--steps", "2", "--warmup", "1", "--config.total_steps=10",
                         "--config.steps_per_call=1"])
  assert code == 0
  result = json.loads(out.read_text())
  # The steps run: 1 warm-up, 1 queued ahead, 2 timed, 1 queued behind.
  assert result["steps_per_call"] == 1 and result["steps_run"] == 1 + 1 + 2 + 1
  config, family = _family("siglip_shapes", "batch=16")
  assert result["global_batch_size"] == 16
  # Analytic model FLOPs as vlpjax.flops defines them, and close to the traced step's
  # matmuls (remat none: the backward's matmuls are twice the forward's).
  assert result["model_flops"] == pytest.approx(flops.step_model_flops(family, 16)["total"])
  assert result["matmul_flops_traced"] == pytest.approx(result["model_flops"], rel=0.05)
  assert result["xla_flops"] > 0.5 * result["model_flops"]
  assert len(result["step_seconds_all"]) == 2
  assert result["step_seconds"] == pytest.approx(np.median(result["step_seconds_all"]))
  # Each timed step's host figures: the process computed (on the CPU backend, itself).
  assert len(result["host"]["process_cpu_seconds_all"]) == 2
  assert 0 < result["host"]["cores_busy"] <= os.cpu_count() + 0.5
  # MFU by its definition, against the best matmul measured in the run.
  peak = max(m["flops_per_s"] for m in result["peak"]["matmuls"])
  assert result["peak_flops_per_s"] == pytest.approx(peak)
  assert result["mfu"] == pytest.approx(result["model_flops"] / result["step_seconds"] / peak)
  assert result["examples_per_s"] == pytest.approx(16 / result["step_seconds"])
  assert any(m["what"] == "model" for m in result["peak"]["matmuls"])
  memory = result["memory"]["compiled_bytes_per_device"]
  assert memory["total"] == (memory["arguments"] + memory["outputs"] - memory["aliased"]
                             + memory["temporaries"])


def test_train_benchmark_times_calls_of_several_steps_per_step(tmp_path):
  out = tmp_path / "train.json"
  code = benchmark.main(["--out", str(out), "train", "--config",
                         os.path.join(REPO, "experiments", "siglip_shapes.py") + ":batch=16",
                         "--steps", "1", "--warmup", "1", "--sync", "--peak_flops", "1e11",
                         "--config.steps_per_call=3", "--config.model.image.depth=1",
                         "--config.model.text.depth=1"])
  assert code == 0
  result = json.loads(out.read_text())
  # Every call ran 3 steps (1 warm-up call, 1 timed), and a step's time is its call's / 3:
  # the host figures are per call (CPU seconds, and cores busy = CPU seconds / call seconds).
  assert result["steps_per_call"] == 3 and result["steps_run"] == 3 * (1 + 1)
  [cpu_seconds] = result["host"]["process_cpu_seconds_all"]
  [step_seconds] = result["step_seconds_all"]
  assert step_seconds == pytest.approx(cpu_seconds / result["host"]["cores_busy"] / 3)
  assert result["mfu"] == pytest.approx(result["model_flops"] / result["step_seconds"] / 1e11)


def test_the_step_alone_needs_no_input_stack():
  # A GPU or TPU host with a bare JAX install times and compiles the pod configs' step: the
  # benchmark CLI and train_setup import neither TensorFlow nor seqio nor the metric writers.
  # A fresh interpreter, since this one has imported them for other tests.
  script = textwrap.dedent("""
      import sys
      from tools import benchmark
      from vlpjax import train, train_setup
      for path in ("experiments/siglip_b16.py:batch=8", "experiments/coca_b16.py:batch=8"):
        train_setup.build(train.load_config(path, [])).lower_train_step()
      print(sorted(m for m in ("tensorflow", "seqio", "clu") if m in sys.modules))
  """)
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_train_benchmark_bad_override_exits_2(capsys):
  code = benchmark.main(["train", "--config", os.path.join(REPO, "experiments",
                                                           "siglip_shapes.py"),
                         "--config.no_such_key=1"])
  assert code == 2
  assert "no_such_key" in capsys.readouterr().err


def test_checkpoint_subcommand_through_the_cli(tmp_path):
  out = tmp_path / "ckpt.json"
  code = benchmark.main(["--out", str(out), "checkpoint", "--mib", "2", "--leaf_mib", "1",
                         "--repeats", "1", "--dir", str(tmp_path / "ckpt")])
  assert code == 0
  result = json.loads(out.read_text())
  assert result["state_bytes"] == 2 * 2 ** 20
  assert 0 < result["async_blocking_s"] <= result["async_total_s"]


def test_reference_needs_a_checkout(monkeypatch, tmp_path):
  monkeypatch.delenv("BIG_VISION_DIR", raising=False)
  with pytest.raises(ValueError, match="git clone"):
    bench_reference.find_checkout(None)
  with pytest.raises(ValueError, match="not a big_vision checkout"):
    bench_reference.find_checkout(str(tmp_path))


def test_reference_refuses_other_families():
  config, _ = _family("coca_shapes")
  with pytest.raises(ValueError, match="two-tower"):
    bench_reference.BigVisionTwoTower(config, "/nonexistent")


@pytest.mark.skipif(not os.environ.get("BIG_VISION_DIR"),
                    reason="needs a big_vision checkout in $BIG_VISION_DIR (not downloaded "
                           "in tests)")
def test_reference_builds_the_same_architecture():
  # Same sizes in both: the parameter counts agree (a mismatch in the mapping of pool type,
  # heads or embedding size would change them).
  config, family = _family("siglip_shapes", "batch=4")
  reference = bench_reference.BigVisionTwoTower(config)
  specs = family.input_specs(1)
  image = jnp.zeros(specs["image"].shape, jnp.float32)
  texts = jnp.ones(specs["texts"].shape, jnp.int32)
  theirs = jax.eval_shape(reference.model.init, jax.random.key(0), image, texts)["params"]
  ours = jax.eval_shape(family.init, jax.random.key(0), {"image": image, "texts": texts})
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  assert count(theirs) == count(ours)
