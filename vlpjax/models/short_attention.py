"""Fused attention for short sequences on GPUs: all of a head's keys in one tile (Pallas, Triton).

Why: on the ViT's 196-token and the text tower's 64-token sequences cuDNN's fused attention ran at
about 10% of the H100's bf16 peak (13.7 ms of a 101.9 ms SigLIP B/16 step, 2026-11-24,
docs/benchmarks.md). Flash attention is built for sequences longer than a tile: it walks the keys
tile by tile and rescales a running softmax. When every key fits one tile (at most MAX_KV_LEN),
none of that is needed: one program per (batch, block of queries, head) loads the queries and
all keys and values, takes the softmax of whole rows and writes the output, and the [Lq, Lk]
logits never reach memory. The backward pass is the flash-attention one, in two kernels: per
block of keys (dK, dV, looping over the queries) and per block of queries (dQ).

Not measured on a GPU yet: `attention_impl="pallas"` picks it, and "auto" stays with cuDNN until
tools/gpu_benchmarks.sh has timed both on a card. `interpret()` (`pallas_util`) runs the kernels
through Pallas' interpreter on any backend, for tests on CPU.

Shapes: q [B, Lq, heads, head_dim], k and v [B, Lk, heads, head_dim] (cuDNN's BTNH layout), no
mask, as many key heads as query heads (`takes`); padding up to the tiles is masked in the
kernels, never copied.
"""
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vlpjax.models import pallas_util

Array = jax.Array

MAX_KV_LEN = 256          # keys per (batch, head): one tile of [MAX_KV_LEN, head_dim]
HEAD_DIMS = (16, 32, 64, 128)  # Triton's tiles are powers of two, and its dots need >= 16
BLOCK_Q = 64              # queries per program (forward, dQ), at most
BLOCK_KV = 64             # keys per program (dK, dV)
# A program's [queries, keys] f32 tiles (logits, weights, their gradients) stay in registers:
# at most this many elements each, 64 registers a thread at NUM_WARPS warps (as the Triton
# flash-attention tutorial's 128 x 64 tiles). Not tuned on a card yet.
TILE_ELEMENTS = 8192
NUM_WARPS = 4
# [Lq, Lk, head_dim] matmuls each kernel runs (per batch and head), for FLOP counts
# (tools/kernel_estimate.py): q k^T and w v forward; the backward recomputes q k^T in both of
# its kernels.
KERNEL_MATMULS = {"short_attention_fwd": 2, "short_attention_dkdv": 4, "short_attention_dq": 3}

def takes(q_len: int, kv_len: int, head_dim: int, heads: int, kv_heads: int,
          masked: bool) -> bool:
  """Whether this kernel computes the attention of these shapes."""
  return (not masked and heads == kv_heads and 1 <= kv_len <= MAX_KV_LEN and q_len >= 1
          and head_dim in HEAD_DIMS)


def _tile(n: int, cap: int) -> int:
  """A power-of-two tile of at least 16 (Triton's smallest dot) covering `n`, at most `cap`."""
  return max(16, min(cap, pl.next_power_of_2(n)))


def _all_keys_tiles(q_len: int, kv_len: int) -> Tuple[int, int]:
  """(queries per program, key tile) for programs that hold every key (forward, dQ): the
  [queries, keys] tiles stay within TILE_ELEMENTS."""
  kv_tile = _tile(kv_len, MAX_KV_LEN)
  return _tile(q_len, min(BLOCK_Q, TILE_ELEMENTS // kv_tile)), kv_tile


def _call(kernel, name: str, grid, in_specs, out_specs, out_shape):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS),
      interpret=pallas_util.interpreting(), name=name)


def _rows(ref, start, size: int, valid: int):
  """Rows start..start+size of a [rows, head_dim] ref; those at or past `valid` read as 0."""
  index = start + jnp.arange(size)
  return plgpu.load(ref.at[pl.ds(start, size)], mask=(index < valid)[:, None], other=0.)


# -- forward -------------------------------------------------------------------------------

