"""Compiles a config's train step for a TPU topology on any machine: does it fit, what it costs.

  python -m tools.aot_compile --config experiments/siglip_so400m.py --topology v5p-256
  python -m tools.aot_compile --config experiments/vlm_3b.py:batch=256 --topology v5e-256 \\
      --slices 2 --config.remat_policy=full --json /tmp/vlm_3b_v5e.json

No TPU is touched: libtpu (`pip install -e .[tpu]`) describes the topology's chips as
compile-only devices, the trainer builds its mesh and shardings on them exactly as on the pod
(`vlpjax.train_setup.build(config, devices=...)`), and XLA's TPU compiler lowers and compiles
the step from shapes alone. The figures printed are the compiler's own, per chip:

  arguments    params, optimizer state and the batch shard the step reads
  outputs      what it returns minus the buffers it reuses (the donated state is aliased)
  temporaries  activations kept for the backward pass and everything else live at the peak
  total        their sum, compared with the chip's HBM: over it, the step cannot run

and the step's FLOPs. Those come two ways: XLA's cost analysis (per chip, all operations, but
a `lax.scan` body counted once, so a scanned model is under-counted), and the matmuls of the
traced step (every scan iteration and rematerialised forward pass included), which is the
figure to size a run by.

`--topology` takes Cloud TPU accelerator names (`v5p-256`: v4 and v5p names count
TensorCores, two per chip; v5e and v6e names count chips) or a raw `GEN:AxBxC` shape
(`v5p:4x4x12`). `--slices N` compiles for N such slices joined by the data-centre network
(`config.mesh.slices` = N; the default is the config's own). Exit status: 0 fits, 1 does not
fit (the message says by how much and what to try), 2 the config or topology is wrong.
"""
import argparse
import collections
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple


def _compile_only_environment(command_line: bool) -> None:
  """Environment for a compile-only libtpu, set before JAX or libtpu loads.

  ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise takes a machine-wide lock file, so a second
  compile (or a test run) on the same machine would fail; nothing here opens a chip.
  TPU_WORKER_HOSTNAMES: off a TPU VM libtpu cannot discover its workers and logs an alarming
  error that means nothing for compiling. From the command line also JAX_PLATFORMS=cpu: JAX
  never opens a TPU (there may be none, or a training job may own it) while libtpu still
  describes the topology; and TensorFlow, only the input code here, stays quiet and off GPUs.
  Imported as a library, the caller's JAX platforms are left alone.
  """
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  if command_line:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


_compile_only_environment(command_line=__name__ == "__main__")

import jax  # noqa: E402  (after the environment above)

from vlpjax import config as config_lib  # noqa: E402
from vlpjax import sharding  # noqa: E402
# The traced step's matmul count lives next to the analytic model FLOPs that MFU divides by.
from vlpjax.flops import matmul_flops  # noqa: E402
from vlpjax.registry import nearest  # noqa: E402

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
  """What an accelerator name does not say: how libtpu names it and what a chip holds."""
  topology_prefix: str       # libtpu's name: "v5p" in "v5p:4x4x8"
  hbm_gib: float             # HBM per chip usable by programs (Cloud TPU's published figure)
  cores_per_name_unit: int   # accelerator names count TensorCores (2 per chip) or chips (1)
  chip_config: Optional[str]  # "megacore": one JAX device per chip (else v4 gives two)
  shapes: Dict[int, Tuple[int, ...]]  # chips -> the slice's chip grid


def _v5p_shapes() -> Dict[int, Tuple[int, ...]]:
  """v5p slices: the sub-cube shapes, then whole 4x4x4 cubes up to 16x16x24 (96 cubes).

  For a cube count Cloud TPU can arrange several ways, the most cubic shape (smallest longest
  side) is taken; `--topology v5p:AxBxC` compiles for any other.
  """
  shapes = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
  sides = range(4, 25, 4)
  for cubes in range(1, 97):
    fits = [(a, b, c) for a in sides for b in sides for c in sides
            if a <= b <= c and a * b * c == 64 * cubes and b <= 16]
    if fits:
      shapes[64 * cubes] = min(fits, key=lambda s: (s[2], s[1]))
  return shapes


_PLANAR = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
           256: (16, 16)}
