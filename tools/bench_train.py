"""`train` benchmark: the trainer's own step, timed, with model FLOPs and MFU.

  python -m tools.benchmark train --config experiments/siglip_b16.py:batch=32,rules=data_parallel \\
      --config.compute_dtype=float32 --config.remat_policy=none --reference big_vision

What is timed is the trainer's own step, `vlpjax.train_setup.build(config).train_step` (jitted,
state donated), on one batch kept on the devices, so the figure is the step alone: the input
pipeline has its own benchmark (`data`), and nothing of it (TensorFlow, seqio) is imported.
The batch is synthetic and shaped by the family's `input_specs` (values do not change the
work of a dense step), so configs whose data lives in a bucket run here too.

Figures (JSON):
  step_seconds          median over `--steps` timed steps after `--warmup` untimed ones, run
                        as the trainer runs them (each dispatched before the last is waited
                        for; `--sync` waits for every step: latency, not throughput)
  model_flops           analytic training FLOPs per step (`vlpjax.flops`: 3 x forward, remat
                        excluded) and per part
  xla_flops             XLA's cost analysis of the compiled step (hardware FLOPs: remat and
                        elementwise work included; a scan body is counted once)
  peak_flops_per_s      CPU: the best jitted matmul throughput measured in this run, over square
                        matmuls and the step's own matmul shapes, in the compute dtype; GPU/TPU:
                        the device's spec-sheet bf16 peak (`SPEC_PEAKS`) times the devices
  mfu                   model_flops / step_seconds / peak_flops_per_s
  memory                the compiled step's buffers per device; the device allocator's peak
                        where it has one (GPU/TPU); the process's peak RSS on CPU
  profile               with `--profile DIR`: op time per step by kind of work (matmul,
                        attention, reduction, element-wise, layout, ...) and the costliest
                        ops, read from a trace of `--profile_steps` steps taken after the
                        timed ones (tools/profile_summary.py), and those steps' times
  host                  per timed step, the process's CPU seconds and the host's steal
                        seconds (Linux), and the median cores busy (CPU s / wall s): whether
                        a slow step on a shared host was the step or the host (`StepClock`)
`--reference big_vision` times big_vision's two-tower model in a plain jitted sigmoid-loss
AdamW step on the same batch in the same run (`tools/bench_reference.py`).
"""
import argparse
import collections
import importlib.util
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Spec-sheet dense bf16 peaks per device (FLOP/s), matched against `device_kind` in order.
# Sources: NVIDIA H100/H200/A100 datasheets (SXM, dense), Cloud TPU system architecture pages.
SPEC_PEAKS: Tuple[Tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L4", 121e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)
SQUARE_SIZES = (1024, 2048, 4096)


def log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _steal_seconds() -> Optional[float]:
  """The machine's CPU time taken by other guests of the hypervisor (Linux), else None."""
  try:
    with open("/proc/stat", encoding="ascii") as f:
      fields = f.readline().split()  # "cpu user nice system idle iowait irq softirq steal ..."
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return None


class StepClock:
  """Wall seconds per step, with the process's CPU seconds and the host's steal over each.

  Why: on a shared VM a step's time moves by several percent within minutes, and the wall
  time alone cannot say whether the step or the host changed. CPU seconds per wall second
  ("cores busy") near the core count means the step had the machine; fewer, or steal time
  growing, means something else had part of it. On a GPU or TPU the CPU seconds are the
  host's side of the step only (dispatch, transfers), so there they say nothing of the device.
  """

  def __init__(self):
    self.seconds: List[float] = []
    self.cpu_seconds: List[float] = []
    self.steal_seconds: List[Optional[float]] = []
    self._last = None

  @staticmethod
  def _read() -> Tuple[float, float, Optional[float]]:
    times = os.times()
    return time.perf_counter(), times.user + times.system, _steal_seconds()

  def start(self) -> None:
    self._last = self._read()

  def lap(self) -> float:
    """Closes the step that began at the last `start` or `lap`; its wall seconds."""
    now = self._read()
    (wall0, cpu0, steal0), (wall1, cpu1, steal1) = self._last, now
    self._last = now
    self.seconds.append(wall1 - wall0)
    self.cpu_seconds.append(cpu1 - cpu0)
    self.steal_seconds.append(None if steal0 is None or steal1 is None else steal1 - steal0)
    return self.seconds[-1]

  def describe_last(self) -> str:
    text = (f"{self.seconds[-1]:.3f} s ({self.cpu_seconds[-1] / self.seconds[-1]:.2f} cores "
            "busy")
    steal = self.steal_seconds[-1]
    return text + ("" if steal is None else f", {steal:.2f} s stolen") + ")"

  def summary(self) -> Dict[str, Any]:
    """The per-step host figures for the JSON."""
    return {"process_cpu_seconds_all": self.cpu_seconds, "steal_seconds_all": self.steal_seconds,
            "cores_busy": statistics.median(c / s for c, s in zip(self.cpu_seconds, self.seconds))}


def spec_peak(device) -> float:
  """The spec-sheet bf16 peak of one accelerator; ValueError for an unknown one."""
  kind = device.device_kind
  for name, peak in SPEC_PEAKS:
    if name.lower() in kind.lower():
      return peak
  raise ValueError(f"no spec-sheet peak for device kind {kind!r}: pass --peak_flops "
                   f"(FLOP/s per device) or add it to tools/bench_train.py SPEC_PEAKS.")


def synthetic_batch(specs: Dict[str, Any], seed: int = 0) -> Dict[str, np.ndarray]:
  """A batch shaped and typed by `specs` with plausible values for each kind of key.

  Images uniform in [-1, 1]; token ids in [2, 256) (valid in every vocabulary here);
  one example per packed row (segment ids 1, positions 0..L-1, the first quarter a
  bidirectional prefix); every target weighted; every image slot used.
  """
  rng = np.random.default_rng(seed)
  batch = {}
  for key, spec in specs.items():
    shape, dtype = tuple(spec.shape), np.dtype(spec.dtype)
    if dtype == np.bool_:
      value = np.ones(shape, bool)
    elif key.endswith("segment_ids"):
      value = np.ones(shape, dtype)
    elif key.endswith("positions"):
      value = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
    elif key.endswith("causal_attention"):
      value = (np.arange(shape[-1]) < shape[-1] // 4).astype(dtype)
      value = np.broadcast_to(value, shape).copy()
    elif key.endswith("loss_weights"):
      value = np.ones(shape, dtype)
    elif key.endswith("image_times"):
      value = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
    elif key.endswith("boxes"):  # [x0, y0, x1, y1] in [0, 1], x0 <= x1, y0 <= y1
      # [..., corner, coordinate], each coordinate sorted over the two corners.
      corners = np.sort(rng.uniform(0, 1, shape[:-1] + (2, 2)), axis=-2)
      value = corners.reshape(shape).astype(dtype)
    elif np.issubdtype(dtype, np.integer):
      value = rng.integers(2, 256, shape).astype(dtype)
    else:
      value = rng.uniform(-1, 1, shape).astype(dtype)
    batch[key] = value
  return batch


def model_dots(jaxpr, top: int = 8) -> List[Tuple[Any, Any, Any, float]]:
  """The step's distinct matmuls (lhs, rhs, dimension numbers), most FLOPs first."""
  from vlpjax import flops  # pylint: disable=g-import-not-at-top
  totals = collections.Counter()
  found = {}

  def visit(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "dot_general":
        lhs, rhs = (v.aval for v in eqn.invars)
        key = (lhs.shape, rhs.shape, str(lhs.dtype), str(eqn.params["dimension_numbers"]))
        found[key] = (lhs, rhs, eqn.params["dimension_numbers"])
        totals[key] += flops.dot_flops(eqn)
      for value in eqn.params.values():
        for sub in flops.sub_jaxprs(value):
          visit(sub)

  visit(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
  return [found[k] + (totals[k],) for k, _ in totals.most_common(top)]


def _best_seconds(fn: Callable, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def measure_matmul_peak(dtype, dots=(), repeats: int = 5, squares=SQUARE_SIZES
                        ) -> Dict[str, Any]:
  """Best jitted matmul FLOP/s on the default device, in `dtype`.

  Square matmuls of `squares` and the model's own shapes (`dots`, from `model_dots`:
  each timed alone with its dimension numbers, batch dims included). Operands are random
  (constant inputs could let a library take shortcuts).
  """
  rng = np.random.default_rng(0)
  results = []
  cases = [((n, n), (n, n), (((1,), (0,)), ((), ())), f"square {n}") for n in squares]
  cases += [(lhs.shape, rhs.shape, dims, "model") for lhs, rhs, dims, _ in dots]
  for lhs_shape, rhs_shape, dims, label in cases:
    lhs = jnp.asarray(rng.standard_normal(lhs_shape), dtype)
    rhs = jnp.asarray(rng.standard_normal(rhs_shape), dtype)
    fn = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
    out_shape = jax.eval_shape(fn, lhs, rhs).shape
    (contract, _), _ = dims
    work = 2.0 * np.prod(out_shape) * np.prod([lhs_shape[d] for d in contract])
    seconds = _best_seconds(fn, (lhs, rhs), repeats)
    results.append({"what": label, "lhs": list(lhs_shape), "rhs": list(rhs_shape),
                    "dimension_numbers": str(dims), "flops": work, "seconds": seconds,
                    "flops_per_s": work / seconds})
    log(f"  matmul {label} {tuple(lhs_shape)} x {tuple(rhs_shape)}: "
        f"{work / seconds / 1e9:.0f} GFLOP/s")
    del lhs, rhs
  best = max(results, key=lambda r: r["flops_per_s"])
  return {"peak_flops_per_s": best["flops_per_s"], "best": best["what"], "matmuls": results}


def time_steps(step: Callable, state, batch, warmup: int, steps: int, sync: bool = False,
               profile_dir: Optional[str] = None, clock: Optional[StepClock] = None,
               label: str = "step"):
  """Per-step seconds of `steps` steps after `warmup` (the first compiles); final state.

  A "step" is one call of `step`, which may run several train steps (`steps_per_call`);
  `label` names it in the log.

  As the trainer's loop runs them (unless `sync`): step i+1 is dispatched before step i is
  waited for, so the device never idles while the host dispatches. A step's time is then the
  time between the completions of the step before it and of it. With `sync`, every step is
  waited for before the next is dispatched: that adds the dispatch latency to each step
  (a few ms on a GPU; nothing measurable on CPU, where a step takes seconds).
  `profile_dir`: a `jax.profiler` trace of the timed steps (not the warm-up) goes there.
  `clock`: records each step's host figures too (`StepClock`).
  """
  for _ in range(warmup):
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      return time_steps(step, state, batch, 0, steps, sync, clock=clock, label=label)
  clock = clock or StepClock()

  def lap() -> None:
    clock.lap()
    log(f"  {label} {len(clock.seconds)}/{steps}: {clock.describe_last()}")

  if sync:
    for _ in range(steps):
      clock.start()
      state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      lap()
    return clock.seconds, state
  # One untimed step heads the queue: the first timed one is dispatched while it runs.
  state, pending = step(state, batch)
  for i in range(steps + 1):
    state, metrics = step(state, batch)
    jax.block_until_ready(pending)
    if i:
      lap()
    else:
      clock.start()
    pending = metrics
  jax.block_until_ready((state, pending))  # The extra step queued last: not timed.
  return clock.seconds, state


def time_alternating(runs: Dict[str, Tuple[Callable, Any, Any]], warmup: int, steps: int
                     ) -> Dict[str, StepClock]:
  """Per-step figures (`StepClock`) of each named (step, state, batch), the steps taken in turns.

  Why: two steps timed one block after the other also measure how the machine drifted in
  between (on a shared 2-core host a step's time moves by several percent within minutes),
  and that lands wholly on their ratio. In turns, both see the same drift. Each step is
  waited for before the next starts (they share the device), and the order flips every round
  so that neither always runs first after the other's memory traffic. The price: every state
  stays resident, so each step runs with less free memory than alone (on the 2-core CPU host
  both SigLIP B/16 steps ran 5-11% slower in turns), which is why it is not the default.
  """
  states = {}
  for name, (step, state, batch) in runs.items():
    for _ in range(warmup):
      state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
    states[name] = state
  clocks = {name: StepClock() for name in runs}
  names = list(runs)
  for round_ in range(steps):
    for name in (names if round_ % 2 == 0 else names[::-1]):
      step, _, batch = runs[name]
      clocks[name].start()
      states[name], metrics = step(states[name], batch)
      jax.block_until_ready((states[name], metrics))
      clocks[name].lap()
      log(f"  {name} step {round_ + 1}/{steps}: {clocks[name].describe_last()}")
  return clocks


def memory_figures(compiled) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    out["compiled_bytes_per_device"] = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
        "total": (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                  - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)}
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_bytes"] = stats["peak_bytes_in_use"]
  # ru_maxrss is KiB on Linux.
  out["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return out


def libtpu_profiler_active() -> bool:
  """Whether a CPU-only run has libtpu's backend, hence its profiler plugin, loaded.

  JAX starts every installed backend unless JAX_PLATFORMS names some; libtpu (installed here
  for the TPU AOT compiles) then fails to find a TPU but its profiler still joins each trace.
  """
  return (jax.devices()[0].platform == "cpu" and not jax.config.jax_platforms
          and importlib.util.find_spec("libtpu") is not None)


def summarize_profile(profile_dir: str, setup, compiled, per_call: int, steps: int
                      ) -> Dict[str, Any]:
  """Op time by kind of work in the trace (tools/profile_summary.py), logged and returned.

  The HLO of the program that ran is saved beside the trace (`step.hlo.txt`): the summary
  reads each op's kind from it, and a person reading the trace can look an op up there.
  """
  from tools import profile_summary  # pylint: disable=g-import-not-at-top
  from vlpjax import sharding  # pylint: disable=g-import-not-at-top
  if per_call > 1:  # The scanned program is another compile: only what ran is described.
    state, batch = setup.abstract_step_args()
    with sharding.logical_context(setup.mesh, setup.config.sharding_rules):
      compiled = setup.jitted_steps(per_call).lower(state, (batch,) * per_call).compile()
  text = compiled.as_text()
  path = os.path.join(profile_dir, "step.hlo.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  try:
    summary = profile_summary.summarize(profile_dir, [text], steps)
  except ValueError as e:  # The timings stand without it: report, do not fail the run.
    log(f"no profile summary: {e}")
    return {"hlo": path, "trace": profile_dir, "error": str(e)}
  log(profile_summary.format_table(summary))
  return {"hlo": path, "trace": profile_dir, **summary}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="after the timed steps, trace --profile_steps more to DIR "
                      "(jax.profiler; TensorBoard's profile plugin reads it), with the step's "
                      "HLO; the JSON's `profile` sums their op time by kind of work "
                      "(tools/profile_summary.py)")
  parser.add_argument("--profile_steps", type=int, default=2,
                      help="with --profile: how many steps (calls) to trace")
  parser.add_argument("--sync", action="store_true",
                      help="wait for each step before dispatching the next (the step's latency; "
                      "default: queued one ahead, as the trainer runs)")
  parser.add_argument("--peak_flops", type=float, default=None,
                      help="peak FLOP/s per accelerator, or of the whole machine on CPU "
                      "(default: measured on CPU, the spec sheet's on GPU/TPU)")
  parser.add_argument("--reference", choices=["big_vision"], default=None,
                      help="also time this reference implementation in the same run")
  parser.add_argument("--big_vision_dir", default=None,
                      help="a big_vision checkout (default: $BIG_VISION_DIR)")
  parser.add_argument("--reference_steps_per_call", type=int, default=1,
                      help="with --reference: run the reference's steps that many to a call "
                      "(a lax.scan, as vlpjax's steps_per_call does); default 1, the plain "
                      "jitted step")
  parser.add_argument("--interleave", action="store_true",
                      help="with --reference: time the two steps in turns, each waited for, "
                      "both states resident (default: the project's steps, then the "
                      "reference's; docs/benchmarks.md compares the two ways)")


def run(args: argparse.Namespace, overrides: List[str]) -> Dict[str, Any]:
  from vlpjax import flops  # pylint: disable=g-import-not-at-top
  from vlpjax import host_memory  # pylint: disable=g-import-not-at-top
  from vlpjax import sharding  # pylint: disable=g-import-not-at-top
  from vlpjax import train  # pylint: disable=g-import-not-at-top
  # The step alone: no input stack (TensorFlow, seqio), so it runs on a bare JAX install.
  from vlpjax import train_setup  # pylint: disable=g-import-not-at-top
  if args.profile and args.profile_steps < 1:
    raise ValueError(f"--profile_steps must be >= 1, got {args.profile_steps}.")
  if args.steps < 1 or args.warmup < 1:
    raise ValueError(f"--steps and --warmup must be >= 1 (the first step compiles), got "
                     f"{args.steps} and {args.warmup}.")
  interleave = args.interleave
  if interleave and not args.reference:
    raise ValueError("--interleave times the project's step in turns with a reference's; "
                     "add --reference big_vision.")
  ref_per_call = args.reference_steps_per_call
  if ref_per_call < 1 or (ref_per_call > 1 and not args.reference):
    raise ValueError(f"--reference_steps_per_call={ref_per_call}: give an int >= 1, with "
                     "--reference.")
  if interleave and args.profile:
    raise ValueError("--profile traces the project's steps alone; it cannot be taken with "
                     "--interleave.")
  warnings = []
  if args.profile and libtpu_profiler_active():
    warnings.append(
        "libtpu is installed and JAX_PLATFORMS is unset: while a trace runs, libtpu's "
        "profiler keeps a core busy, which slows a CPU step (SigLIP B/16 on 2 cores: 22.5 -> "
        "37.9 s; docs/benchmarks.md). Set JAX_PLATFORMS=cpu for CPU traces.")
    log("warning: " + warnings[-1])
  config = train.load_config(args.config, overrides)
  reference = None
  if args.reference:
    # Checked before anything is built: a missing checkout fails in a second, not after
    # the minutes of the project's own steps.
    from tools import bench_reference  # pylint: disable=g-import-not-at-top
    reference = bench_reference.BigVisionTwoTower(config, args.big_vision_dir)
  setup = train_setup.build(config)
  batch_size = config.global_batch_size
  devices = setup.mesh.devices.size
  platform = jax.devices()[0].platform
  dtype = jnp.dtype(config.compute_dtype)
  log(f"{args.config}: {config.family} family, batch {batch_size}, {dtype.name} compute, "
      f"remat {config.remat_policy}, {devices} {platform} device(s) "
      f"({jax.devices()[0].device_kind})")

  state_args = setup.abstract_step_args()
  with sharding.logical_context(setup.mesh, config.sharding_rules):
    jaxpr = jax.make_jaxpr(setup.jitted_step)(*state_args)
    start = time.perf_counter()
    compiled = setup.jitted_step.lower(*state_args).compile()
  compile_seconds = time.perf_counter() - start
  model = flops.step_model_flops(setup.family, batch_size)
  xla_flops = float((compiled.cost_analysis() or {}).get("flops", 0.0)) * devices

  result: Dict[str, Any] = {
      "benchmark": "train", "config": args.config, "overrides": overrides,
      "family": config.family, "global_batch_size": batch_size,
      "compute_dtype": dtype.name, "remat_policy": config.remat_policy,
      "platform": platform, "device_kind": jax.devices()[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_count": os.cpu_count(),
      "devices": devices, "mesh": dict(setup.mesh.shape),
      "compile_seconds": compile_seconds, "model_flops": model["total"],
      "model_flops_by_part": {k: v for k, v in model.items() if k != "total"},
      "xla_flops": xla_flops,
      "matmul_flops_traced": flops.matmul_flops(jaxpr.jaxpr),
  }
  if warnings:
    result["warnings"] = warnings

  if args.peak_flops:
    # CPU devices share the machine's cores, so there the figure is the machine's.
    peak = args.peak_flops * (1 if platform == "cpu" else devices)
    result["peak"] = {"source": "--peak_flops", "given": args.peak_flops}
  elif platform == "cpu":
    log(f"measuring the {dtype.name} matmul peak:")
    measured = measure_matmul_peak(dtype, model_dots(jaxpr))
    # CPU devices share the cores: the measured figure is the whole machine's.
    peak = measured["peak_flops_per_s"]
    result["peak"] = {"source": "measured", **measured}
  else:
    per_device = spec_peak(jax.devices()[0])
    peak = per_device * devices
    result["peak"] = {"source": "spec sheet (bf16 dense)", "per_device": per_device}
  result["peak_flops_per_s"] = peak
  # Each measurement starts from the same footprint: what the last one freed goes back to the
  # OS (with VLPJAX_HOST_MALLOC retaining, it would otherwise stay and add up).
  host_memory.release()

  local = synthetic_batch(setup.family.input_specs(batch_size), config.seed)
  batch = sharding.global_batch(local, setup.mesh, config.sharding_rules)
  state = setup.init_state()
  clock, ref_clock = StepClock(), None
  # As the trainer runs them: `steps_per_call` steps per call of one compiled program (on the
  # same batch here); a step's time is then its call's over that count.
  per_call = config.steps_per_call
  step_fn, label = setup.train_step, "step"
  if per_call > 1:
    step_fn, label = (lambda s, b: setup.train_steps(s, [b] * per_call)), "call"
  if interleave:
    log(f"timing {args.steps} {label}s of vlpjax and steps of big_vision in turns, after "
        f"{args.warmup} warm-up ones each:")
    both = time_alternating({"vlpjax": (step_fn, state, batch),
                             "big_vision": reference.prepare(local, ref_per_call)},
                            args.warmup, args.steps)
    clock, ref_clock = both["vlpjax"], both["big_vision"]
    call_seconds = clock.seconds
    ref_seconds = [s / ref_per_call for s in ref_clock.seconds]
  else:
    what = "steps" if per_call == 1 else f"calls of {per_call} steps"
    log(f"timing {args.steps} {what} after {args.warmup} warm-up ones:")
    call_seconds, state = time_steps(step_fn, state, batch, args.warmup, args.steps,
                                     args.sync, clock=clock, label=label)
    if args.profile:
      # Traced apart from the timed steps, so that the profiler's own cost never enters the
      # figures above; the traced steps' times show what it costs.
      log(f"tracing {args.profile_steps} more {label}s (the times above are untraced):")
      traced_seconds, state = time_steps(step_fn, state, batch, 0, args.profile_steps,
                                         args.sync, args.profile, label="traced " + label)
    # The trainer's step counter: every call (warm-up and untimed ones included) ran its steps.
    result["steps_run"] = int(state["step"])
    if args.profile:
      # Queued, the trace also holds the call heading the queue and the one queued last.
      traced_calls = args.profile_steps + (0 if args.sync else 2)
      result["profile"] = summarize_profile(args.profile, setup, compiled, per_call,
                                            traced_calls * per_call)
      result["profile"]["traced_step_seconds"] = [s / per_call for s in traced_seconds]
  del state
  host_memory.release()
  seconds = [s / per_call for s in call_seconds]
  step_seconds = statistics.median(seconds)
  result.update({
      "steps_per_call": per_call,
      "step_seconds_all": seconds, "step_seconds": step_seconds,
      "sync": args.sync or interleave, "timing": "in turns" if interleave else "in a row",
      "examples_per_s": batch_size / step_seconds,
      "model_flops_per_s": model["total"] / step_seconds,
      "mfu": model["total"] / step_seconds / peak,
      "host": clock.summary(),
      "memory": memory_figures(compiled),
  })
  log(f"step {step_seconds:.3f} s, {batch_size / step_seconds:.2f} examples/s, "
      f"model {model['total'] / 1e12:.3f} TFLOP/step, MFU {result['mfu']:.1%} of "
      f"{peak / 1e9:.0f} GFLOP/s")

  if reference is not None:
    if ref_clock is None:
      log("timing the reference (big_vision) step" + (
          "" if ref_per_call == 1 else f", {ref_per_call} steps per call") + ":")
      ref_clock = StepClock()
      ref_seconds = reference.time(local, args.warmup, args.steps, args.sync, ref_clock,
                                   ref_per_call)
    ref_median = statistics.median(ref_seconds)
    result["reference"] = {
        "name": "big_vision", **reference.describe(), "steps_per_call": ref_per_call,
        "step_seconds_all": ref_seconds,
        "step_seconds": ref_median, "host": ref_clock.summary(),
        "mfu": model["total"] / ref_median / peak,
        "step_time_ratio": step_seconds / ref_median}
    log(f"big_vision step {ref_median:.3f} s (MFU {result['reference']['mfu']:.1%}); "
        f"vlpjax / big_vision = {step_seconds / ref_median:.3f}")
  return result