def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, q_len, kv_len, scale):
  block_q, kv_tile = q_ref.shape[0], k_ref.shape[0]
  start = pl.program_id(1) * block_q
  q = _rows(q_ref, 0, block_q, q_len - start)
  k = _rows(k_ref, 0, kv_tile, kv_len)
  v = _rows(v_ref, 0, kv_tile, kv_len)
  logits = plgpu.dot(q, k, trans_b=True) * scale                   # f32 [block_q, kv_tile]
  logits = jnp.where((jnp.arange(kv_tile) < kv_len)[None, :], logits, -jnp.inf)
  top = jnp.max(logits, axis=1)
  weights = jnp.exp(logits - top[:, None])
  total = jnp.sum(weights, axis=1)
  out = plgpu.dot(weights.astype(v.dtype), v) / total[:, None]
  rows = start + jnp.arange(block_q)
  plgpu.store(o_ref, out.astype(o_ref.dtype), mask=(rows < q_len)[:, None])
  plgpu.store(lse_ref, top + jnp.log(total), mask=rows < q_len)


def _forward(q, k, v, scale) -> Tuple[Array, Array]:
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  block_q, kv_tile = _all_keys_tiles(q_len, kv_len)
  q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda b, i, h: (b, i, h, 0))
  kv_all = pl.BlockSpec((None, kv_tile, None, head_dim), lambda b, i, h: (b, 0, h, 0))
  kernel = functools.partial(_forward_kernel, q_len=q_len, kv_len=kv_len, scale=scale)
  return _call(
      kernel, "short_attention_fwd", (batch, pl.cdiv(q_len, block_q), heads),
      [q_block, kv_all, kv_all],
      [q_block, pl.BlockSpec((None, None, block_q), lambda b, i, h: (b, h, i))],
      [jax.ShapeDtypeStruct(q.shape, q.dtype),
       jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)])(q, k, v)


# -- backward ------------------------------------------------------------------------------

def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, q_len,
                 kv_len, scale):
  """dK, dV of one block of keys, summed over every block of queries."""
  block_kv, q_tile = k_ref.shape[0], q_ref.shape[0]
  block_q = min(BLOCK_Q, q_tile)
  start = pl.program_id(1) * block_kv
  k = _rows(k_ref, 0, block_kv, kv_len - start)
  v = _rows(v_ref, 0, block_kv, kv_len - start)

  def over_queries(i, sums):
    dk, dv = sums
    at = i * block_q
    rows = at + jnp.arange(block_q)
    q = _rows(q_ref, at, block_q, q_len)
    d_out = _rows(do_ref, at, block_q, q_len)
    lse = plgpu.load(lse_ref.at[pl.ds(at, block_q)], mask=rows < q_len, other=0.)
    delta = plgpu.load(delta_ref.at[pl.ds(at, block_q)], mask=rows < q_len, other=0.)
    logits = plgpu.dot(q, k, trans_b=True) * scale
    # Padded keys' columns only reach their own dK, dV rows, which are never stored; padded
    # queries have d_out = 0 and delta = 0, so they add nothing.
    weights = jnp.exp(logits - lse[:, None])
    dv += plgpu.dot(weights.astype(d_out.dtype), d_out, trans_a=True)
    d_weights = plgpu.dot(d_out, v, trans_b=True)
    d_logits = weights * (d_weights - delta[:, None]) * scale
    dk += plgpu.dot(d_logits.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros((block_kv, k.shape[1]), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, pl.cdiv(q_len, block_q), over_queries, (zeros, zeros))
  keys = (start + jnp.arange(block_kv) < kv_len)[:, None]
  plgpu.store(dk_ref, dk.astype(dk_ref.dtype), mask=keys)
  plgpu.store(dv_ref, dv.astype(dv_ref.dtype), mask=keys)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, q_len, kv_len,
               scale):
  """dQ of one block of queries, against every key."""
  block_q, kv_tile = q_ref.shape[0], k_ref.shape[0]
  start = pl.program_id(1) * block_q
  rows = start + jnp.arange(block_q)
  q = _rows(q_ref, 0, block_q, q_len - start)
  d_out = _rows(do_ref, 0, block_q, q_len - start)
  k = _rows(k_ref, 0, kv_tile, kv_len)
  v = _rows(v_ref, 0, kv_tile, kv_len)
  lse = plgpu.load(lse_ref, mask=rows < q_len, other=0.)
  delta = plgpu.load(delta_ref, mask=rows < q_len, other=0.)
  logits = plgpu.dot(q, k, trans_b=True) * scale
  # Padded keys must get weight 0 here: their logits read 0, and exp(0 - lse) overflows where
  # a query's real logits are all far below 0; times a padded (zero) key row, inf gives NaN.
  weights = jnp.where((jnp.arange(kv_tile) < kv_len)[None, :],
                      jnp.exp(logits - lse[:, None]), 0.)
  d_weights = plgpu.dot(d_out, v, trans_b=True)
  d_logits = weights * (d_weights - delta[:, None]) * scale
  dq = plgpu.dot(d_logits.astype(k.dtype), k)
  plgpu.store(dq_ref, dq.astype(dq_ref.dtype), mask=(rows < q_len)[:, None])