GENERATIONS: Dict[str, Generation] = {
    "v4": Generation("v4", 32, 2, "megacore", {
        4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
        128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 768: (8, 8, 12), 1024: (8, 8, 16),
        2048: (8, 16, 16)}),
    "v5e": Generation("v5e", 16, 1, None, _PLANAR),
    "v5p": Generation("v5p", 95, 2, "megacore", _v5p_shapes()),
    "v6e": Generation("v6e", 32, 1, None, _PLANAR),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """One slice of TPU chips, as libtpu's `get_topology_desc` takes it."""
  name: str                   # what the user asked for: "v5p-256" or "v5p:4x4x8"
  generation: str
  shape: Tuple[int, ...]      # chip grid
  chip_config: Optional[str]
  chips_per_host_bounds: Tuple[int, int, int]
  hbm_gib: float

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology_name(self) -> str:
    return f"{GENERATIONS[self.generation].topology_prefix}:{'x'.join(map(str, self.shape))}"


def accelerator_names() -> List[str]:
  """Every accelerator name `--topology` knows, smallest first within a generation."""
  return [f"{gen}-{chips * spec.cores_per_name_unit}"
          for gen, spec in GENERATIONS.items() for chips in sorted(spec.shapes)]


def _host_bounds(shape: Tuple[int, ...]) -> Tuple[int, int, int]:
  """Chips per host: 4 (2x2) on multi-host slices, 1 / 4 / 8 on the single-host v5e/v6e
  ones. It only assigns devices to processes; the compiled step does not depend on it."""
  grid = tuple(shape) + (1,) * (3 - len(shape))
  if math.prod(grid) in (1, 8) and len(shape) == 2:
    return grid
  return tuple(min(g, b) for g, b in zip(grid, (2, 2, 1)))


def topology(name: str, hbm_gib: Optional[float] = None) -> Topology:
  """`v5p-256` (accelerator name) or `v5p:4x4x8` (chip grid) -> Topology.

  `hbm_gib` replaces the generation's HBM per chip (to ask whether a step fits a smaller
  budget, e.g. leaving room for something else). Unknown names raise a ValueError that lists
  the known ones.
  """
  raw = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", name)
  if raw:
    gen, grid = raw.group(1), tuple(int(d) for d in raw.group(2).split("x"))
    if gen not in GENERATIONS:
      raise ValueError(f"--topology {name!r}: unknown TPU generation {gen!r}; known: "
                       f"{', '.join(GENERATIONS)}.")
  else:
    gen, _, count = name.partition("-")
    spec = GENERATIONS.get(gen)
    size = int(count) if count.isdigit() else None
    if not spec or size is None or size // spec.cores_per_name_unit not in spec.shapes or \
        size % spec.cores_per_name_unit:
      raise ValueError(_unknown_topology_message(name, gen, size))
    chips = size // spec.cores_per_name_unit
    grid = spec.shapes[chips]
  spec = GENERATIONS[gen]
  return Topology(name, gen, grid, spec.chip_config, _host_bounds(grid),
                  spec.hbm_gib if hbm_gib is None else hbm_gib)


def _unknown_topology_message(name: str, generation: str, size: Optional[int]) -> str:
  known = accelerator_names()
  sizes = sorted(int(n.split("-")[1]) for n in known if n.startswith(generation + "-"))
  if sizes and size is not None:
    # The neighbouring sizes of the same generation: closer than spelling would suggest.
    below, above = [s for s in sizes if s < size][-1:], [s for s in sizes if s > size][:1]
    near = [f"{generation}-{s}" for s in below + above]
  else:
    near = nearest(name, known)
  hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
  by_generation = "; ".join(
      f"{g}: {', '.join(n for n in known if n.startswith(g + '-'))}" for g in GENERATIONS)
  return (f"Unknown TPU topology {name!r}.{hint} Give an accelerator name (v4 and v5p count "
          f"TensorCores, 2 per chip; v5e and v6e count chips) or a chip grid such as "
          f"'v5p:4x4x8'. Known names: {by_generation}.")


class LibtpuMissingError(RuntimeError):
  """libtpu, which describes TPU chips for compiling, is not installed."""


def compile_only_devices(topo: Topology, num_slices: int = 1) -> list:
  """The topology's devices (`num_slices` slices of it), usable for compiling only."""
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise LibtpuMissingError(
        "Compiling for TPU needs libtpu (no TPU needed): pip install -e .[tpu]")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = dict(chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=num_slices)
  if topo.chip_config:
    kwargs["chip_config_name"] = topo.chip_config
  try:
    description = topologies.get_topology_desc(topology_name=topo.topology_name,
                                               platform="tpu", **kwargs)
  except Exception as e:  # libtpu's own errors are RuntimeErrors of varying types
    raise ValueError(f"libtpu cannot describe {topo.topology_name} ({num_slices} "
                     f"slice(s)): {e}") from e
  return list(description.devices)


# ---------------------------------------------------------------------------------- compile


@dataclasses.dataclass
class Report:
  """What compiling one config for one topology found; sizes in bytes, per chip."""
  config: str
  topology: str
  topology_name: str
  device_kind: str
  chips: int
  slices: int
  mesh: Dict[str, int]
  hbm_gib: float
  global_batch_size: int
  fits: bool
  remat_policy: str = ""
  state_bytes: int = 0         # params + optimizer state held by one chip (from the shardings)
  replicated_bytes: int = 0    # the part of it every chip holds whole
  argument_bytes: int = 0
  output_bytes: int = 0        # outputs minus the aliased (donated) ones
  temp_bytes: int = 0
  code_bytes: int = 0
  total_bytes: int = 0
  compile_seconds: float = 0.0
  matmul_flops: float = 0.0        # per step, all chips (traced program)
  xla_flops_per_chip: float = 0.0  # XLA cost analysis (scan bodies counted once)
  compiler_error: str = ""         # the compiler's out-of-memory message, when it gave one
  compiler_available_bytes: int = 0  # the HBM that message says programs may use
  fsdp_tip: str = ""               # a mesh whose FSDP size divides the replicated params

  @property
  def matmul_flops_per_chip(self) -> float:
    return self.matmul_flops / (self.chips * self.slices)

  def to_json(self) -> Dict[str, Any]:
    out = dataclasses.asdict(self)
    out["matmul_flops_per_chip"] = self.matmul_flops_per_chip
    out.update({k.replace("_bytes", "_gib"): v / GIB for k, v in out.items()
                if k.endswith("_bytes")})
    return out


def _memory(compiled) -> Dict[str, int]:
  stats = compiled.memory_analysis()
  memory = dict(argument_bytes=stats.argument_size_in_bytes,
                output_bytes=stats.output_size_in_bytes - stats.alias_size_in_bytes,
                temp_bytes=stats.temp_size_in_bytes,
                code_bytes=stats.generated_code_size_in_bytes)
  memory["total_bytes"] = sum(memory.values())
  return memory


_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory")
_SIZE = r"([\d.]+)\s*([KMGT])i?B?"


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * 1024 ** ("KMGT".index(unit.upper()) + 1))


