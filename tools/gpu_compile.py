"""Compiles a config's train step for an NVIDIA GPU on a machine without one: does it fit, and
what its kernels cost at the GPU's memory bandwidth and matmul rate.

  python -m tools.gpu_compile --config experiments/siglip_b16.py:batch=256,rules=data_parallel \\
      --gpu h100 --config.remat_policy=none [--hlo step.hlo.txt] [--json report.json]

No GPU is touched. XLA compiles for a GPU it is told about instead of one it queries
("deviceless" compilation): JAX's CUDA plugin takes a description of the device (the
`GpuTargetConfigProto` text `GpuTarget.target_config` writes) and runs the whole GPU pipeline:
layout assignment, fusion, the scheduler, buffer assignment. So the memory figures are the
compiled program's (a SigLIP B/16 step compiled here needed 26.1 GiB, what the H100 run peaked
at), and the HLO is the program the GPU would run, with three differences: no autotuning (each
matmul is a Triton fusion, where a GPU's autotuner may pick cuBLAS), no libcudnn (cuDNN's
fused attention is lowered without the library's version check, `_cudnn_unchecked`), and no
timings.

The estimate: each kernel of the compiled step (every fusion, custom call and copy that is not
a view) costs the larger of its bytes over the GPU's memory bandwidth and its matmul FLOPs over
the matmul rate, plus a launch. It reads no caches and overlaps nothing, so it is a model, not a
measurement: good for comparing two compiles of one step (a change to the model, a flag), and
for finding the kernels that move the most bytes. The rates (`EFFICIENCY`) are what the H100
lent on 2026-11-24 ran (docs/benchmarks.md); the current SigLIP B/16 step's estimate was within
10% of its measured step there.

Needs JAX's CUDA plugin for the installed jax. `make gpu-compile-deps` installs it *beside* the
virtual environment (.venv-jax-cuda/), not in it: with the plugin importable, every JAX program
on a machine without a GPU prints the plugin's failed CUDA start. This tool registers the plugin
from there; on a machine with jax[cuda] installed nothing more is needed.

Exit status: 0 fits, 1 does not fit, 2 bad config, GPU name or missing plugin.
"""
import argparse
import collections
import contextlib
import dataclasses
import glob
import json
import os
import re
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

# Compile-only: JAX runs on the CPU, the plugin only describes the GPU.
if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PLUGIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          ".venv-jax-cuda")

import jax  # noqa: E402

from tools import profile_summary  # noqa: E402
from vlpjax import config as config_lib  # noqa: E402
from vlpjax.registry import unknown_name_message  # noqa: E402

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """What XLA needs to know of a GPU to compile for it, and its spec-sheet rates."""
  name: str                     # CUDA's device name
  compute_capability: Tuple[int, int]
  sm_count: int
  clock_ghz: float
  memory_bytes: int             # what CUDA reports as total
  memory_bytes_per_s: float     # HBM bandwidth, spec sheet
  l2_bytes: int
  bf16_flops_per_s: float       # dense, spec sheet (what MFU is taken against)
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int

  def target_config(self) -> str:
    """The `stream_executor.GpuTargetConfigProto` text the CUDA plugin compiles for."""
    major, minor = self.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.memory_bytes_per_s)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{self.name}"
