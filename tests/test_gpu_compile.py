"""tools/gpu_compile.py and tools/kernel_estimate.py: a GPU's compiled step on a CPU-only machine,
and its kernel estimate.

The estimate's arithmetic is checked on HLO written by hand; the compile itself with JAX's
CUDA plugin (`make test` installs it beside the environment): a matmul's memory and FLOPs,
and a two-block SigLIP B/16 step with cuDNN attention, whose layouts must keep the batch major.
"""
import gzip
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tools import gpu_compile
from tools import kernel_estimate
from vlpjax import train
from vlpjax.models import attention
from vlpjax.models import short_attention

H100 = gpu_compile.GPUS["h100"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_dot (p0: bf16[64,32], p1: bf16[32,16]) -> bf16[64,16] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = bf16[32,16]{1,0} parameter(1)
  ROOT %d = bf16[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_gelu (p0.1: bf16[64,16]) -> bf16[64,16] {
  %p0.1 = bf16[64,16]{1,0} parameter(0)
  ROOT %t = bf16[64,16]{1,0} tanh(%p0.1)
}

%fused_update (buffer: f32[128], at: s32[], update: f32[8]) -> f32[128] {
  %update = f32[8]{0} parameter(2)
  %buffer = f32[128]{0} parameter(0)
  %at = s32[] parameter(1)
  ROOT %dus = f32[128]{0} dynamic-update-slice(%buffer, %update, %at)
}

%fused_slice (stacked: f32[128], at.1: s32[]) -> f32[8] {
  %stacked = f32[128]{0} parameter(0)
  %at.1 = s32[] parameter(1)
  %piece = f32[8]{0} dynamic-slice(%stacked, %at.1), dynamic_slice_sizes={8}
  ROOT %twice = f32[8]{0} add(%piece, %piece)
}

%body (s: (s32[], f32[128])) -> (s32[], f32[128]) {
  %s = (s32[], f32[128]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %v = f32[128]{0} get-tuple-element(%s), index=1
  %n = f32[128]{0} fusion(%v), kind=kLoop, calls=%fused_gelu.2
  %sl = f32[8]{0} fusion(%n, %i), kind=kLoop, calls=%fused_slice
  %up = f32[128]{0} fusion(%n, %i, %sl), kind=kLoop, calls=%fused_update
  ROOT %r = (s32[], f32[128]{0}) tuple(%i, %up)
}

%fused_gelu.2 (q: f32[128]) -> f32[128] {
  %q = f32[128]{0} parameter(0)
  ROOT %e = f32[128]{0} exponential(%q)
}

%cond (c: (s32[], f32[128])) -> pred[] {
  %c = (s32[], f32[128]{0}) parameter(0)
  ROOT %k = pred[] constant(false)
}

ENTRY %main (a: bf16[64,32], b: bf16[32,16], w: (s32[], f32[128])) -> bf16[64,16] {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %w = (s32[], f32[128]{0}) parameter(2)
  %mm = bf16[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/jvp(M)/layers_3/fc1/dot_general"}
  %loop = (s32[], f32[128]{0}) while(%w), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %view = bf16[16,64]{0,1} bitcast(%mm)
  %lt = (bf16[16,32]{1,0}, s8[4194304]{0}) custom-call(%view, %a), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  ROOT %g = bf16[64,16]{1,0} fusion(%mm), kind=kLoop, calls=%fused_gelu, metadata={op_name="jit(step)/transpose(jvp(M))/layers_3/mlp/tanh"}
}
"""


def test_kernels_of_hand_written_hlo():
  found = {k.name: k for k in kernel_estimate.kernels(_HLO, H100)}
  # The matmul fusion, the cuBLAS call, the GELU fusion and the loop body's three fusions;
  # views and the loop itself launch nothing.
  assert set(found) == {"mm", "lt", "g", "n", "sl", "up"}
  mm, lt, g, n = found["mm"], found["lt"], found["g"], found["n"]
  assert (mm.kind, lt.kind, g.kind, n.kind) == ("matmul", "matmul", "element-wise",
                                                "element-wise")
  # The loop runs 3 times (XLA's known trip count): its kernels count 3 times.
  assert n.launches == 3 and mm.launches == 1
  assert n.bytes == 3 * 2 * 4 * 128
  # A slice read of the loop-carried array reads the slice, not the array; an update in place
  # writes the update and does not read the buffer.
  assert found["sl"].bytes == 3 * (4 * 8 + 4 + 4 * 8)
  assert found["up"].bytes == 3 * (4 + 4 * 8 + 4 * 8)
  assert mm.flops == 2 * 64 * 16 * 32 and g.flops == 0
  assert mm.bytes == 2 * (64 * 32 + 32 * 16 + 64 * 16)
  # [16, 64] x [64, 32]: the contraction read from the backend config; the 4 MB workspace
  # is scratch, not traffic.
  assert lt.flops == 2 * 16 * 32 * 64
  assert lt.bytes == 2 * (16 * 64 + 64 * 32 + 16 * 32)
  assert g.bytes == 2 * 2 * 64 * 16
  bandwidth = H100.memory_bytes_per_s * kernel_estimate.EFFICIENCY["memory"]
  rate = H100.bf16_flops_per_s * kernel_estimate.EFFICIENCY["matmul"]
  launch = kernel_estimate.LAUNCH_SECONDS
  assert mm.seconds == pytest.approx(max(mm.bytes / bandwidth, mm.flops / rate) + launch)
  assert g.seconds == pytest.approx(g.bytes / bandwidth + launch)
  assert kernel_estimate.op_group(mm.op_name) == "fwd M/layers_N/fc1/dot_general"
  assert kernel_estimate.op_group(g.op_name) == "bwd M/layers_N/mlp/tanh"
  # Inside jax.checkpoint the name stack restarts from the model.
  assert kernel_estimate.op_group(
      "jit(step)/transpose(jvp(M))/img/layers_2/fc1/M/img/layers_2/fc1/checkpoint/reduce_sum"
  ) == "bwd M/img/layers_N/fc1/checkpoint/reduce_sum"

  summary = kernel_estimate.summarize(list(found.values()), model_flops=1e6, gpu=H100)
  total = sum(k.seconds for k in found.values())
  assert n.seconds == pytest.approx(3 * (n.bytes / 3 / bandwidth + launch))
  assert summary["estimated_step_seconds"] == pytest.approx(total)
  assert summary["estimated_mfu"] == pytest.approx(1e6 / total / H100.bf16_flops_per_s)
  # GELU once; the loop's exp and slice-add 3 times each; its in-place update is a layout op.
  assert summary["by_kind"]["element-wise"]["kernels"] == 1 + 2 * 3
  assert summary["by_kind"]["layout"]["kernels"] == 3
  assert summary["kernels"] == 2 + 1 + 3 * 3
  assert sum(row["share"] for row in summary["by_kind"].values()) == pytest.approx(1.0)


def test_estimate_of_a_saved_hlo(tmp_path, capsys):
  """--from_hlo: the estimate of a step compiled elsewhere (gzipped, as gpu_benchmarks.sh
  keeps a GPU's), with the config's model FLOPs; no compile, no plugin."""
  path = tmp_path / "step.txt.gz"
  with gzip.open(path, "wt") as f:
    f.write(_HLO)
  config = "experiments/siglip_shapes.py:batch=8"
  assert gpu_compile.main(["--config", config, "--gpu", "h100", "--from_hlo", str(path)]) == 0
  out = capsys.readouterr().out
  total = sum(k.seconds for k in kernel_estimate.kernels(_HLO, H100))
  assert f"{total * 1e3:.1f} ms per step, 12 kernels" in out
  assert gpu_compile.main(["--config", config, "--gpu", "h100",
                           "--from_hlo", str(tmp_path / "missing.txt")]) == 2
  assert "missing.txt" in capsys.readouterr().err


def test_shape_bytes():
  assert kernel_estimate.shape_bytes("bf16[3,5]") == 30
  assert kernel_estimate.shape_bytes("(f32[4], s32[], pred[8])") == 16 + 4 + 8


def test_target_config_describes_the_gpu():
  text = H100.target_config()
  assert f"core_count: {H100.sm_count}" in text
  assert f"device_memory_size: {H100.memory_bytes}" in text
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  assert "major: 9 minor: 0" in text


def test_a_matmul_compiled_for_the_h100():
  device = gpu_compile.compile_only_gpu(H100)
  assert device.platform == "gpu" and "H100" in device.device_kind
  sharding = jax.sharding.SingleDeviceSharding(device)
  shapes = [jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16, sharding=sharding),
            jax.ShapeDtypeStruct((1024, 2048), jnp.bfloat16, sharding=sharding)]
  compiled = jax.jit(lambda x, w: x @ w).lower(*shapes).compile()
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes == 2 * (512 * 1024 + 1024 * 2048)
  assert memory.output_size_in_bytes == 2 * 512 * 2048
  (matmul,) = [k for k in kernel_estimate.kernels(compiled.as_text(), H100) if k.kind == "matmul"]
  assert matmul.flops == 2 * 512 * 1024 * 2048


@pytest.fixture(scope="module")
def siglip_report(tmp_path_factory):
  """SigLIP B/16 cut to two blocks per tower (bf16, so cuDNN attention), batch 256, compiled
  for the H100. The widths and the batch are the real config's because XLA:GPU's layout
  choices depend on them: the batch-minor layouts below do not appear in tiny models."""
  config = train.load_config("experiments/siglip_b16.py:batch=256,rules=data_parallel",
                             ["remat_policy=none", "model.image.depth=2", "model.text.depth=2"])
  hlo = tmp_path_factory.mktemp("gpu") / "step.hlo.txt"
  report = gpu_compile.compile_train_step(config, H100, spec="siglip_b16", hlo_path=str(hlo))
  return report, hlo.read_text()


def test_siglip_step_compiles_for_the_h100_with_cudnn_attention(siglip_report):
  report, text = siglip_report
  assert report.fits and 0 < report.total_bytes < report.memory_bytes
  assert report.argument_bytes > 0 and report.temp_bytes > 0
  est = report.estimate
  # 2 image + 2 text blocks, each a cuDNN forward and backward call; the MAP head's single
  # probe query is not cuDNN's (odd length), so 8 and not 10.
  assert est["by_kind"]["attention"]["kernels"] == 8
  assert len(re.findall(r'custom_call_target="__cudnn\$fmha', text)) == 8
  assert 0 < est["estimated_mfu"] < 1 and est["estimated_step_seconds"] > 0
  assert report.model_flops > 0 and est["matmul_flops"] > 0
  # Outside the compile, attention is chosen for this machine again.
  assert attention.resolve("auto", jnp.bfloat16) == "einsum"


def test_siglip_step_keeps_the_batch_major(siglip_report):
  """No residual-stream activation laid out [tokens, width, batch]: with the position
  embeddings' gradient taken by a reduction over the batch, XLA:GPU chose that layout for every
  block and transposed around each matmul (layers.add_position_embedding)."""
  _, text = siglip_report
  entry = text[text.index("\nENTRY"):]
  arrays = re.findall(r"\b(?:bf16|f32)\[(\d+(?:,\d+)*)\]", entry)
  residual = [dims for dims in arrays if dims in ("256,196,768", "256,64,768")]
  batch_minor = [dims for dims in arrays if dims in ("196,768,256", "64,768,256")]
  assert residual and not batch_minor, batch_minor[:5]


def test_no_triton_tiling_falls_back_to_cublas_and_says_so(tmp_path, capsys):
  """Without autotuning XLA finds no Triton tiling for some matmuls (the CoCa decoder's, here
  at 128 x 17 tokens): the step is compiled with every matmul on cuBLAS, and the report says
  so instead of failing with XLA's INTERNAL error."""
  report_path, hlo_path = tmp_path / "report.json", tmp_path / "step.hlo.txt"
  assert gpu_compile.main(["--config", "experiments/coca_shapes.py:batch=128", "--gpu", "h100",
                           "--config.compute_dtype=bfloat16", "--json", str(report_path),
                           "--hlo", str(hlo_path)]) == 0
  captured = capsys.readouterr()
  assert "no Triton GEMM tiling" in captured.err
  assert "every matmul on cuBLAS" in captured.out
  report = json.loads(report_path.read_text())
  assert report["triton_gemm"] is False
  text = hlo_path.read_text()
  cublas_calls = len(re.findall(r'custom_call_target="__cublas', text))
  assert cublas_calls > 0 and "__triton_gemm" not in text
  assert report["estimate"]["by_kind"]["matmul"]["kernels"] == cublas_calls
  assert report["estimate"]["matmul_flops"] > 0


def test_missing_plugin_is_a_clear_error(tmp_path):
  """No CUDA plugin installed (PLUGIN_DIR empty, none importable): exit 2 and the make target
  that installs it. In a fresh process, since this one has the plugin registered."""
  code = ("import sys; from tools import gpu_compile as g; g.PLUGIN_DIR = sys.argv[1]; "
          "sys.exit(g.main(['--config', 'experiments/siglip_shapes.py', '--gpu', 'h100']))")
  ran = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert ran.returncode == 2, ran.stderr[-2000:]
  assert "make gpu-compile-deps" in ran.stderr and str(tmp_path) in ran.stderr


def test_unknown_gpu_is_a_clear_error(capsys):
  assert gpu_compile.main(["--config", "experiments/siglip_shapes.py", "--gpu", "h10"]) == 2
  assert "h100" in capsys.readouterr().err


def test_xla_options_parse_as_xla_flags_are_written():
  assert gpu_compile.parse_xla_options(
      ["xla_gpu_dot_merger_threshold_mb=0", "--xla_gpu_enable_cublaslt=true",
       "xla_gpu_cuda_data_dir=/opt/cuda"]) == {
           "xla_gpu_dot_merger_threshold_mb": 0, "xla_gpu_enable_cublaslt": True,
           "xla_gpu_cuda_data_dir": "/opt/cuda"}
  for bad in ("xla_gpu_enable_cublaslt", "enable_cublaslt=true"):
    with pytest.raises(gpu_compile.XlaOptionError, match="NAME=VALUE"):
      gpu_compile.parse_xla_options([bad])


def test_xla_options_reach_the_compile(capsys):
  """--xla options go to XLA's compile: one XLA lacks is refused there (had it not reached
  the compile, the step would compile and exit 0), and said so, exit 2."""
  assert gpu_compile.main(["--config", "experiments/siglip_shapes.py", "--gpu", "h100",
                           "--xla", "xla_gpu_enable_cublaslt=true",
                           "--xla", "xla_gpu_no_such_option=1"]) == 2
  err = capsys.readouterr().err
  assert "no such option" in err and "xla_gpu_no_such_option" in err


def test_the_gpu_scripts_xla_flags_are_options_xla_knows():
  """tools/gpu_benchmarks.sh runs some steps under extra XLA_FLAGS; a misspelt one would fail
  that run on a lent card. Each is given to a matmul's compile for the H100 here, where XLA
  refuses any name it lacks (test_xla_options_reach_the_compile)."""
  text = open(os.path.join(REPO, "tools", "gpu_benchmarks.sh"), encoding="utf-8").read()
  flags = re.findall(r'^XLA_FLAGS="\$\{XLA_FLAGS:-\} (--xla_\S+)"', text, re.MULTILINE)
  assert len(flags) >= 2, flags
  options = gpu_compile.parse_xla_options(flags)
  device = gpu_compile.compile_only_gpu(H100)
  shape = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16,
                               sharding=jax.sharding.SingleDeviceSharding(device))
  lowered = jax.jit(lambda x, w: x @ w).lower(shape, shape)
  for name, value in options.items():
    lowered.compile(compiler_options={name: value})


def test_pallas_attention_compiles_for_the_h100_and_counts_as_attention(tmp_path):
  """attention_impl=pallas: every attention of a one-block SigLIP B/16 step (image, text, MAP
  head) becomes vlpjax's three Triton kernels, none cuDNN's, and the estimate files them under
  attention with their matmul FLOPs."""
  config = train.load_config("experiments/siglip_b16.py:batch=64,rules=data_parallel",
                             ["remat_policy=none", "model.image.depth=1", "model.text.depth=1",
                              "attention_impl=pallas"])
  hlo = tmp_path / "step.hlo.txt"
  report = gpu_compile.compile_train_step(config, H100, spec="siglip_b16", hlo_path=str(hlo))
  text = hlo.read_text()
  assert "__cudnn$fmha" not in text
  names = re.findall(r'\bname = "(short_attention_\w+)"', text)
  assert sorted(set(names)) == sorted(short_attention.KERNEL_MATMULS)
  assert len(names) == 3 * 3  # fwd, dkdv, dq for the image block, the text block, the MAP head
  attention_kernels = [k for k in kernel_estimate.kernels(text, H100) if k.kind == "attention"]
  assert len(attention_kernels) == 9
  # The image block's forward: 2 matmuls of [196, 196, 64] per example and head.
  (image_fwd,) = [k for k in attention_kernels
                  if "img/encoder" in k.op_name and "short_attention_fwd" in k.op_name]
  assert image_fwd.flops == 2 * (2 * 64 * 12 * 196 * 196 * 64)
  assert report.estimate["by_kind"]["attention"]["kernels"] == 9


def test_pallas_layer_norm_backward_compiles_for_the_h100(tmp_path):
  """norm_impl=pallas: the backward of each encoder LayerNorm of a one-block SigLIP B/16 step
  (two per block, one final per tower) is vlpjax's Triton kernel, a reduction to the estimate
  that moves what it reads and writes: x, the output's and the residual's gradients, dx."""
  config = train.load_config("experiments/siglip_b16.py:batch=64,rules=data_parallel",
                             ["remat_policy=none", "model.image.depth=1", "model.text.depth=1",
                              "norm_impl=pallas"])
  hlo = tmp_path / "step.hlo.txt"
  gpu_compile.compile_train_step(config, H100, spec="siglip_b16", hlo_path=str(hlo))
  text = hlo.read_text()
  assert len(re.findall(r'\bname = "layer_norm_bwd"', text)) == 2 * 2 + 2
  kernels = [k for k in kernel_estimate.kernels(text, H100) if "layer_norm_bwd" in k.op_name]
  assert {k.kind for k in kernels} == {"reduction"}
  (image_ln1,) = [k for k in kernels if "img/encoder/layers_0/layer_norm1" in k.op_name]
  rows, width = 64 * 196, 768
  assert image_ln1.bytes >= 4 * rows * width * 2  # 4 bf16 [rows, width] arrays at least