def compiler_oom_bytes(message: str) -> Tuple[Optional[int], Optional[int]]:
  """(needed, available) bytes per chip from an out-of-memory compiler message, where it
  says them. The compiler's available HBM is a little under the chip's (runtime reserve).

  libtpu words it as '... required for HLO temporaries (21.04G) exceeds available HBM
  (15.75G)' or 'Used 20.5G of 15.48G hbm. Exceeded hbm capacity by 5.0G.'.
  """
  for needed, available in ((r"required[^(]*\(" + _SIZE + r"\)", r"available HBM \(" + _SIZE),
                            (r"Used " + _SIZE + r" of", r"of " + _SIZE + r" hbm")):
    match = re.search(needed, message)
    if match:
      limit = re.search(available, message)
      return _bytes(*match.groups()), _bytes(*limit.groups()) if limit else None
  return None, None


def state_bytes_per_chip(setup) -> Tuple[int, int]:
  """(all, replicated) bytes of params and optimizer state one chip holds, from the state's
  shardings alone (no compile): a leaf is replicated when no mesh axis splits it, by the rules
  (data parallel) or because its dimensions do not divide by the mesh axes they map to."""
  held = replicated = 0
  for leaf, leaf_sharding in zip(jax.tree.leaves(setup.abstract_state),
                                 jax.tree.leaves(setup.state_shardings)):
    nbytes = math.prod(leaf_sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    held += nbytes
    if leaf_sharding.is_fully_replicated and len(setup.mesh.devices.flat) > 1:
      replicated += nbytes
  return held, replicated


def fsdp_divisor_tip(setup, min_bytes: int = 2**28) -> Optional[str]:
  """A smaller FSDP size as a mesh override, when the `fsdp` axis does not divide the params'
  dimensions (width 1152 over 256 chips) and so leaves a tenth or more of the state one chip
  holds, and at least `min_bytes`, replicated: the size that divides the dimension holding
  most of those bytes. (Small params the rules replicate anyway, biases and position
  embeddings, stay under the thresholds.)"""
  fsdp = setup.mesh.shape.get("fsdp", 1)
  held, replicated = state_bytes_per_chip(setup)
  if fsdp <= 1 or replicated < max(0.1 * held, min_bytes):
    return None
  bytes_by_dim = collections.Counter()
  for leaf, leaf_sharding in zip(jax.tree.leaves(setup.abstract_state["params"]),
                                 jax.tree.leaves(setup.state_shardings["params"])):
    if leaf_sharding.is_fully_replicated:
      for dim in set(leaf.shape):
        if dim % fsdp and dim > 1:
          bytes_by_dim[dim] += leaf.size * leaf.dtype.itemsize
  if not bytes_by_dim:
    return None
  width = bytes_by_dim.most_common(1)[0][0]
  divisor = math.gcd(fsdp, width)
  if divisor == 1:
    return None
  data = setup.mesh.shape.get("data", 1) * fsdp // divisor // setup.config.mesh.get("slices", 1)
  return (f"--config.mesh.data={data} --config.mesh.fsdp=-1 (FSDP over {divisor} chips "
          f"divides dimension {width}; over {fsdp} it is replicated)")


def build_for_topology(config, topo: Topology, slices: int = 1):
  """The trainer's Setup on the topology's devices (`config.mesh.slices` set to `slices`).

  Fails fast, with the trainer's ConfigError or ValueError, on a mesh or batch the topology
  cannot take: before anything is traced or compiled.
  """
  from vlpjax import train_setup  # pylint: disable=g-import-not-at-top
  config.mesh.slices = slices
  devices = compile_only_devices(topo, slices)
  try:
    return train_setup.build(config, devices=devices)
  except NotImplementedError as e:  # jax's mesh_utils: no mesh axis -> chip grid assignment
    raise ValueError(f"config.mesh {config.mesh.to_dict()} cannot be laid out on the "
                     f"{topo.topology_name} chip grid: {e}") from e


def compile_train_step(config, topo: Topology, slices: int = 1, *, spec: str = "") -> Report:
  """Builds, traces and compiles the finalised `config`'s train step for `slices` x `topo`.

  Returns the Report; `fits` is False when the compiled step needs more than the chip's HBM
  or the compiler itself ran out of memory (then `compiler_error` holds its message).
  """
  setup = build_for_topology(config, topo, slices)
  report = Report(config=spec, topology=topo.name, topology_name=topo.topology_name,
                  device_kind=setup.mesh.devices.flat[0].device_kind, chips=topo.chips,
                  slices=slices, mesh=dict(setup.mesh.shape), hbm_gib=topo.hbm_gib,
                  global_batch_size=config.global_batch_size, fits=True,
                  remat_policy=config.remat_policy)
  report.state_bytes, report.replicated_bytes = state_bytes_per_chip(setup)
  report.fsdp_tip = fsdp_divisor_tip(setup) or ""
  with sharding.logical_context(setup.mesh, config.sharding_rules):
    report.matmul_flops = matmul_flops(jax.make_jaxpr(setup.jitted_step)(
        *setup.abstract_step_args()))
  start = time.perf_counter()
  try:
    compiled = setup.lower_train_step().compile()
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError, XlaRuntimeError)
    message = str(e)
    if not any(marker in message for marker in _OOM_MARKERS):
      raise
    report.compile_seconds = time.perf_counter() - start
    report.fits = False
    report.compiler_error = message.strip().splitlines()[0]
    needed, available = compiler_oom_bytes(message)
    report.total_bytes, report.compiler_available_bytes = needed or 0, available or 0
    return report
  report.compile_seconds = time.perf_counter() - start
  for key, value in _memory(compiled).items():
    setattr(report, key, value)
  report.xla_flops_per_chip = float((compiled.cost_analysis() or {}).get("flops", 0.0))
  report.fits = report.total_bytes <= topo.hbm_gib * GIB
  return report