def _backward(scale, residuals, d_out):
  q, k, v, out, lse = residuals
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  # delta = rowsum(dO * O): the softmax gradient's per-query term, one pass in XLA.
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_out = d_out.astype(q.dtype)
  block_q, kv_tile = _all_keys_tiles(q_len, kv_len)
  q_tile, block_kv = pl.next_power_of_2(max(q_len, 16)), _tile(kv_len, BLOCK_KV)
  args = (q, k, v, d_out, lse, delta)
  every_query = pl.BlockSpec((None, q_tile, None, head_dim), lambda b, j, h: (b, 0, h, 0))
  key_block = pl.BlockSpec((None, block_kv, None, head_dim), lambda b, j, h: (b, j, h, 0))
  every_stat = pl.BlockSpec((None, None, q_tile), lambda b, j, h: (b, h, 0))
  dk, dv = _call(
      functools.partial(_dkdv_kernel, q_len=q_len, kv_len=kv_len, scale=scale),
      "short_attention_dkdv", (batch, pl.cdiv(kv_len, block_kv), heads),
      [every_query, key_block, key_block, every_query, every_stat, every_stat],
      [key_block, key_block],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)])(*args)
  query_block = pl.BlockSpec((None, block_q, None, head_dim), lambda b, i, h: (b, i, h, 0))
  every_key = pl.BlockSpec((None, kv_tile, None, head_dim), lambda b, i, h: (b, 0, h, 0))
  stat_block = pl.BlockSpec((None, None, block_q), lambda b, i, h: (b, h, i))
  dq = _call(
      functools.partial(_dq_kernel, q_len=q_len, kv_len=kv_len, scale=scale),
      "short_attention_dq", (batch, pl.cdiv(q_len, block_q), heads),
      [query_block, every_key, every_key, query_block, stat_block, stat_block],
      query_block, jax.ShapeDtypeStruct(q.shape, q.dtype))(*args)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, scale):
  return _forward(q, k, v, scale)[0]


def _attention_fwd(q, k, v, scale):
  out, lse = _forward(q, k, v, scale)
  return out, (q, k, v, out, lse)


_attention.defvjp(_attention_fwd, _backward)


def attention(q: Array, k: Array, v: Array, logits_scale: float = 1.0) -> Array:
  """softmax(logits_scale * q k^T) v per head; q [B, Lq, H, D], k, v [B, Lk, H, D] (`takes`).

  Logits, softmax and accumulation in f32; the matmuls take q, k, v in their dtype (all three
  alike), and the result comes back in it.
  """
  if not takes(q.shape[1], k.shape[1], q.shape[-1], q.shape[2], k.shape[2], masked=False):
    raise ValueError(f"short_attention takes at most {MAX_KV_LEN} keys, head_dim in "
                     f"{HEAD_DIMS} and as many key as query heads; got q {q.shape}, k {k.shape}.")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  return _attention(q, k, v, float(logits_scale))
