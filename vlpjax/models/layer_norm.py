"""LayerNorm whose backward pass is one fused kernel on GPUs (`config.norm_impl`).

- "xla" (what "auto" picks): `flax.linen.LayerNorm`, differentiated by JAX; XLA fuses it.
- "pallas": the same parameters and forward pass (statistics and normalisation in f32, as
  nn.LayerNorm computes them), with a hand-written backward pass that is one Pallas (Triton)
  kernel: each program holds whole rows of x and of the output's gradient, recomputes the
  row statistics from x (so no statistics are saved), writes dx and sums its rows'
  contributions to d scale and d bias. GPU only (or in Pallas' interpreter, for tests).

Why: XLA:GPU's own backward for a pre-LN block's LayerNorm is three passes over [tokens,
width] arrays (the mean of x again, the two row reductions, then dx with the scale and bias
gradients), up to 1.9x the bytes of one pass that reads x, the output's gradient and the
residual stream's gradient and writes dx (a deviceless H100 compile of the SigLIP B/16 step at
batch 256: 0.19 and 0.17 ms against 0.11 ms per image-tower LayerNorm; docs/benchmarks.md).
Part of that comes back: XLA had also summed the preceding projection's bias gradient in its dx
pass, and now sums it in a pass of its own.

`residual=True` returns (x, LayerNorm(x)): x passes through unchanged, and the backward adds
the gradient that reaches that x (the residual stream's) to dx in the same kernel. Without
it XLA would add the two in a pass of its own, since it cannot fuse an add into a custom call.

Not measured on a GPU yet, so "auto" stays "xla" until tools/gpu_benchmarks.sh has timed it.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vlpjax.models import attention, pallas_util
from vlpjax.registry import unknown_name_message

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "pallas")
# Logical names of the [batch, length, width] activations a block normalises.
ACT_TOKENS = ("act_batch", "act_length", "act_embed")
ROWS_PER_PROGRAM = 64   # rows whose scale/bias gradients one program sums (partials: rows/64)
ROWS_PER_STEP = 4       # rows in registers at a time: 4 x 1024 f32 per array at width 768
NUM_WARPS = 8
MAX_WIDTH = 8192        # a row must fit one program's registers, a few arrays at a time


def resolve(impl: str, backend: Optional[str] = None) -> str:
  """The implementation `impl` names; fails fast where it cannot run."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(unknown_name_message("LayerNorm implementation (config.norm_impl)",
                                          impl, IMPLEMENTATIONS))
  if impl == "auto":
    return "xla"
  if impl == "pallas" and not pallas_util.interpreting():
    backend = backend or attention.target_backend()
    if backend != "gpu":
      raise ValueError(f"norm_impl='pallas' needs a GPU, but the backend is {backend!r}; "
                       "use 'auto' or 'xla'.")
  return impl