# From the least recomputation (the fastest step, the most memory) to the most: `none` keeps
# every activation; `dots_saveable` keeps matmul outputs and recomputes the element-wise work
# between them; `dots_with_no_batch_dims_saveable` keeps only the weight matmuls' outputs, so the
# attention matmuls are recomputed too; `full` recomputes each block's whole forward pass.
REMAT_SWEEP = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")


def sweep_remat(config, topo: Topology, slices: int = 1, *, spec: str = "",
                policies: Sequence[str] = REMAT_SWEEP, log=None
                ) -> Tuple[List[Report], Optional[str]]:
  """Compiles the step under each remat policy, cheapest recomputation first, and stops at
  the first that fits: (the reports of those tried, that policy or None).

  `config` is not changed; each try compiles a copy with `remat_policy` set. `log` (e.g.
  `print`) gets one line per policy as it finishes: a pod config takes minutes each.
  """
  reports = []
  for policy in policies:
    trial = config.copy_and_resolve_references()
    trial.remat_policy = policy
    report = compile_train_step(trial, topo, slices, spec=spec)
    reports.append(report)
    if log is not None:
      log(_sweep_row(report, reports[0]))
    if report.fits:
      return reports, policy
  return reports, None


def _extra_matmul_flops(report: Report, first: Report) -> float:
  """The recomputation `report`'s policy adds, as a fraction of the first policy's FLOPs."""
  return report.matmul_flops / first.matmul_flops - 1 if first.matmul_flops else 0.0