"""


_HOPPER = dict(compute_capability=(9, 0), sm_count=132, clock_ghz=1.98, l2_bytes=50 << 20,
               bf16_flops_per_s=989e12, shared_memory_per_sm=228 << 10,
               shared_memory_per_block_optin=227 << 10)
GPUS: Dict[str, GpuTarget] = {
    "h100": GpuTarget("NVIDIA H100 80GB HBM3", memory_bytes=84_942_979_072,
                      memory_bytes_per_s=3.35e12, **_HOPPER),
    "h200": GpuTarget("NVIDIA H200", memory_bytes=150_754_820_096,
                      memory_bytes_per_s=4.8e12, **_HOPPER),
}

# Fractions of the spec-sheet rates that kernels reached on the H100 lent on 2026-11-24
# (docs/benchmarks.md): cuBLAS matmuls ~700 of 989 TFLOP/s, element-wise kernels ~3.0 of 3.35
# TB/s, cuDNN's fused attention ~100 TFLOP/s on 196- and 64-token sequences (fwd + bwd,
# helpers included; longer sequences do better). LAUNCH_SECONDS: a kernel's fixed cost.
EFFICIENCY = {"matmul": 0.71, "memory": 0.9, "attention": 0.10}
LAUNCH_SECONDS = 2e-6

_VIEWS = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all",
          "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_SUBCOMPUTATIONS = re.compile(r"(?:body|condition|calls|branch_computations)=\{?%?([\w.\-]+)")
_ARRAY = re.compile(r"(pred|s4|u4|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128|"
                    r"f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}


class PluginMissingError(RuntimeError):
  pass


def _elements(dims: str) -> int:
  count = 1
  for d in dims.split(","):
    if d:
      count *= int(d)
  return count


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape ('bf16[2,3]', '(f32[4], s32[])'), tuples summed."""
  return sum(_elements(dims) * _BYTES[dtype] for dtype, dims in _ARRAY.findall(shape))


def dot_flops(dot: profile_summary.HloInstruction, instructions) -> float:
  """2 x output elements x contracted size."""
  (out_dims,) = [dims for _, dims in _ARRAY.findall(dot.shape)][:1] or [""]
  lhs = instructions.get(dot.operands[0]) if dot.operands else None
  if lhs is None:
    return 0.0
  lhs_dims = [int(d) for d in _ARRAY.findall(lhs.shape)[0][1].split(",") if d]
  contracted = 1
  for axis in dot.lhs_contracting:
    contracted *= lhs_dims[axis]
  return 2.0 * _elements(out_dims) * contracted


def attention_flops(call: profile_summary.HloInstruction, instructions) -> float:
  """A cuDNN fused-attention call's matmul FLOPs: 4 B H Lq Lk D forward, 2.5x that backward."""
  q = instructions.get(call.operands[0]) if call.operands else None
  k = instructions.get(call.operands[1]) if len(call.operands) > 1 else None
  if q is None or k is None:
    return 0.0
  # [B, L, heads, head_dim] (cuDNN's BTNH layout, the one attention.py passes).
  batch, q_len, heads, head_dim = (int(d) for d in _ARRAY.findall(q.shape)[0][1].split(","))
  k_len = int(_ARRAY.findall(k.shape)[0][1].split(",")[1])
  forward = 4.0 * batch * heads * q_len * k_len * head_dim
  return forward * (2.5 if "backward" in (call.target or "").lower() else 1.0)


@dataclasses.dataclass
class Kernel:
  name: str
  kind: str           # profile_summary.KINDS
  bytes: float        # operands read + results written
  flops: float        # matmul FLOPs (dots, fused attention)
  seconds: float      # the estimate
  op_name: str        # the JAX op it came from