class LayerNorm(nn.LayerNorm):
  """nn.LayerNorm (its fields, parameters and forward pass) with `impl` picking the backward
  pass (module docstring). Statistics and normalisation in f32 whatever `dtype`, the output's.
  """
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, residual: bool = False, *, mask=None):
    """LayerNorm(x), or (x, LayerNorm(x)) with `residual` (module docstring)."""
    if resolve(self.impl) == "xla":
      y = super().__call__(x, mask=mask)
      return (x, y) if residual else y
    if (mask is not None or not self.use_scale or not self.use_bias or self.axis_name
        or self.reduction_axes != -1 or self.feature_axes != -1
        or not self.use_fast_variance or not self.force_float32_reductions):
      raise ValueError("norm_impl='pallas' is nn.LayerNorm's default over the last axis (scale "
                       "and bias, f32 statistics), without masks or cross-device statistics.")
    width = x.shape[-1]
    scale = self.param("scale", self.scale_init, (width,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (width,), self.param_dtype)
    dtype = jnp.dtype(self.dtype or x.dtype)
    if residual:
      return _residual_and_norm(x, scale, bias, self.epsilon, dtype)
    return _norm(x, scale, bias, self.epsilon, dtype)


# -- "pallas": nn.LayerNorm's forward, one kernel backward ------------------------------------

def _forward(x: Array, scale: Array, bias: Array, eps: float, dtype) -> Array:
  """nn.LayerNorm's arithmetic (its default settings), step for step: f32 statistics with
  E[x^2] - E[x]^2 (clipped at 0), then (x - mean) * (rsqrt(var + eps) * scale) + bias; the
  result in `dtype`."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.maximum(0., jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean))
  mul = jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
  return ((x32 - mean) * mul + bias.astype(jnp.float32)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm(x, scale, bias, eps, dtype):
  return _forward(x, scale, bias, eps, dtype)


def _norm_fwd(x, scale, bias, eps, dtype):
  # A zero-size array carries the bias's dtype to the backward pass (residuals are arrays).
  return _forward(x, scale, bias, eps, dtype), (x, scale, jnp.zeros((0,), bias.dtype))


def _norm_bwd(eps, dtype, residuals, d_y):
  del dtype
  x, scale, bias_dtype_carrier = residuals
  return _backward(x, scale, bias_dtype_carrier.dtype, d_y, None, eps)


_norm.defvjp(_norm_fwd, _norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _residual_and_norm(x, scale, bias, eps, dtype):
  return x, _forward(x, scale, bias, eps, dtype)


def _residual_and_norm_fwd(x, scale, bias, eps, dtype):
  y, residuals = _norm_fwd(x, scale, bias, eps, dtype)
  return (x, y), residuals


def _residual_and_norm_bwd(eps, dtype, residuals, cotangents):
  del dtype
  x, scale, bias_dtype_carrier = residuals
  d_residual, d_y = cotangents
  return _backward(x, scale, bias_dtype_carrier.dtype, d_y, d_residual, eps)


_residual_and_norm.defvjp(_residual_and_norm_fwd, _residual_and_norm_bwd)


def _backward(x, scale, bias_dtype, d_y, d_residual, eps):
  """(dx [+ d_residual], d scale, d bias): the Pallas kernel on each device's rows, or the same
  arithmetic in XLA where it cannot run (`_kernel_takes`)."""
  if not _kernel_takes(x):
    d_x, d_scale, d_bias = backward_reference(x, scale, d_y, eps)
    if d_residual is not None:
      d_x = d_x + d_residual.astype(d_x.dtype)
  else:
    d_x, d_scale, d_bias = _per_shard_backward(x, scale, d_y, d_residual, eps)
  return d_x.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias_dtype)


def backward_reference(x, scale, d_y, eps):
  """LayerNorm's gradients in plain JAX (f32): the kernel's arithmetic, for meshes that split
  the width (the kernel needs whole rows) and as a second implementation for tests."""
  x32, g = x.astype(jnp.float32), d_y.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  centred = x32 - mean
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
  x_hat = centred * rstd
  g_scaled = g * scale.astype(jnp.float32)
  d_x = rstd * (g_scaled - x_hat * jnp.mean(g_scaled * x_hat, axis=-1, keepdims=True)
                - jnp.mean(g_scaled, axis=-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return d_x, jnp.sum(g * x_hat, axis=rows), jnp.sum(g, axis=rows)


def _kernel_takes(x) -> bool:
  """Whether the kernel can run on x's rows: a [batch, length, width] activation whose width
  the mesh does not split, at most MAX_WIDTH wide."""
  if x.ndim != 3 or x.shape[-1] > MAX_WIDTH:
    return False
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or nn.logical_to_mesh_axes(ACT_TOKENS)[2] is None


def _per_shard_backward(x, scale, d_y, d_residual, eps):
  """The kernel on each device's [batch, length] rows, under `shard_map` as the logical rules
  split them (a Pallas call has no rule for XLA's SPMD partitioner, which would gather its
  operands whole onto every device); the scale and bias gradients summed over devices."""
  args = (x, d_y) if d_residual is None else (x, d_y, d_residual)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _kernel_backward(scale, eps, *args)
  batch, length, _ = nn.logical_to_mesh_axes(ACT_TOKENS)
  row_axes = tuple(a for axes in (batch, length) if axes is not None
                   for a in (axes if isinstance(axes, tuple) else (axes,)))
  rows = jax.sharding.PartitionSpec(batch, length, None)
  whole = jax.sharding.PartitionSpec(None)

  def per_shard(scale, *args):
    d_x, d_scale, d_bias = _kernel_backward(scale, eps, *args)
    if row_axes:
      d_scale, d_bias = jax.lax.psum((d_scale, d_bias), row_axes)
    return d_x, d_scale, d_bias

  # check_vma off: a Pallas call's outputs carry no record of which mesh axes they vary over.
  return jax.shard_map(per_shard, in_specs=(whole,) + (rows,) * len(args),
                       out_specs=(rows, whole, whole), check_vma=False)(scale, *args)


def _kernel_backward(scale, eps, x, d_y, d_residual=None):
  """One kernel over x's rows (x [B, L, D]): dx (+ d_residual) in x's dtype, and the scale and bias
  gradients, summed by program in the kernel and over programs here."""
  width = x.shape[-1]
  x2d, d_y2d = x.reshape(-1, width), d_y.reshape(-1, width)
  rows = x2d.shape[0]
  tile = pl.next_power_of_2(width)
  programs = pl.cdiv(rows, ROWS_PER_PROGRAM)
  row_block = pl.BlockSpec((ROWS_PER_PROGRAM, tile), lambda i: (i, 0))
  partial = pl.BlockSpec((None, tile), lambda i: (i, 0))
  operands = [x2d, d_y2d] + ([] if d_residual is None else [d_residual.reshape(-1, width)])
  kernel = functools.partial(_backward_kernel, rows=rows, width=width, eps=eps,
                             has_residual=d_residual is not None)
  d_x, d_scale, d_bias = pl.pallas_call(
      kernel, grid=(programs,),
      in_specs=[pl.BlockSpec((tile,), lambda i: (0,))] + [row_block] * len(operands),
      out_specs=[row_block, partial, partial],
      out_shape=[jax.ShapeDtypeStruct(x2d.shape, x.dtype),
                 jax.ShapeDtypeStruct((programs, width), jnp.float32),
                 jax.ShapeDtypeStruct((programs, width), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS),
      interpret=pallas_util.interpreting(), name="layer_norm_bwd")(scale, *operands)
  return d_x.reshape(x.shape), jnp.sum(d_scale, axis=0), jnp.sum(d_bias, axis=0)


def _backward_kernel(scale_ref, x_ref, d_y_ref, *rest, rows, width, eps, has_residual):
  d_residual_ref = rest[0] if has_residual else None
  d_x_ref, d_scale_ref, d_bias_ref = rest[-3:]
  tile = x_ref.shape[1]
  start = pl.program_id(0) * ROWS_PER_PROGRAM
  in_width = jnp.arange(tile) < width
  scale = plgpu.load(scale_ref, mask=in_width, other=0.).astype(jnp.float32)

  def over_rows(i, sums):
    d_scale, d_bias = sums
    at = i * ROWS_PER_STEP
    valid = ((start + at + jnp.arange(ROWS_PER_STEP)) < rows)[:, None] & in_width[None, :]
    block = lambda ref: plgpu.load(ref.at[pl.ds(at, ROWS_PER_STEP)], mask=valid,
                                   other=0.).astype(jnp.float32)
    x = block(x_ref)
    mean = jnp.sum(x, axis=1, keepdims=True) / width
    centred = jnp.where(valid, x - mean, 0.)   # past the width x reads 0, not the mean
    rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / width + eps)
    x_hat = centred * rstd
    g = block(d_y_ref)
    g_scaled = g * scale[None, :]
    d_x = rstd * (g_scaled - x_hat * (jnp.sum(g_scaled * x_hat, axis=1, keepdims=True) / width)
                  - jnp.sum(g_scaled, axis=1, keepdims=True) / width)
    if has_residual:
      d_x += block(d_residual_ref)
    plgpu.store(d_x_ref.at[pl.ds(at, ROWS_PER_STEP)], d_x.astype(d_x_ref.dtype), mask=valid)
    return d_scale + jnp.sum(g * x_hat, axis=0), d_bias + jnp.sum(g, axis=0)

  zeros = jnp.zeros((tile,), jnp.float32)
  d_scale, d_bias = jax.lax.fori_loop(0, ROWS_PER_PROGRAM // ROWS_PER_STEP, over_rows,
                                      (zeros, zeros))
  plgpu.store(d_scale_ref, d_scale, mask=in_width)
  plgpu.store(d_bias_ref, d_bias, mask=in_width)