def _sweep_row(report: Report, first: Report) -> str:
  if report.compiler_error:   # the compiler gave up placing buffers; it may say how much
    memory = (f"{_gib(report.total_bytes):>8} GiB (compiler: out of memory)"
              if report.total_bytes else "compiler: out of memory")
  else:
    memory = (f"{_gib(report.total_bytes):>8} GiB "
              f"({report.total_bytes / (report.hbm_gib * GIB):4.0%} of HBM)")
  extra = _extra_matmul_flops(report, first)
  return (f"  {report.remat_policy:34s} {memory:30s} matmul FLOPs {report.matmul_flops:.3e} "
          f"({extra:+.0%})  {'fits' if report.fits else 'does not fit'}  "
          f"[{report.compile_seconds:.0f} s]")


def sweep_conclusion(reports: List[Report], chosen: Optional[str], config=None) -> str:
  """The sweep's verdict: the policy to use and what it costs, or what else to try."""
  first, last = reports[0], reports[-1]
  if chosen == first.remat_policy:
    return f"cheapest that fits: --config.remat_policy={chosen} (the least recomputation tried)"
  if chosen is not None:
    extra = _extra_matmul_flops(last, first)
    return (f"cheapest that fits: --config.remat_policy={chosen} ({extra:+.0%} matmul FLOPs "
            f"per step against {first.remat_policy}, which does not fit)")
  tips = (_suggestions(config, topology(last.topology, last.hbm_gib), last.mesh,
                       last.fsdp_tip, remat=False) if config is not None else [])
  return (f"does not fit with any remat policy: {last.hbm_gib:g} GiB per chip on "
          f"{last.topology}" + (f"; try {'; or '.join(tips)}." if tips else "."))


# ---------------------------------------------------------------------------------- report


