"""Scaled dot-product attention with a choice of implementation (`config.attention_impl`).

- "einsum": two einsums around an f32 softmax, written here. Works everywhere; on CPU it is the
  fastest (with the heads-first [B, heads, L, kv] layout the batched matmuls need no transposes).
- "xla": `jax.nn.dot_product_attention(implementation="xla")`, JAX's own reference path
  ([B, L, heads, kv] layout).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused (flash)
  attention: GPU only, bf16/fp16 only; never materialises the [L, L] logits in HBM. Attention
  whose shapes cuDNN refuses (`cudnn_takes`: the MAP head's single probe query) runs "xla".
- "pallas": `short_attention`, a Pallas (Triton) kernel for sequences whose keys fit one tile
  (at most 256, no mask): GPU only, bf16/fp16 only; attention it does not take runs "cudnn"
  (or "xla", as above). Not yet timed on a GPU against cuDNN, so "auto" does not pick it.
- "auto" (the default): "cudnn" on GPU when the compute dtype allows it, "einsum" elsewhere.
  TPUs get "einsum" too: XLA:TPU fuses the softmax into the matmuls itself.

Every implementation takes q either already scaled by 1/sqrt(head_dim) (cheaper than scaling
the [Lq, Lk] logits when Lk > head_dim; the encoders do this) or with a `logits_scale` to apply
to the logits in f32 (the LM decoder, as Hugging Face Llama/Gemma do, so imported LMs keep their
numerics), a boolean `mask` broadcastable to [B, heads, Lq, Lk]
(True = may attend), and computes the logits and softmax in f32. A query whose keys are all
masked gets uniform weights (a large finite negative, not -inf), never NaN.
"""
import contextlib
import functools
from typing import Any, Dict, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vlpjax.models import pallas_util
from vlpjax.models import short_attention
from vlpjax.registry import unknown_name_message

Array = jax.Array

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "pallas")
# Logical names of [B, L, heads, kv] activations, the layout of the fused implementations.
ACT_HEADS = ("act_batch", "act_length", "act_heads", "act_kv")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Large but finite: a row whose keys are all masked (padding) gets uniform weights instead of
# NaN; exp(mask - max) underflows to exactly 0 whenever some key is visible.
MASK_VALUE = float(np.finfo(np.float32).min)

# The device the model is traced for when it is not the one JAX runs on (`compile_target`).
_TARGET: Dict[str, Any] = {}


@contextlib.contextmanager
def compile_target(backend: str, compute_capability: Optional[float] = None) -> Iterator[None]:
  """Within: choose implementations for `backend` (and a GPU's compute capability), not for
  the machine tracing. For compiling ahead of time for a device this machine lacks
  (tools/gpu_compile.py traces a GPU's step on a CPU-only machine).

  JAX caches traces by function and argument types, not by this setting: trace a new function
  (a freshly built step) within it, or a function traced before may come back as it was."""
  saved = dict(_TARGET)
  _TARGET.update(backend=backend, compute_capability=compute_capability)
  try:
    yield
  finally:
    _TARGET.clear()
    _TARGET.update(saved)


def target_backend() -> str:
  """The backend the model is traced for: `compile_target`'s, else JAX's."""
  return _TARGET.get("backend") or jax.default_backend()


