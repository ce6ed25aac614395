"""Compiles a config's train step for an NVIDIA GPU on a machine without one: does it fit, and
what its kernels cost at the GPU's memory bandwidth and matmul rate.

  python -m tools.gpu_compile --config experiments/siglip_b16.py:batch=256,rules=data_parallel \\
      --gpu h100 --config.remat_policy=none [--hlo step.hlo.txt] [--json report.json]
  python -m tools.gpu_compile --config ... --gpu h100 --from_hlo dumped_step.txt.gz
  python -m tools.gpu_compile --config ... --gpu h100 --xla xla_gpu_dot_merger_threshold_mb=0

No GPU is touched. XLA compiles for a GPU it is told about instead of one it queries
("deviceless" compilation): JAX's CUDA plugin takes a description of the device (the
`GpuTargetConfigProto` text `GpuTarget.target_config` writes) and runs the whole GPU pipeline:
layout assignment, fusion, the scheduler, buffer assignment. So the memory figures are the
compiled program's (a SigLIP B/16 step compiled here needed 26.1 GiB, what the H100 run peaked
at), and the HLO is the program the GPU would run, with three differences: no autotuning (each
matmul is a Triton fusion, where a GPU's autotuner may pick cuBLAS), no libcudnn (cuDNN's
fused attention is lowered without the library's version check, `_cudnn_unchecked`), and no
timings.

The estimate (tools/kernel_estimate.py): a per-kernel roofline of the compiled step, a model
good for comparing two compiles of one step, not a measurement. Its rates
(`kernel_estimate.EFFICIENCY`) are what the H100 lent on 2026-11-24 ran (docs/benchmarks.md);
the SigLIP B/16 step measured there (101.9 ms) is estimated 9% slow (111.2 ms). `--from_hlo
FILE` estimates an HLO compiled elsewhere, such as the autotuned step a GPU run dumps
(tools/gpu_benchmarks.sh), to set those rates from a profile.

Needs JAX's CUDA plugin for the installed jax. `make gpu-compile-deps` installs it *beside* the
virtual environment (.venv-jax-cuda/), not in it: with the plugin importable, every JAX program
on a machine without a GPU prints the plugin's failed CUDA start. This tool registers the plugin
from there; on a machine with jax[cuda] installed nothing more is needed.

Exit status: 0 fits, 1 does not fit, 2 bad config, GPU name or missing plugin.
"""
import argparse
import contextlib
import dataclasses
import glob
import gzip
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

# Compile-only: JAX runs on the CPU, the plugin only describes the GPU.
if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PLUGIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          ".venv-jax-cuda")

import jax  # noqa: E402

from tools import kernel_estimate  # noqa: E402
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


class PluginMissingError(RuntimeError):
  pass


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
    # pylint: disable-next=g-import-not-at-top
    from jax._src.cudnn import fused_attention_stablehlo as fused
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


class XlaOptionError(ValueError):
  """An --xla option that is malformed or that this XLA does not have."""


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
                       top: int = 15, xla_options: Optional[Dict[str, Any]] = None) -> Report:
  """Traces and compiles the finalised `config`'s train step for one `gpu`; the Report.

  `xla_options`: XLA debug options for this compile ({"xla_gpu_...": value}), as a GPU run
  would take them in XLA_FLAGS (which this process's CPU XLA would refuse for GPU-only flags).
  """
  from vlpjax import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from vlpjax import train_setup  # pylint: disable=g-import-not-at-top
  options = dict(xla_options or {})
  device = compile_only_gpu(gpu)
  with _cudnn_unchecked(gpu):
    setup = train_setup.build(config, devices=[device])
    lowered = setup.lower_train_step()
    start = time.perf_counter()
    triton_gemm = True
    try:
      compiled = lowered.compile(compiler_options=options or None)
    except jax.errors.JaxRuntimeError as e:
      if "No such compile option" in str(e):
        raise XlaOptionError(f"--xla: this XLA has no such option ({e}); the names are "
                             "XLA's DebugOptions fields, e.g. xla_gpu_dot_merger_threshold_mb"
                             ) from None
      # Without a GPU there is no autotuning, and for some shapes (CoCa's 65-token decoder)
      # XLA then finds no Triton tiling at all; on a GPU the autotuner can pick cuBLAS there.
      # cuBLAS for every matmul is the closest compile that works.
      if "tile sizes" not in str(e):
        raise
      print("gpu_compile: XLA found no Triton GEMM tiling without autotuning; compiling "
            "with --xla_gpu_enable_triton_gemm=false (cuBLAS for every matmul)", file=sys.stderr)
      triton_gemm = False
      compiled = lowered.compile(
          compiler_options=dict(options, xla_gpu_enable_triton_gemm=False))
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
      estimate=kernel_estimate.summarize(kernel_estimate.kernels(text, gpu), model_flops, gpu,
                                        top), triton_gemm=triton_gemm)


