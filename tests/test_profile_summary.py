"""tools/profile_summary.py: op time by kind of work, from a jax.profiler trace and the HLO.

Real traces of XLA:CPU programs whose work is known (a matmul-bound step, an element-wise
one), GPU-shaped HLO and traces written by hand (no GPU here), and the benchmark's
`--profile` end to end, where the summary must fit inside the step it describes.
"""
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from jax.profiler import ProfileData

from tools import benchmark
from tools import profile_summary
from vlpjax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Post-optimisation HLO in the form XLA:GPU prints it (names, custom-call targets and fusion
# kinds as XLA emits them for a transformer step on an H100).
GPU_HLO = """\
HloModule jit_step, entry_computation_layout={(bf16[256,768]{1,0})->bf16[256,768]{1,0}}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%gemm_fusion_dot.1_computation (p0: bf16[256,768], p1: bf16[768,3072]) -> bf16[256,3072] {
  %p0 = bf16[256,768]{1,0} parameter(0)
  %p1 = bf16[768,3072]{1,0} parameter(1)
  ROOT %dot.7 = bf16[256,3072]{1,0} dot(bf16[256,768]{1,0} %p0, bf16[768,3072]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_reduce (q0: bf16[256,3072], q1: bf16[256,3072]) -> f32[3072] {
  %q0 = bf16[256,3072]{1,0} parameter(0)
  %q1 = bf16[256,3072]{1,0} parameter(1)
  %mul = bf16[256,3072]{1,0} multiply(bf16[256,3072]{1,0} %q0, bf16[256,3072]{1,0} %q1)
  %cvt = f32[256,3072]{1,0} convert(bf16[256,3072]{1,0} %mul)
  %zero = f32[] constant(0)
  ROOT %red = f32[3072]{0} reduce(f32[256,3072]{1,0} %cvt, f32[] %zero), dimensions={0}, to_apply=%region_add
}

%fused_gelu (r0: bf16[256,3072]) -> bf16[256,3072] {
  %r0 = bf16[256,3072]{1,0} parameter(0)
  ROOT %tanh.1 = bf16[256,3072]{1,0} tanh(bf16[256,3072]{1,0} %r0)
}

%fused_transpose (t0: bf16[256,12,64]) -> bf16[12,256,64] {
  %t0 = bf16[256,12,64]{2,1,0} parameter(0)
  ROOT %transpose.3 = bf16[12,256,64]{2,1,0} transpose(bf16[256,12,64]{2,1,0} %t0), dimensions={1,0,2}
}

%async_wrapped (a0: f32[3072], /*index=1*/a1: f32[]) -> f32[3072] {
  %a0 = f32[3072]{0} parameter(0)
  ROOT %ar = f32[3072]{0} all-reduce(f32[3072]{0} %a0), replica_groups={}, to_apply=%region_add
}

%body (w: (s32[], bf16[256,768])) -> (s32[], bf16[256,768]) {
  %w = (s32[], bf16[256,768]{1,0}) parameter(0)
  ROOT %w2 = (s32[], bf16[256,768]{1,0}) copy((s32[], bf16[256,768]{1,0}) %w)
}

ENTRY %main (x: bf16[256,768]) -> bf16[256,768] {
  %x = bf16[256,768]{1,0} parameter(0)
  %w1 = bf16[768,3072]{1,0} constant({...})
  %gemm_fusion_dot.1 = bf16[256,3072]{1,0} fusion(bf16[256,768]{1,0} %x, bf16[768,3072]{1,0} %w1), kind=kCustom, calls=%gemm_fusion_dot.1_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %cublas-gemm.2 = (bf16[256,768]{1,0}, s8[4194304]{0}) custom-call(bf16[256,3072]{1,0} %gemm_fusion_dot.1, bf16[3072,768]{1,0} %w1), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1}}
  %fmha = (bf16[12,256,64]{2,1,0}, u8[0]{0}) custom-call(bf16[12,256,64]{2,1,0} %q, bf16[12,256,64]{2,1,0} %k, bf16[12,256,64]{2,1,0} %v), custom_call_target="__cudnn$fmhaSoftmax"
  %pallas_call.3 = bf16[256,196,12,64]{3,2,1,0} custom-call(bf16[256,196,12,64]{3,2,1,0} %q, bf16[256,196,12,64]{3,2,1,0} %k), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, grid_x = 256 : i32, ir = "ML\EFR\0D\01", name = "short_attention_dq", num_stages = 3 : i32, num_warps = 4 : i32}
  %pallas_call.4 = bf16[256,768]{1,0} custom-call(bf16[256,768]{1,0} %x), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, ir = "ML\EF", name = "some_kernel", num_warps = 4 : i32}
  %pallas_call.5 = (bf16[256,768]{1,0}, f32[4,768]{1,0}, f32[4,768]{1,0}) custom-call(bf16[256,768]{1,0} %x), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = false, ir = "ML\EF", name = "layer_norm_bwd", num_warps = 8 : i32}
  %conv = (bf16[256,768,14,14]{3,2,1,0}, u8[0]{0}) custom-call(bf16[256,3,224,224]{3,2,1,0} %img, bf16[768,3,16,16]{3,2,1,0} %kern), custom_call_target="__cudnn$convForward"
  %input_reduce_fusion = f32[3072]{0} fusion(bf16[256,3072]{1,0} %gemm_fusion_dot.1, bf16[256,3072]{1,0} %gemm_fusion_dot.1), kind=kInput, calls=%fused_reduce
  %loop_tanh_fusion = bf16[256,3072]{1,0} fusion(bf16[256,3072]{1,0} %gemm_fusion_dot.1), kind=kLoop, calls=%fused_gelu
  %loop_transpose_fusion = bf16[12,256,64]{2,1,0} fusion(bf16[256,12,64]{2,1,0} %y), kind=kLoop, calls=%fused_transpose
  %all-reduce-start = f32[3072]{0} all-reduce-start(f32[3072]{0} %input_reduce_fusion), replica_groups={}, to_apply=%region_add
  %async-start.1 = ((f32[3072]{0}), f32[3072]{0}) async-start(f32[3072]{0} %input_reduce_fusion), calls=%async_wrapped
  %while.1 = (s32[], bf16[256,768]{1,0}) while((s32[], bf16[256,768]{1,0}) %t), condition=%cond, body=%body
  ROOT %copy.1 = bf16[256,768]{1,0} copy(bf16[256,768]{1,0} %x)
}
"""

GPU_KINDS = {
    "gemm_fusion_dot.1": "matmul", "cublas-gemm.2": "matmul", "fmha": "attention",
    "conv": "convolution", "input_reduce_fusion": "reduction",
    "loop_tanh_fusion": "element-wise", "loop_transpose_fusion": "layout",
    "all-reduce-start": "collective", "while.1": "control", "async-start.1": "control",
    "copy.1": "layout",
    # Triton kernels written with Pallas, by their names: vlpjax's attention and LayerNorm
    # backward, and one unknown.
    "pallas_call.3": "attention", "pallas_call.5": "reduction", "pallas_call.4": "other",
}


def test_gpu_hlo_ops_are_classified_by_what_they_compute():
  instructions, computations = profile_summary.parse_hlo(GPU_HLO)
  assert profile_summary.module_name(GPU_HLO) == "jit_step"
  got = {name: profile_summary.classify(instructions[name], instructions, computations)
         for name in GPU_KINDS}
  assert got == GPU_KINDS
  # Shapes without layouts, tuples whole.
  assert instructions["cublas-gemm.2"].shape == "(bf16[256,768], s8[4194304])"
  assert instructions["cublas-gemm.2"].target == "__cublas$gemm"
  assert instructions["input_reduce_fusion"].calls == "fused_reduce"
  assert instructions["pallas_call.3"].kernel == "short_attention_dq"
  assert instructions["fmha"].kernel == ""


def _stream_event(op, module, offset_us, duration_us):
  return (f"events {{ metadata_id: 1 offset_ps: {int(offset_us * 1e6)} "
          f"duration_ps: {int(duration_us * 1e6)} "
          f'stats {{ metadata_id: 1 str_value: "{op}" }} '
          f'stats {{ metadata_id: 2 str_value: "{module}" }} }}')


def _write_gpu_trace(directory, lines):
  """An XSpace with one GPU plane holding `lines` ({line name: [(op, module, start, dur)]})."""
  text = 'planes { id: 1 name: "/device:GPU:0" '
  for i, (name, events) in enumerate(lines.items()):
    text += f'lines {{ id: {i + 1} name: "{name}" timestamp_ns: 1000 '
    text += " ".join(_stream_event(*event) for event in events) + " } "
  text += ('event_metadata { key: 1 value { id: 1 name: "kernel" } } '
           'stat_metadata { key: 1 value { id: 1 name: "hlo_op" } } '
           'stat_metadata { key: 2 value { id: 2 name: "hlo_module" } } }')
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "gpu.xplane.pb"), "wb") as f:
    f.write(ProfileData.text_proto_to_serialized_xspace(text))