def resolve(impl: str, dtype: Any, backend: Optional[str] = None) -> str:
  """The implementation `impl` names for compute `dtype` on `backend` (default: JAX's).

  Fails fast, before anything is traced, when the choice cannot run here.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(unknown_name_message("attention implementation (config.attention_impl)",
                                          impl, IMPLEMENTATIONS))
  backend = backend or target_backend()
  cudnn_dtype = jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]
  if impl == "auto":
    return "cudnn" if backend == "gpu" and cudnn_dtype else "einsum"
  # Pallas' interpreter runs the "pallas" kernels anywhere, in any dtype (tests on CPU).
  if impl == "cudnn" or (impl == "pallas" and not pallas_util.interpreting()):
    if backend != "gpu":
      raise ValueError(f"attention_impl={impl!r} needs a GPU, but JAX's backend is {backend!r}; "
                       "use 'auto' (picks cuDNN on GPUs) or 'einsum'.")
    if not cudnn_dtype:
      raise ValueError(f"attention_impl={impl!r} needs compute_dtype bfloat16 or float16, not "
                       f"{jnp.dtype(dtype).name}; use 'auto' or 'einsum' for {jnp.dtype(dtype).name}.")
  return impl


def uses_heads_first(impl: str, dtype: Any) -> bool:
  """Whether `impl` wants q/k/v as [B, heads, L, kv] (einsum) rather than [B, L, heads, kv]."""
  return resolve(impl, dtype) == "einsum"


def cudnn_takes(q_len: int, kv_len: int, head_dim: int, backend: Optional[str] = None) -> bool:
  """Whether cuDNN's fused attention trains on these shapes.

  Its training path takes even sequence lengths only: JAX (0.10, 0.11) checks every call as if
  a bias were given, and cuDNN needs even lengths with one. Head dims: multiples of 8, at most
  256 on Hopper and later, 128 before.
  """
  backend = backend or target_backend()
  max_head_dim = 128
  if backend == "gpu":
    capability = (_TARGET.get("compute_capability") or
                  getattr(jax.devices()[0], "compute_capability", "0"))
    max_head_dim = 256 if float(capability) >= 9.0 else 128
  return q_len % 2 == 0 and kv_len % 2 == 0 and head_dim % 8 == 0 and head_dim <= max_head_dim


def attend(q: Array, k: Array, v: Array, mask: Optional[Array], *, impl: str, dtype: Any,
           heads_first: bool, logits_scale: Optional[float] = None) -> Array:
  """softmax(q k^T + mask) v over every head, in the layout of the inputs.

  Args:
    q: [B, heads, Lq, kv] if `heads_first` else [B, Lq, heads, kv], already scaled.
    k, v: likewise with Lk and `kv_heads` heads; `heads` must be a multiple of `kv_heads`
      (grouped-query attention: kv head j serves query heads j*g .. j*g+g-1, HF's repeat_kv).
    mask: boolean, broadcastable to [B, heads, Lq, Lk]; None = attend everywhere.
    impl: a name from IMPLEMENTATIONS.
    dtype: the compute dtype (of the weights multiplying v and of the result).
    heads_first: the layout of q, k, v and of the result; the fused implementations need
      [B, L, heads, kv], so `heads_first=True` only goes with "einsum".
    logits_scale: multiplies the f32 logits; None = q is already scaled.

  Returns:
    The attended values, shaped like q, in `dtype`.
  """
  impl = resolve(impl, dtype)
  if heads_first and impl != "einsum":
    raise ValueError(f"attention_impl={impl!r} takes [B, L, heads, kv] inputs, not heads-first.")
  head_axis = 1 if heads_first else 2
  groups = q.shape[head_axis] // k.shape[head_axis]
  if impl == "pallas" and not short_attention.takes(q.shape[1], k.shape[1], q.shape[-1],
                                                     q.shape[2], k.shape[2], mask is not None):
    impl = "cudnn" if not pallas_util.interpreting() else "xla"
  if impl == "cudnn" and not cudnn_takes(q.shape[1], k.shape[1], q.shape[-1]):
    impl = "xla"  # Same layout and numerics, without the fused kernel.
  if impl == "einsum":
    if groups > 1:
      k = jnp.repeat(k, groups, axis=head_axis)
      v = jnp.repeat(v, groups, axis=head_axis)
    return _einsum_attention(q, k, v, mask, dtype, heads_first, logits_scale)
  if mask is not None:
    mask = jnp.broadcast_to(mask, mask.shape[:-2] + (q.shape[1], k.shape[1]))
  # The fused paths take grouped k/v as they are, and scale the logits themselves.
  scale = 1.0 if logits_scale is None else logits_scale
  if impl == "pallas":
    return _per_shard(functools.partial(short_attention.attention, logits_scale=scale))(
        q.astype(dtype), k.astype(dtype), v.astype(dtype))
  out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                     mask=mask, scale=scale, implementation=impl)
  return out.astype(dtype)


def _per_shard(kernel):
  """`kernel` (q, k, v -> out, all [B, L, heads, kv]) run on each device's batch and heads.

  A Pallas call has no rule for XLA's SPMD partitioner, which would gather its operands whole
  onto every device; under a mesh it runs in `shard_map` instead, split as the logical rules
  split the batch and the heads, with the sequence and head dims whole (gathered first if a
  rule shards them). Without a mesh: `kernel` itself.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel
  batch, _, heads, _ = nn.logical_to_mesh_axes(ACT_HEADS)
  spec = jax.sharding.PartitionSpec(batch, None, heads, None)
  # check_vma off: a Pallas call's outputs carry no record of which mesh axes they vary over.
  return jax.shard_map(kernel, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)


def _einsum_attention(q, k, v, mask, dtype, heads_first: bool, logits_scale) -> Array:
  # The backward pass is built once per (dtype, layout, scale): the scale must be a Python
  # number (hashable), as the signature of `attend` says.
  scale = None if logits_scale is None else float(logits_scale)
  return _einsum_attention_vjp(dtype, heads_first, scale)(q, k, v, mask)


@functools.lru_cache(maxsize=None)
def _einsum_attention_vjp(dtype, heads_first: bool, logits_scale):
  """The einsum attention as a function of (q, k, v, mask) with a hand-written backward pass.

  Why not autodiff: the backward here keeps only the f32 weights between the passes (autodiff
  kept more of the [B, heads, Lq, Lk] intermediates: 1.6 GB less temporary memory in a SigLIP
  B/16 step at batch 32), and its softmax gradient, `w * (dw - sum(dw * w))`, is a separate
  element-wise pass rather than folded into the `dO v^T` matmul, which XLA:CPU then ran at a
  third of that matmul's speed. One layer's attention fwd+bwd went from 99 to 89 ms on 2 CPU
  cores. The arithmetic is the textbook softmax-attention gradient; tests/test_attention.py
  checks it against JAX's own implementation.
  """
  q_spec, k_spec = ("bhqd", "bhkd") if heads_first else ("bqhd", "bkhd")

  def forward(q, k, v, mask):
    # f32 accumulation and softmax: bf16 logits lose the small differences that decide where
    # attention goes.
    logits = jnp.einsum(f"{q_spec},{k_spec}->bhqk", q, k, preferred_element_type=jnp.float32)
    if logits_scale is not None:
      logits = logits * logits_scale
    if mask is not None:
      logits = jnp.where(mask, logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(f"bhqk,{k_spec}->{q_spec}", weights.astype(dtype), v.astype(dtype))
    return out, (q, k, v, mask, weights)

  def backward(residuals, d_out):
    q, k, v, mask, weights = residuals
    d_v = jnp.einsum(f"bhqk,{q_spec}->{k_spec}", weights.astype(dtype), d_out.astype(dtype))
    d_weights = jnp.einsum(f"{q_spec},{k_spec}->bhqk", d_out, v.astype(dtype),
                           preferred_element_type=jnp.float32)
    # Softmax gradient; masked logits were constants (jnp.where), so they get none.
    d_logits = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
    if mask is not None:
      d_logits = jnp.where(mask, d_logits, 0.0)
    if logits_scale is not None:
      d_logits = d_logits * logits_scale
    d_logits = d_logits.astype(k.dtype)
    d_q = jnp.einsum(f"bhqk,{k_spec}->{q_spec}", d_logits, k, preferred_element_type=jnp.float32)
    d_k = jnp.einsum(f"bhqk,{q_spec}->{k_spec}", d_logits, q, preferred_element_type=jnp.float32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None

  @jax.custom_vjp
  def attend_einsum(q, k, v, mask):
    return forward(q, k, v, mask)[0]

  attend_einsum.defvjp(forward, backward)
  return attend_einsum