def kernels(hlo_text: str, gpu: GpuTarget) -> List[Kernel]:
  """Every kernel the entry computation (and the loops it runs) launches, with its estimate.

  A while loop's body is counted once, so a scanned model's layers count as one layer.
  """
  instructions, computations = profile_summary.parse_hlo(hlo_text)
  entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", hlo_text, re.MULTILINE)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  found, pending, seen = [], [entry.group(1)], set()
  matmul_rate = gpu.bf16_flops_per_s * EFFICIENCY["matmul"]
  attention_rate = gpu.bf16_flops_per_s * EFFICIENCY["attention"]
  bandwidth = gpu.memory_bytes_per_s * EFFICIENCY["memory"]
  while pending:
    computation = pending.pop()
    if computation in seen:
      continue
    seen.add(computation)
    for name in computations.get(computation, ()):
      op = instructions[name]
      if op.opcode in ("while", "conditional", "call"):
        pending.extend(_SUBCOMPUTATIONS.findall(_line_of(hlo_text, name)))
        continue
      if op.opcode in _VIEWS or op.opcode.endswith(("-done", "-update")):
        continue
      kind = profile_summary.classify(op, instructions, computations)
      cublas = (op.target or "").startswith("__cublas")
      # A cuBLAS call's result is (product, workspace); the workspace is scratch, not traffic.
      written = shape_bytes(_ARRAY.search(op.shape).group(0)) if cublas else shape_bytes(op.shape)
      moved = written + sum(shape_bytes(instructions[o].shape)
                            for o in op.operands if o in instructions)
      flops, rate = 0.0, matmul_rate
      if kind == "attention":
        flops, rate = attention_flops(op, instructions), attention_rate
      elif kind == "matmul":
        inner = [op] if op.opcode == "dot" or cublas else [
            i for i in profile_summary._instructions_within(op.calls or "", instructions,
                                                             computations)
            if i.opcode == "dot"]
        flops = sum(dot_flops(d, instructions) for d in inner)
      seconds = max(moved / bandwidth, flops / rate) + LAUNCH_SECONDS
      found.append(Kernel(name, kind, moved, flops, seconds, op.op_name))
  return found


def _line_of(hlo_text: str, name: str) -> str:
  match = re.search(rf"^\s*(?:ROOT\s+)?%?{re.escape(name)}\s*=.*$", hlo_text, re.MULTILINE)
  return match.group(0) if match else ""


def op_group(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(TwoTower))/img/layers_7/mlp/add' -> 'bwd TwoTower/img/layers_N/mlp/add'.

  The jit wrapper names the step, not a place in the model, so it is dropped; transformation
  wrappers around the module name are peeled off (transpose(...) marks the backward pass).
  """
  if not op_name:
    return "(no JAX op: optimizer, copies)"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  path = []
  for part in op_name.split("/"):
    if part.startswith("jit("):
      continue
    while (peeled := re.fullmatch(r"[a-z_]+\((.*)\)", part)):
      part = peeled.group(1)
    path.append(part)
  # Inside jax.checkpoint the name stack starts again from the model: keep the inner one.
  if path and path[0] in path[1:]:
    path = path[len(path) - 1 - path[::-1].index(path[0]):]
  return f"{direction} " + re.sub(r"layers_\d+", "layers_N", "/".join(path))


def summarize(found: List[Kernel], model_flops: float, gpu: GpuTarget, top: int = 15
              ) -> Dict[str, Any]:
  total = sum(k.seconds for k in found)
  by_kind: Dict[str, Dict[str, float]] = {}
  for k in found:
    row = by_kind.setdefault(k.kind, {"seconds": 0.0, "kernels": 0, "bytes": 0.0})
    row["seconds"] += k.seconds
    row["kernels"] += 1
    row["bytes"] += k.bytes
  groups: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
  for k in found:
    group = groups[f"{k.kind}: {op_group(k.op_name)}"]
    group[0] += k.seconds
    group[1] += 1
  return {
      "estimated_step_seconds": total,
      "estimated_mfu": model_flops / total / gpu.bf16_flops_per_s if total else 0.0,
      "kernels": len(found),
      "bytes_moved": sum(k.bytes for k in found),
      "matmul_flops": sum(k.flops for k in found),
      "by_kind": {kind: dict(row, share=row["seconds"] / total)
                  for kind, row in sorted(by_kind.items(), key=lambda kv: -kv[1]["seconds"])},
      "top_groups": [{"group": g, "seconds": s, "kernels": n}
                     for g, (s, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]],
      "efficiency": dict(EFFICIENCY, launch_seconds=LAUNCH_SECONDS),
  }


# --- compiling -----------------------------------------------------------------------------

def _register_plugin_beside_environment() -> bool:
  """Registers the CUDA plugin `make gpu-compile-deps` put in PLUGIN_DIR; False if none.

  Registered directly (JAX's plugin registry), not imported as a `jax_plugins` package: the
  package's own start-up checks for libcudnn and a GPU, neither of which compiling needs.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  libraries = sorted(glob.glob(os.path.join(PLUGIN_DIR, "jax_plugins", "xla_cuda*",
                                            "xla_cuda_plugin.so")))
  if not libraries:
    return False
  xla_bridge.register_plugin("cuda", priority=500, library_path=libraries[-1])
  return True