def test_gpu_trace_counts_stream_kernels_once_per_step(tmp_path):
  # Two steps on one stream: per step a 60 us GEMM, a 30 us cuDNN attention, a 10 us
  # reduction, with a 20 us gap; a second stream runs a 5 us all-reduce and a 3 us one wrapped
  # in an async op beside the GEMM. The derived "XLA Ops" line repeats the kernels (not to be
  # counted again), and a kernel of another module (a metrics fetch) is not the step's.
  stream, other, ops_line = [], [], []
  for base in (0, 200):
    stream += [("gemm_fusion_dot.1", "jit_step", base, 60),
               ("fmha", "jit_step", base + 60, 30),
               ("input_reduce_fusion", "jit_step", base + 110, 10)]
    other += [("all-reduce-start", "jit_step", base + 10, 5),
              ("async-start.1", "jit_step", base + 20, 3),
              ("add.3", "jit_fetch", base + 150, 40)]
    ops_line += stream[-3:]
  _write_gpu_trace(str(tmp_path), {"Stream #13(Compute)": stream,
                                   "Stream #20(Collectives)": other, "XLA Ops": ops_line})
  summary = profile_summary.summarize(str(tmp_path), [GPU_HLO], steps=2)
  us = 1e-6
  assert summary["op_seconds"] == pytest.approx(108 * us)
  assert summary["busy_seconds"] == pytest.approx(100 * us)  # the collective overlaps the GEMM
  assert summary["span_seconds"] == pytest.approx((200 + 120) / 2 * us)  # first start, last end
  assert summary["timelines"] == 2
  kinds = summary["by_kind"]
  assert kinds["matmul"]["seconds"] == pytest.approx(60 * us)
  assert kinds["attention"]["seconds"] == pytest.approx(30 * us)
  assert kinds["reduction"]["seconds"] == pytest.approx(10 * us)
  assert kinds["collective"]["seconds"] == pytest.approx(8 * us)
  assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0)
  assert [op["op"] for op in summary["top_ops"]] == [
      "gemm_fusion_dot.1", "fmha", "input_reduce_fusion", "all-reduce-start", "async-start.1"]
  assert summary["ops_not_in_hlo"] == []