def estimate_saved_hlo(path: str, config, gpu: GpuTarget, top: int = 15
                       ) -> Tuple[Dict[str, Any], float]:
  """The estimate of an HLO compiled elsewhere (text, or gzipped text), and the model FLOPs.

  For calibrating the estimate: on a GPU, XLA can dump the step it really ran (autotuned;
  tools/gpu_benchmarks.sh keeps it), and the run's profile says what each kind of kernel took.
  """
  from vlpjax import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from vlpjax.families import get_family  # pylint: disable=g-import-not-at-top
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    text = f.read()
  # The whole step's, as compile_train_step's: the estimate counts every loop iteration
  # (gradient accumulation's too).
  model_flops = flops_lib.step_model_flops(get_family(config),
                                           config.global_batch_size)["total"]
  return (kernel_estimate.summarize(kernel_estimate.kernels(text, gpu), model_flops, gpu, top),
          model_flops)


def format_report(report: Report) -> str:
  lines = [
      f"{report.config or 'config'} on one {report.device_name} (compiled for it, no GPU "
      f"used; {report.compile_seconds:.0f} s), global batch {report.global_batch_size}"
      + ("" if report.triton_gemm else "; every matmul on cuBLAS (no Triton tiling found)"),
      f"memory: {report.total_bytes / GIB:.1f} GiB of {report.memory_bytes / GIB:.1f} "
      f"({report.argument_bytes / GIB:.1f} arguments, {report.temp_bytes / GIB:.1f} "
      f"temporaries, {report.output_bytes / GIB:.1f} outputs): "
      + ("fits" if report.fits else "DOES NOT FIT"),
  ]
  return "\n".join(lines + [kernel_estimate.format_estimate(report.estimate, report.model_flops)])


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m tools.gpu_compile", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARG]")
  parser.add_argument("--gpu", required=True, help="one of: " + ", ".join(GPUS))
  parser.add_argument("--hlo", metavar="FILE", help="write the compiled step's HLO here")
  parser.add_argument("--json", metavar="FILE", help="also write the figures here")
  parser.add_argument("--top", type=int, default=15, help="groups of kernels to list")
  parser.add_argument("--from_hlo", metavar="FILE[.gz]",
                      help="estimate this compiled HLO (e.g. dumped on a GPU) instead of "
                           "compiling; the config gives the model FLOPs")
  parser.add_argument("--xla", action="append", default=[], metavar="NAME=VALUE",
                      help="an XLA option for this compile, e.g. "
                           "xla_gpu_dot_merger_threshold_mb=0 (repeatable)")
  args, rest = parser.parse_known_args(argv)
  return args, config_lib.split_overrides(parser, rest)


def parse_xla_options(items: Sequence[str]) -> Dict[str, Any]:
  """['xla_gpu_x=true', 'xla_gpu_n=2'] -> {'xla_gpu_x': True, 'xla_gpu_n': 2}; leading
  dashes are dropped, so flags copied from an XLA_FLAGS line work as they are."""
  options = {}
  for item in items:
    name, sep, value = item.lstrip("-").partition("=")
    if not sep or not name.startswith("xla_"):
      raise XlaOptionError(f"--xla {item!r}: expected NAME=VALUE with an xla_ name, e.g. "
                           "xla_gpu_dot_merger_threshold_mb=0")
    lowered = value.lower()
    options[name] = (lowered == "true" if lowered in ("true", "false")
                     else int(value) if value.lstrip("-").isdigit() else value)
  return options


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  if args.gpu not in GPUS:
    print(f"Error: {unknown_name_message('GPU (--gpu)', args.gpu, tuple(GPUS))}",
          file=sys.stderr)
    return 2
  try:
    xla_options = parse_xla_options(args.xla)
    config = config_lib.finalize(config_lib.load(args.config), overrides)
    if args.from_hlo:
      est, model_flops = estimate_saved_hlo(args.from_hlo, config, GPUS[args.gpu], args.top)
      print(f"{args.from_hlo} on one {GPUS[args.gpu].name}")
      print(kernel_estimate.format_estimate(est, model_flops))
      return 0
    report = compile_train_step(config, GPUS[args.gpu], spec=args.config, hlo_path=args.hlo,
                                top=args.top, xla_options=xla_options)
  except OSError as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  except (PluginMissingError, config_lib.ConfigError, ValueError) as e:
    kind = "Error" if isinstance(e, (PluginMissingError, XlaOptionError)) else "Config error"
    print(f"{kind}: {e}", file=sys.stderr)
    return 2
  print(format_report(report), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(report.to_json(), overrides=list(overrides), xla_options=xla_options,
                     jax=jax.__version__), f,
                indent=2)
      f.write("\n")
  return 0 if report.fits else 1


if __name__ == "__main__":
  sys.exit(main())