def compile_only_gpu(gpu: GpuTarget):
  """A compile-only device for `gpu`, from JAX's CUDA plugin."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  def describe():
    return topologies.get_topology_desc(gpu.name, "cuda", target_config=gpu.target_config(),
                                        topology="1x1x1").devices[0]
  try:
    return describe()
  except NotImplementedError as e:  # No CUDA plugin registered in this process.
    if not _register_plugin_beside_environment():
      raise PluginMissingError(
          f"JAX's CUDA plugin for jax {jax.__version__} is needed to compile for a GPU "
          f"and none is installed ({e}). `make gpu-compile-deps` installs it beside the "
          f"virtual environment, in {PLUGIN_DIR}.") from e
  return describe()


@contextlib.contextmanager
def _cudnn_unchecked(gpu: GpuTarget) -> Iterator[None]:
  """JAX's cuDNN attention asks libcudnn for its version and the local GPU for its compute
  capability before lowering; here there is neither, so both answers come from `gpu`.
  Restored on exit; a JAX without these hooks lowers attention as it is."""
  from vlpjax.models import attention  # pylint: disable=g-import-not-at-top
  major, minor = gpu.compute_capability
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fused  # pylint: disable=g-import-not-at-top
  except ImportError:
    fused = None
  patches = {"check_cudnn_version": lambda: 91000,
             "check_compute_capability": lambda want: tuple(map(int, want.split("."))) <= (
                 major, minor),
             "is_cuda_compute_capability_equal": lambda want: tuple(
                 map(int, want.split("."))) == (major, minor)}
  saved = {name: getattr(fused, name) for name in patches if hasattr(fused, name)}
  for name in saved:
    setattr(fused, name, patches[name])
  try:
    with attention.compile_target("gpu", float(f"{major}.{minor}")):
      yield
  finally:
    for name, value in saved.items():
      setattr(fused, name, value)


@dataclasses.dataclass
class Report:
  config: str
  gpu: str
  device_name: str
  global_batch_size: int
  fits: bool
  compile_seconds: float
  memory_bytes: int            # the GPU's
  argument_bytes: int          # parameters, optimizer state, batch
  temp_bytes: int              # activations and XLA's scratch
  output_bytes: int            # not aliased to an argument
  total_bytes: int
  model_flops: float
  estimate: Dict[str, Any]
  triton_gemm: bool = True     # False: compiled with every matmul on cuBLAS (see below)

  def to_json(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


def compile_train_step(config, gpu: GpuTarget, *, spec: str = "", hlo_path: str = "",
                       top: int = 15) -> Report:
  """Traces and compiles the finalised `config`'s train step for one `gpu`; the Report."""
  from vlpjax import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from vlpjax import train_setup  # pylint: disable=g-import-not-at-top
  device = compile_only_gpu(gpu)
  with _cudnn_unchecked(gpu):
    setup = train_setup.build(config, devices=[device])
    lowered = setup.lower_train_step()
    start = time.perf_counter()
    triton_gemm = True
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      # Without a GPU there is no autotuning, and for some shapes (CoCa's 65-token decoder)
      # XLA then finds no Triton tiling at all; on a GPU autotuning would pick cuBLAS there.
      # cuBLAS for every matmul is the closest compile that works.
      if "tile sizes" not in str(e):
        raise
      print("gpu_compile: XLA found no Triton GEMM tiling without autotuning; compiling "
            "with --xla_gpu_enable_triton_gemm=false (cuBLAS for every matmul)", file=sys.stderr)
      triton_gemm = False
      compiled = lowered.compile(compiler_options={"xla_gpu_enable_triton_gemm": False})
  compile_seconds = time.perf_counter() - start
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(text)
  memory = compiled.memory_analysis()
  outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes
  total = memory.argument_size_in_bytes + memory.temp_size_in_bytes + outputs
  model_flops = flops_lib.step_model_flops(setup.family, config.global_batch_size)["total"]
  return Report(
      config=spec, gpu=next(k for k, v in GPUS.items() if v == gpu), device_name=gpu.name,
      global_batch_size=config.global_batch_size, fits=total <= gpu.memory_bytes,
      compile_seconds=compile_seconds, memory_bytes=gpu.memory_bytes,
      argument_bytes=memory.argument_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      output_bytes=outputs, total_bytes=total, model_flops=model_flops,
      estimate=summarize(kernels(text, gpu), model_flops, gpu, top), triton_gemm=triton_gemm)