def test_a_kernel_the_hlo_does_not_name_is_listed_not_guessed(tmp_path):
  _write_gpu_trace(str(tmp_path), {"Stream #7": [("gemm_fusion_dot.1", "jit_step", 0, 8),
                                                 ("mystery.9", "jit_step", 8, 2)]})
  summary = profile_summary.summarize(str(tmp_path), [GPU_HLO], steps=1)
  assert summary["ops_not_in_hlo"] == ["mystery.9"]
  assert summary["by_kind"]["other"]["seconds"] == pytest.approx(2e-6)


def _traced(fn, args, directory, calls):
  compiled = jax.jit(fn).lower(*args).compile()
  jitted = jax.jit(fn)
  jax.block_until_ready(jitted(*args))  # compiled outside the trace
  with jax.profiler.trace(directory):
    start = time.perf_counter()
    for _ in range(calls):
      jax.block_until_ready(jitted(*args))
    wall = time.perf_counter() - start
  return compiled.as_text(), wall


def test_cpu_trace_of_a_matmul_bound_and_an_elementwise_bound_program(tmp_path):
  a = jnp.ones((768, 768), jnp.float32) / 768

  def matmul_bound(x):  # a chain of matmuls, in a loop (the loop's own thunk spans them)
    return jax.lax.fori_loop(0, 4, lambda _, y: jnp.tanh(y @ x), x)

  def elementwise_bound(x):
    return jnp.tanh(jnp.exp(x) * 3 + jnp.sin(x)) + jnp.cos(x * x)

  big = jnp.ones((2048, 2048), jnp.float32)
  for fn, args, main in ((matmul_bound, (a,), "matmul"),
                         (elementwise_bound, (big,), "element-wise")):
    directory = str(tmp_path / fn.__name__)
    hlo, wall = _traced(fn, args, directory, calls=3)
    summary = profile_summary.summarize(directory, [hlo], steps=3)
    assert summary["ops_not_in_hlo"] == []
    kinds = summary["by_kind"]
    assert max(kinds, key=lambda k: kinds[k]["seconds"]) == main, kinds
    assert kinds[main]["share"] > 0.5
    # The op time fits in the time the calls took: busy (the union over the threads) within
    # the wall, summed op time within the wall times the threads that ran ops, and the loop's
    # thunk, which spans its body's ops, is not counted beside them.
    assert 0 < summary["busy_seconds"] <= summary["span_seconds"] <= wall / 3
    assert summary["busy_seconds"] <= summary["op_seconds"]
    assert summary["op_seconds"] <= summary["timelines"] * wall / 3
    assert all(op["kind"] != "control" for op in summary["top_ops"])
  assert kinds["matmul"]["ops"] == 0  # the element-wise program has none