def _suggestions(config, topo: Topology, mesh: Dict[str, int], fsdp_tip: str = "",
                 remat: bool = True) -> List[str]:
  """What usually brings a step under the HBM, most specific first."""
  tips = [fsdp_tip] if fsdp_tip else []
  if remat and config.remat_policy != "full":
    tips.append(f"--config.remat_policy=full (now {config.remat_policy!r}; --remat_sweep "
                "finds the cheapest policy that fits)")
  accum = config.grad_accum_steps
  batch_split = math.prod(mesh.get(a, 1) for a in sharding.BATCH_AXES)
  if (config.global_batch_size // (2 * accum)) % batch_split == 0:
    tips.append(f"--config.grad_accum_steps={2 * accum} (the same batch in twice as many "
                "micro-batches)")
  bigger = [n for n in accelerator_names() if n.startswith(topo.generation + "-") and
            topology(n).chips > topo.chips]
  if bigger:
    tips.append(f"a bigger slice (--topology {bigger[0]})")
  tips.append("more slices (--slices 2: half the batch per chip)")
  if mesh.get("tensor", 1) == 1:
    tips.append("tensor parallelism (the config argument tensor=4, where it has one)")
  return tips


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def summary(report: Report, config=None) -> str:
  """The human-readable result (the JSON has the same figures)."""
  lines = [f"{report.config or 'config'} on {report.slices} x {report.topology} "
           f"({report.topology_name}, {report.chips * report.slices} chips, "
           f"{report.device_kind}), mesh {report.mesh}, global batch "
           f"{report.global_batch_size}",
           f"compiled in {report.compile_seconds:.1f} s"]
  if report.compiler_error:
    lines.append(f"the compiler ran out of memory: {report.compiler_error}")
  else:
    lines += ["memory per chip (GiB):",
              f"  arguments             {_gib(report.argument_bytes):>8}",
              f"  outputs - aliased     {_gib(report.output_bytes):>8}",
              f"  temporaries           {_gib(report.temp_bytes):>8}",
              f"  generated code        {_gib(report.code_bytes):>8}",
              f"  total                 {_gib(report.total_bytes):>8} of "
              f"{report.hbm_gib:g} HBM ({report.total_bytes / (report.hbm_gib * GIB):.0%})",
              f"FLOPs per step: {report.matmul_flops:.3e} in matmuls "
              f"({report.matmul_flops_per_chip:.3e} per chip); XLA's cost analysis "
              f"{report.xla_flops_per_chip:.3e} per chip (scan bodies counted once)"]
  lines.append(f"params + optimizer state per chip: {_gib(report.state_bytes)} GiB, of which "
               f"{_gib(report.replicated_bytes)} GiB replicated on every chip")
  if report.fsdp_tip and report.fits:
    lines.append(f"  to shard what is replicated: {report.fsdp_tip}")
  if report.fits:
    lines.append("fits.")
  else:
    if report.compiler_available_bytes:
      has = f"the {_gib(report.compiler_available_bytes)} GiB the compiler may use"
    else:
      has = f"{report.hbm_gib:g} GiB"
    needs = (f"needs {_gib(report.total_bytes)} GiB of" if report.total_bytes
             else "needs more than")
    tips = (_suggestions(config, topology(report.topology, report.hbm_gib), report.mesh,
                         report.fsdp_tip) if config is not None else [])
    lines.append(f"does not fit: {needs} {has} per chip on {report.topology}" +
                 (f"; try {'; or '.join(tips)}." if tips else "."))
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m tools.aot_compile", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARG]")
  parser.add_argument("--topology", required=True,
                      help="accelerator name (v5p-256, v5e-256, v4-128, v6e-256, ...) or "
                           "chip grid (v5p:4x4x8)")
  parser.add_argument("--slices", type=int, default=None,
                      help="slices joined by DCN (default: the config's mesh.slices)")
  parser.add_argument("--hbm_gib", type=float, default=None,
                      help="HBM per chip to compare with (default: the generation's)")
  parser.add_argument("--remat_sweep", action="store_true",
                      help="compile under each remat policy (" + ", ".join(REMAT_SWEEP) +
                           ") and stop at the first that fits: the fastest step that fits")
  parser.add_argument("--json", metavar="FILE", help="also write the figures here")
  args, rest = parser.parse_known_args(argv)
  return args, config_lib.split_overrides(parser, rest)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    topo = topology(args.topology, args.hbm_gib)
  except ValueError as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  try:
    config = config_lib.finalize(config_lib.load(args.config), overrides)
    slices = args.slices or int(config.mesh.get("slices", 1))
    if slices < 1:
      raise ValueError(f"--slices={slices}: need at least 1.")
    if args.remat_sweep:
      print(f"{args.config} on {slices} x {topo.name}: remat policies, least recomputation "
            "first (one compile each)", flush=True)
      reports, chosen = sweep_remat(config, topo, slices, spec=args.config,
                                    log=lambda line: print(line, flush=True))
    else:
      reports, chosen = [compile_train_step(config, topo, slices, spec=args.config)], None
  except LibtpuMissingError as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  except (config_lib.ConfigError, ValueError) as e:
    print(f"Config error: {e}", file=sys.stderr)
    return 2
  report = reports[-1]
  print(sweep_conclusion(reports, chosen, config) if args.remat_sweep
        else summary(report, config), flush=True)
  if args.json:
    figures = dict(report.to_json(), overrides=list(overrides), jax=jax.__version__)
    if args.remat_sweep:
      figures["remat_sweep"] = [r.to_json() for r in reports]
      figures["cheapest_remat_policy_that_fits"] = chosen
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=2)
      f.write("\n")
  return 0 if report.fits else 1


if __name__ == "__main__":
  sys.exit(main())
