#!/usr/bin/env bash
# The accelerator figures of docs/benchmarks.md ("On an accelerator"), as one prepared run for
# a machine with one NVIDIA GPU and JAX installed (a lent H100 or H200, a cloud VM):
#
#   bash tools/gpu_benchmarks.sh [OUT_DIR]        # default: $OUT, else ./gpu_benchmarks
#
# Why one script: such a machine is often lent for minutes, and each start costs some of them.
# Everything is run in one go and comes back as a few files: the device line (nvidia-smi), and
# per run the benchmark's JSON (with `profile`: the step's op time by kind of work, read from a
# jax.profiler trace by tools/profile_summary.py) and its log. About 10 minutes on an H100.
#
# Packages: the train benchmark needs JAX (with its CUDA plugin), Flax, optax, Orbax and
# ml_collections; not TensorFlow or seqio. Where one is missing and there is no package index,
# put its wheels in ./.whl (ignored by git) and they are installed first, e.g. from a machine
# with pip:  python -m pip download --no-deps -d .whl ml_collections==1.1.0
set -u
OUT_DIR="${1:-${OUT:-gpu_benchmarks}}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/vlpjax_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/vlpjax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv \
  >"$OUT_DIR/device.csv" 2>&1
"$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())" >>"$OUT_DIR/device.csv" 2>&1

# name | config | flags. Traced runs keep their trace in /tmp (too large to bring back). XLA
# dumps the step it compiled (autotuned, as it ran); its optimized HLO comes back gzipped, for
# `python -m tools.gpu_compile --config C --gpu h100 --from_hlo $name.hlo.txt.gz`: the estimate
# by kind of kernel beside this run's measured `profile`, to set gpu_compile's rates from.
run() {
  local name="$1" config="$2"; shift 2
  local dump="/tmp/vlpjax_hlo_$name"
  echo "== $name" >&2
  XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$dump --xla_dump_hlo_module_re=.*train_step.*" \
  "$PYTHON" -m tools.benchmark --out "$OUT_DIR/$name.json" train --config "$config" \
    --steps 10 --warmup 3 --profile "/tmp/vlpjax_trace_$name" "$@" \
    >/dev/null 2>"$OUT_DIR/$name.log"  # the JSON is in --out
  local rc=$?
  local hlo
  hlo=$(ls -S "$dump"/*train_step*after_optimizations.txt 2>/dev/null | head -n 1)
  [ -n "$hlo" ] && gzip -c "$hlo" >"$OUT_DIR/$name.hlo.txt.gz"
  tail -n 25 "$OUT_DIR/$name.log" >&2
  return $rc
}
status=0
# In order of what the figures decide, so a run cut short still brings back the first ones: the
# target's step, the larger batch, Pallas attention, cuBLAS, the Pallas LayerNorm backward, the
# dot merger, CoCa (measured on 2026-11-24; the one a 10-minute call may cut).
run siglip_b16_b256 experiments/siglip_b16.py:batch=256,rules=data_parallel \
  --config.remat_policy=none || status=1
run siglip_b16_b512 experiments/siglip_b16.py:batch=512,rules=data_parallel \
  --config.remat_policy=none || status=1
# vlpjax's Pallas attention for keys that fit one tile (vlpjax/models/short_attention.py)
# instead of cuDNN's: never timed on a card; "auto" takes it only if this run is faster.
run siglip_b16_b256_pallas_attention experiments/siglip_b16.py:batch=256,rules=data_parallel \
  --config.remat_policy=none --config.attention_impl=pallas || status=1
# Every matmul on cuBLAS(Lt) instead of Triton fusions the autotuner may hand to cuBLAS: only
# then does XLA fuse fc1's GELU (GELU_AUX) and the residual adds (beta = 1) into the matmuls;
# 4.7 ms less in the deviceless estimate, but the 2026-11-24 card ran an older step 2.5-5 ms
# slower this way (docs/benchmarks.md). Measured here to decide whether the trainer should set it.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
run siglip_b16_b256_cublas experiments/siglip_b16.py:batch=256,rules=data_parallel \
  --config.remat_policy=none || status=1
# vlpjax's Pallas LayerNorm backward (vlpjax/models/layer_norm.py): one kernel per LayerNorm
# where XLA makes three passes; ~1 ms less in the deviceless estimate, never timed on a card.
run siglip_b16_b256_pallas_norm experiments/siglip_b16.py:batch=256,rules=data_parallel \
  --config.remat_policy=none --config.norm_impl=pallas || status=1
# The same step with XLA's dot merger off: it joins the text tower's q/k/v matmuls (which share
# their input) into one and then copies q, k and v out for cuDNN; 1.1 ms less in the deviceless
# estimate (docs/benchmarks.md).
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_dot_merger_threshold_mb=0" \
run siglip_b16_b256_no_dot_merger experiments/siglip_b16.py:batch=256,rules=data_parallel \
  --config.remat_policy=none || status=1
run coca_b16_b128 experiments/coca_b16.py:batch=128,rules=data_parallel \
  --config.remat_policy=none || status=1
exit $status