def test_summary_of_an_empty_trace_says_what_is_missing(tmp_path, capsys):
  hlo = tmp_path / "step.hlo.txt"
  hlo.write_text(GPU_HLO)
  assert profile_summary.main([str(tmp_path), "--hlo", str(hlo), "--steps", "1"]) == 2
  assert "no *.xplane.pb" in capsys.readouterr().err
  _write_gpu_trace(str(tmp_path), {"Stream #1": [("add.3", "jit_fetch", 0, 4)]})
  assert profile_summary.main([str(tmp_path), "--hlo", str(hlo), "--steps", "1"]) == 2
  err = capsys.readouterr().err
  assert "no op of module 'jit_step'" in err and "jit_fetch (1)" in err


def _profiled_benchmark(out, trace, *flags):
  """The train benchmark's JSON for a 1-layer demo model: 1 warm-up, 1 timed, synced, traced."""
  code = benchmark.main(["--out", str(out), "train", "--config",
                         os.path.join(REPO, "experiments", "siglip_shapes.py") + ":batch=8",
                         "--steps", "1", "--warmup", "1", "--sync", "--peak_flops", "1e11",
                         "--profile", str(trace), "--config.model.image.depth=1",
                         "--config.model.text.depth=1", *flags])
  assert code == 0
  return json.loads(out.read_text())


def test_benchmark_profile_describes_the_program_that_ran(tmp_path):
  # Three steps per call (the scanned program, compiled apart from the single step): the
  # summary reads that program's HLO, names every op the trace holds, and fits in the step.
  out, trace = tmp_path / "train.json", tmp_path / "trace"
  result = _profiled_benchmark(out, trace, "--profile_steps", "1", "--config.steps_per_call=3")
  profile = result["profile"]
  # Traced after the timed call (1 warm-up, 1 timed, 1 traced; sync).
  assert result["steps_run"] == 3 * 3 and len(result["step_seconds_all"]) == 1
  assert profile["steps"] == 3 and profile["ops_not_in_hlo"] == []
  assert os.path.exists(profile["hlo"])
  assert profile["module"] in open(profile["hlo"], encoding="utf-8").read()
  assert "while" in open(profile["hlo"], encoding="utf-8").read()  # the scan of 3 steps
  assert profile["by_kind"]["matmul"]["seconds"] > 0
  assert profile["by_kind"]["reduction"]["seconds"] > 0
  [traced] = profile["traced_step_seconds"]
  assert 0 < profile["busy_seconds"] <= profile["span_seconds"] <= traced


def test_a_trace_the_summary_cannot_read_leaves_the_timings_standing(tmp_path, monkeypatch):
  # Minutes of timing on a lent machine must not be lost to a trace laid out otherwise.
  monkeypatch.setattr(profile_summary, "op_events", lambda profile, module: [])
  out = tmp_path / "train.json"
  result = _profiled_benchmark(out, tmp_path / "trace", "--config.steps_per_call=1")
  assert "no op of module" in result["profile"]["error"]
  assert result["step_seconds"] > 0


def test_the_gpu_script_runs_configs_that_load():
  # tools/gpu_benchmarks.sh is run on a lent GPU only; here: it parses, and every config it
  # names loads with its overrides (a renamed key would otherwise cost a lease to find).
  script = os.path.join(REPO, "tools", "gpu_benchmarks.sh")
  subprocess.run(["bash", "-n", script], check=True)
  text = open(script, encoding="utf-8").read().replace("\\\n", " ")
  runs = re.findall(r"^(?:XLA_FLAGS=.*?\s+)?run (\S+) (\S+)(.*?)\|\|", text, re.MULTILINE)
  assert len(runs) >= 4
  for _, config, flags in runs:
    overrides = [f[len("--config."):] for f in flags.split() if f.startswith("--config.")]
    loaded = train.load_config(os.path.join(REPO, config), overrides)
    assert loaded.remat_policy == "none"


def test_a_cpu_trace_under_libtpu_is_flagged():
  # libtpu's profiler joins a trace whenever its backend started (JAX_PLATFORMS unset) and
  # slows CPU steps by half; the benchmark warns then, and not when JAX_PLATFORMS=cpu.
  code = "from tools import bench_train; print(bench_train.libtpu_profiler_active())"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  answers = [subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True, env=extra).stdout.split()[-1]
             for extra in (env, {**env, "JAX_PLATFORMS": "cpu"})]
  assert answers == ["True", "False"]