def format_report(report: Report) -> str:
  est = report.estimate
  lines = [
      f"{report.config or 'config'} on one {report.device_name} (compiled for it, no GPU "
      f"used; {report.compile_seconds:.0f} s), global batch {report.global_batch_size}"
      + ("" if report.triton_gemm else "; every matmul on cuBLAS (no Triton tiling found)"),
      f"memory: {report.total_bytes / GIB:.1f} GiB of {report.memory_bytes / GIB:.1f} "
      f"({report.argument_bytes / GIB:.1f} arguments, {report.temp_bytes / GIB:.1f} "
      f"temporaries, {report.output_bytes / GIB:.1f} outputs): "
      + ("fits" if report.fits else "DOES NOT FIT"),
      f"estimate (a model, not a measurement): {est['estimated_step_seconds'] * 1e3:.1f} ms "
      f"per step, {est['kernels']} kernels moving {est['bytes_moved'] / 1e9:.1f} GB; model "
      f"FLOPs {report.model_flops / 1e12:.2f} T -> MFU {est['estimated_mfu']:.1%}",
      "  kind           ms   share  kernels      GB",
  ]
  for kind, row in est["by_kind"].items():
    lines.append(f"  {kind:<12} {row['seconds'] * 1e3:6.2f} {row['share']:6.1%} "
                 f"{row['kernels']:8d} {row['bytes'] / 1e9:7.1f}")
  lines.append("  costliest groups of kernels (layers_N: all layers together):")
  for row in est["top_groups"]:
    lines.append(f"  {row['seconds'] * 1e3:7.2f} ms {row['kernels']:4d}x  {row['group']}")
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m tools.gpu_compile", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARG]")
  parser.add_argument("--gpu", required=True, help="one of: " + ", ".join(GPUS))
  parser.add_argument("--hlo", metavar="FILE", help="write the compiled step's HLO here")
  parser.add_argument("--json", metavar="FILE", help="also write the figures here")
  parser.add_argument("--top", type=int, default=15, help="groups of kernels to list")
  args, rest = parser.parse_known_args(argv)
  return args, config_lib.split_overrides(parser, rest)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  if args.gpu not in GPUS:
    print(f"Error: {unknown_name_message('GPU (--gpu)', args.gpu, tuple(GPUS))}",
          file=sys.stderr)
    return 2
  try:
    config = config_lib.finalize(config_lib.load(args.config), overrides)
    report = compile_train_step(config, GPUS[args.gpu], spec=args.config, hlo_path=args.hlo,
                                top=args.top)
  except (PluginMissingError, config_lib.ConfigError, ValueError) as e:
    kind = "Error" if isinstance(e, PluginMissingError) else "Config error"
    print(f"{kind}: {e}", file=sys.stderr)
    return 2
  print(format_report(report), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(report.to_json(), overrides=list(overrides), jax=jax.__version__), f,
                indent=2)
      f.write("\n")
  return 0 if report.fits else 1


if __name__ == "__main__":
  sys.exit(main())
