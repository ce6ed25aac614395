"""Transformer building blocks shared by the vision and text towers.

Every parameter carries logical axis names (see `with_logical_partitioning`) and
activations are constrained with logical names at block boundaries; the sharding
module maps these names to mesh axes, so nothing here mentions a mesh.

Submodule and parameter names follow Hugging Face SigLIP (`self_attn.q_proj`,
`mlp.fc1`, `layer_norm1`, ...) so checkpoint conversion is a renaming plus the
kernel transposes, not a restructuring.
"""
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vlpjax.models import attention
from vlpjax.models import layer_norm as layer_norm_lib
from vlpjax.registry import unknown_name_message

Dtype = Any
Array = jax.Array

LAYER_NORM_EPS = 1e-6  # SigLIP / big_vision value; HF SiglipConfig.layer_norm_eps.

# Activation logical names. A name the rules do not mention is left unsharded.
ACT_TOKENS = layer_norm_lib.ACT_TOKENS
ACT_HEADS = attention.ACT_HEADS
ACT_HEADS_FIRST = ("act_batch", "act_heads", "act_length", "act_kv")
ACT_MLP = ("act_batch", "act_length", "act_mlp")

_KERNEL_INIT = nn.initializers.xavier_uniform()
_BIAS_INIT = nn.initializers.zeros_init()


def token_matmul(x: Array, kernel: Array, num_contract: int = 1,
                 preferred_element_type: Optional[Dtype] = None) -> Array:
  """x [..., *in] . kernel [*in, *out] -> [..., *out], as one 2-D [tokens, in] x [in, out] matmul.

  Why 2-D: with x's leading [batch, length] dims kept, the kernel's gradient contracts over two
  dims, and XLA:CPU answers that with a transposed copy of an activation and a slower matmul
  (a ViT-B MLP block's forward + backward: 381 ms with [B, L, D], 350 ms flattened, on 2 CPU
  cores; docs/benchmarks.md). The reshapes are bitcasts, free on every backend, and a
  batch-sharded leading dim stays sharded.
  """
  in_shape, out_shape = kernel.shape[:num_contract], kernel.shape[num_contract:]
  lead = x.shape[:x.ndim - num_contract]
  size_in = int(np.prod(in_shape))
  y = jax.lax.dot_general(x.reshape(-1, size_in), kernel.reshape(size_in, -1),
                          (((1,), (0,)), ((), ())),
                          preferred_element_type=preferred_element_type)
  return y.reshape(lead + out_shape)


# `biased_token_matmul`'s extra contraction lanes: a ones column, then zeros up to 16 so that the
# contraction stays a multiple of 16 (the bf16 granule of tensor-core matmuls).
BIAS_LANES = 16


def _with_bias_lanes(x2d: Array) -> Array:
  lanes = jnp.zeros((x2d.shape[0], BIAS_LANES), x2d.dtype).at[:, 0].set(1)
  return jnp.concatenate([x2d, lanes], axis=1)


def _biased_matmul_fwd(x: Array, kernel: Array, bias: Array):
  size_in, lead, out_shape = kernel.shape[0], x.shape[:-1], kernel.shape[1:]
  w = kernel.reshape(size_in, -1)
  lanes = jnp.zeros((BIAS_LANES - 1, w.shape[1]), w.dtype)
  w_aug = jnp.concatenate([w, bias.reshape(1, -1).astype(w.dtype), lanes], axis=0)
  x_aug = _with_bias_lanes(x.reshape(-1, size_in))
  y = jnp.dot(x_aug, w_aug)
  # A zero-size array carries the bias's dtype to the backward pass (residuals are arrays).
  return y.reshape(lead + out_shape), (x_aug, kernel, jnp.zeros((0,), bias.dtype))


def _biased_matmul_bwd(residuals, dy: Array):
  x_aug, kernel, bias_dtype_carrier = residuals
  size_in, out_shape = kernel.shape[0], kernel.shape[1:]
  dy2d = dy.reshape(-1, int(np.prod(out_shape)))
  dx = jnp.dot(dy2d, kernel.reshape(size_in, -1).T)
  # One matmul for both: row `size_in` of x_aug's columns is the ones column.
  dw_aug = jnp.dot(x_aug.T, dy2d, preferred_element_type=jnp.float32)
  d_kernel = dw_aug[:size_in].astype(kernel.dtype).reshape(kernel.shape)
  d_bias = dw_aug[size_in].astype(bias_dtype_carrier.dtype).reshape(out_shape)
  return dx.reshape(dy.shape[:dy.ndim - len(out_shape)] + (size_in,)), d_kernel, d_bias


@jax.custom_vjp
def biased_token_matmul(x: Array, kernel: Array, bias: Array) -> Array:
  """x [..., in] . kernel [in, *out] + bias [*out], with the bias inside the matmul.

  x gets a ones column (and zeros up to BIAS_LANES) and the kernel the bias as a row, so one
  matmul adds the bias in the forward pass, and in the backward pass the weight-gradient matmul
  sums the bias gradient too (f32 accumulation). Why: as separate ops, the forward's bias add
  and the backward's bias gradient each read the whole [tokens, out] activation once more, and
  XLA:GPU fuses neither into its matmuls (on a deviceless H100 compile of the SigLIP B/16 step:
  2.4 ms of 96 estimated; docs/benchmarks.md). The ones column is written by the kernel that
  writes x (a LayerNorm), so it costs 2% more matmul FLOPs and 2% more bytes of x.
  """
  return _biased_matmul_fwd(x, kernel, bias)[0]


biased_token_matmul.defvjp(_biased_matmul_fwd, _biased_matmul_bwd)


def bias_in_matmul() -> bool:
  """Whether biases go inside their matmuls (`biased_token_matmul`): where the step is traced
  for a GPU. Elsewhere the add is an elementwise pass after the matmul: XLA:TPU fuses that pass
  into the matmul itself (and would pad the 16 extra lanes to its 128-wide tiles), and the CPU
  step is matmul-bound (an A/B of the SigLIP B/16 step, f32 on 2 cores, showed no gain: +3.5%,
  inside this machine's run-to-run spread of about 10%)."""
  return attention.target_backend() == "gpu"


def matmul_plus_bias(x: Array, kernel: Array, bias: Array,
                     scale: Optional[Array] = None) -> Array:
  """(x [..., in] . kernel [in, *out] + bias) * scale, in one matmul on GPUs (the scale applied
  to the kernel and bias, so no pass over the result is left), else a matmul and one
  elementwise pass (`bias_in_matmul`)."""
  if bias_in_matmul():
    if scale is not None:
      kernel, bias = kernel * scale, bias * scale
    return biased_token_matmul(x, kernel, bias)
  y = token_matmul(x, kernel) + bias
  return y if scale is None else y * scale


class Dense(nn.Dense):
  """`nn.Dense` (same parameters and names) that flattens [..., D] inputs to [tokens, D] first.

  For the reason `token_matmul` gives.
  """

  def __call__(self, inputs: Array) -> Array:
    if inputs.ndim <= 2:
      return super().__call__(inputs)
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return y.reshape(inputs.shape[:-1] + (self.features,))


def partitioned(init, names):
  """`init` whose parameters carry the logical axis `names` (one per dim)."""
  return nn.with_logical_partitioning(init, names)


def projection(features: int, name: str, dtype, param_dtype, use_bias: bool = True
               ) -> Dense:
  """Linear head from model width to an output embedding (`proj`) dim.

  Not zero-initialised (big_vision's classifier default): a zero embedding has no direction
  for the contrastive loss's L2 norm. `use_bias=False` is CLIP's (its projections have none).
  """
  return Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", "proj")),
      bias_init=partitioned(nn.initializers.zeros_init(), ("proj",)),
      name=name)


def constrain(x: Array, names) -> Array:
  """Logical sharding constraint on an activation (a no-op without rules)."""
  return nn.with_logical_constraint(x, names)


def layer_norm(name: str, param_dtype: Dtype, dtype: Dtype = jnp.float32,
               impl: str = "auto") -> layer_norm_lib.LayerNorm:
  """nn.LayerNorm's parameters and arithmetic, its result in `dtype`; `impl` picks the
  backward pass (`vlpjax.models.layer_norm`)."""
  # Normalisation statistics in f32 even under bf16 compute: bf16 variance loses
  # too many digits on wide models.
  return layer_norm_lib.LayerNorm(
      epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype,
      scale_init=partitioned(nn.initializers.ones_init(), ("embed",)),
      bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)),
      impl=impl, name=name)


def _bias_gelu(h: Array, bias: Optional[Array] = None) -> Array:
  return nn.gelu(h if bias is None else h + bias, approximate=True)


# Recomputed in the backward pass from the matmul's output (`jax.checkpoint` keeps only its
# inputs). Why: XLA otherwise keeps the biased pre-activation and GELU's tanh for the backward,
# so the forward writes three [tokens, mlp_dim] tensors where one is needed and the backward
# reads three where two do; these are a ViT block's largest activations and the work around them
# is memory-bound, so recomputing costs little. On a deviceless H100 compile of the SigLIP B/16
# step (tools/gpu_compile.py, docs/benchmarks.md) it took 3.2 ms off the estimated step and 4.6
# GiB off its memory; on CPU, where the recomputed tanh is not free, within 2%. (On GPUs the
# bias is inside the matmul, `bias_in_matmul`, and `bias` is None.)
bias_gelu = jax.checkpoint(_bias_gelu)


class DenseGelu(nn.Module):
  """tanh-GELU(x . kernel + bias): `nn.Dense`'s parameters (names, shapes, initialisers) with
  the bias add (unless it is inside the matmul, `bias_in_matmul`) and the GELU in
  `bias_gelu`."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if bias_in_matmul():
      return bias_gelu(biased_token_matmul(x, kernel, bias))
    return bias_gelu(token_matmul(x, kernel), bias)


class MlpBlock(nn.Module):
  """fc1 -> gelu (tanh approximation, HF `gelu_pytorch_tanh`) -> fc2."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    h = DenseGelu(
        self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=partitioned(_KERNEL_INIT, ("embed", "mlp")),
        bias_init=partitioned(_BIAS_INIT, ("mlp",)), name="fc1")(x)
    h = constrain(h, ACT_MLP)
    return Dense(
        width, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=partitioned(_KERNEL_INIT, ("mlp", "embed")),
        bias_init=partitioned(_BIAS_INIT, ("embed",)), name="fc2")(h)


class HeadProjection(nn.Module):
  """x [B, L, D] -> [B, heads, L, head_dim]: a q/k/v projection that writes heads first.

  The kernel is `(embed, heads, kv)` and the bias `(heads, kv)` (a Hugging Face `Linear(E, E)`
  weight `W` is `W.T.reshape(E, heads, kv)`), created in their final shapes: Flax's own
  DenseGeneral initialises a flattened 2-D kernel and reshapes it, which breaks
  `with_logical_partitioning` names for >2-D kernels as soon as a mesh is set.
  Heads-first is what the attention matmuls want: their batch dims (batch, heads) lead, so
  XLA moves the heads once, here, instead of around every attention matmul (on CPU the
  [B, L, heads, kv] layout cost about 10% of a ViT-B block's step time in transposes).
  `heads_first=False` writes [B, L, heads, kv], the layout fused attention kernels take.
  `output_scale` multiplies the result (q's 1/sqrt(head_dim)); see `matmul_plus_bias`.
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  heads_first: bool = True
  output_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = (x.shape[-1], self.num_heads, self.head_dim)
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
    kernel = self.param("kernel", partitioned(init, ("embed", "heads", "kv")), shape,
                        self.param_dtype)
    bias = self.param("bias", partitioned(_BIAS_INIT, ("heads", "kv")), shape[1:],
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    scale = None if self.output_scale == 1.0 else jnp.asarray(self.output_scale, self.dtype)
    y = matmul_plus_bias(x, kernel, bias, scale)
    return jnp.swapaxes(y, -2, -3) if self.heads_first else y


class HeadMerge(nn.Module):
  """[B, heads, L, head_dim] -> [B, L, D]: the output projection, contracting heads and kv.

  Kernel `(heads, kv, embed)` and bias `(embed,)`. `heads_first=False` takes [B, L, heads, kv].
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  heads_first: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    num_heads, head_dim = x.shape[-3 if self.heads_first else -2], x.shape[-1]
    init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    kernel = self.param("kernel", partitioned(init, ("heads", "kv", "embed")),
                        (num_heads, head_dim, self.features), self.param_dtype)
    bias = self.param("bias", partitioned(_BIAS_INIT, ("embed",)), (self.features,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.heads_first:
      x = jnp.swapaxes(x, -2, -3)
    return token_matmul(x, kernel, num_contract=2) + bias


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with separate q/k/v/out projections.

  Kernels: q/k/v `(embed, heads, kv)`, out `(heads, kv, embed)`; an HF
  `Linear(E, E)` weight `W` maps to `W.T.reshape(E, heads, kv)` (q/k/v) and
  `W.T.reshape(heads, kv, E)` (out). Softmax runs in f32. `attention_impl` picks the kernel
  (`vlpjax.models.attention`); with "einsum" the activations between the projections are
  heads-first, [B, heads, L, kv] (see `HeadProjection`), else [B, L, heads, kv]. The params are
  the same either way.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array] = None,
               mask: Optional[Array] = None) -> Array:
    """Attends from `inputs_q` [B, Lq, D] over `inputs_kv` [B, Lk, D].

    Args:
      inputs_q: queries' inputs.
      inputs_kv: keys' and values' inputs; `inputs_q` (self-attention) if None.
      mask: boolean, broadcastable to [B, heads, Lq, Lk]; True = may attend.

    Returns:
      [B, Lq, D] in `dtype`.
    """
    if inputs_kv is None:
      inputs_kv = inputs_q
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"Width {width} is not divisible by {self.num_heads} heads.")
    head_dim = width // self.num_heads
    heads_first = attention.uses_heads_first(self.attention_impl, self.dtype)
    act_names = ACT_HEADS_FIRST if heads_first else ACT_HEADS

    def project(x, name, scale=1.0):
      y = HeadProjection(self.num_heads, head_dim, self.dtype, self.param_dtype, heads_first,
                         scale, name=name)(x)
      return constrain(y, act_names)

    # The 1/sqrt(head_dim) scale goes on q's projection ([B, h, Lq, kv]; on GPUs into its kernel
    # and bias), not on the logits ([B, h, Lq, Lk]): the same result for less elementwise work
    # when Lk > kv.
    q = project(inputs_q, "q_proj", head_dim ** -0.5)
    k = project(inputs_kv, "k_proj")
    v = project(inputs_kv, "v_proj")
    attended = attention.attend(q, k, v, mask, impl=self.attention_impl, dtype=self.dtype,
                                heads_first=heads_first)
    attended = constrain(attended, act_names)
    return HeadMerge(width, self.dtype, self.param_dtype, heads_first,
                     name="out_proj")(attended)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)).

  The LayerNorms hand x back with their output (`residual=True`): with norm_impl="pallas" the
  residual stream's gradient then joins the LayerNorm's in its backward kernel.
  """
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    x = constrain(x, ACT_TOKENS)
    x, y = layer_norm("layer_norm1", self.param_dtype, self.dtype, self.norm_impl)(
        x, residual=True)
    y = MultiHeadAttention(self.num_heads, self.dtype, self.param_dtype, self.attention_impl,
                           name="self_attn")(y, mask=mask)
    x = x + y
    x, y = layer_norm("layer_norm2", self.param_dtype, self.dtype, self.norm_impl)(
        x, residual=True)
    y = MlpBlock(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(y)
    return constrain(x + y, ACT_TOKENS)


REMAT_POLICIES = ("none", "full", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable")


def remat_block(block_cls, remat_policy: str):
  """`block_cls` wrapped in `nn.remat` according to a policy name.

  'none' keeps every activation (no rematerialisation), 'full' recomputes the
  whole block in the backward pass, any other name is a `jax.checkpoint_policies`
  member (what to keep; the rest is recomputed).
  """
  if remat_policy == "none":
    return block_cls
  if remat_policy == "full":
    return nn.remat(block_cls, prevent_cse=True)
  policy = getattr(jax.checkpoint_policies, remat_policy, None)
  if policy is None or remat_policy.startswith("_"):
    known = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")]
    raise ValueError(unknown_name_message(
        "remat policy", remat_policy, ["none", "full"] + known))
  return nn.remat(block_cls, policy=policy, prevent_cse=True)


class Encoder(nn.Module):
  """`depth` encoder blocks and a final LayerNorm `encoder_norm`.

  The blocks are `layers_0` ... `layers_{depth-1}`, or with `scan_layers` one module
  `scanned` that `nn.scan` runs `depth` times: its params carry a leading `layers` axis of
  size `depth` (block i is `leaf[i]`; `vlpjax.models.scan_util` converts between the two
  layouts). Scanning compiles one block instead of `depth`, which matters for deep towers;
  the function is the same (up to float rounding: XLA fuses the loop differently). The mask
  is the same for every block (broadcast), and `remat_policy` applies to each block either
  way.
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_impl: str = "auto"
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    block_cls = remat_block(EncoderBlock, self.remat_policy)
    x = x.astype(self.dtype)
    if self.scan_layers:
      x = self._scanned_blocks(block_cls, x, mask)
    else:
      for i in range(self.depth):
        x = block_cls(self.mlp_dim, self.num_heads, self.dtype, self.param_dtype,
                      self.attention_impl, self.norm_impl, name=f"layers_{i}")(x, mask)
    return layer_norm("encoder_norm", self.param_dtype, self.dtype, self.norm_impl)(x)

  def _scanned_blocks(self, block_cls, x: Array, mask: Optional[Array]) -> Array:
    """The `depth` blocks as one `nn.scan` over a module named `scanned`."""

    def body(block, carry, block_mask):
      # nn.scan wants (carry, per-step output); the blocks have only a carry.
      return block(carry, block_mask), None

    scan = nn.scan(
        body, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=nn.broadcast, length=self.depth,
        metadata_params={nn.PARTITION_NAME: "layers"})
    block = block_cls(self.mlp_dim, self.num_heads, self.dtype, self.param_dtype,
                      self.attention_impl, self.norm_impl, name="scanned")
    x, _ = scan(block, x, mask)
    return x


class MAPHead(nn.Module):
  """Multihead attention pooling (HF `SiglipMultiheadAttentionPoolingHead`).

  A learned probe attends over the tokens; then `x + mlp(layernorm(x))`.
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, _, width = x.shape
    probe = self.param(
        "probe", partitioned(_KERNEL_INIT, (None, None, "embed")),
        (1, 1, width), self.param_dtype)
    probe = jnp.broadcast_to(probe, (batch, 1, width)).astype(self.dtype)
    x = MultiHeadAttention(self.num_heads, self.dtype, self.param_dtype, self.attention_impl,
                           name="attention")(probe, x)
    y = layer_norm("layernorm", self.param_dtype)(x).astype(self.dtype)
    x = x + MlpBlock(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(y)
    return x[:, 0]


class LearnedPositionEmbedding(nn.Module):
  """A learned table `embedding` of shape (num_positions, width); returns it."""
  num_positions: int
  width: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> Array:
    return self.param(
        "embedding",
        partitioned(nn.initializers.normal(stddev=self.width ** -0.5),
                    ("pos", "embed")),
        (self.num_positions, self.width), self.param_dtype)


@jax.custom_vjp
def add_position_embedding(x: Array, pos: Array) -> Array:
  """x [B, L, width] + pos [L, width], in x's dtype.

  Its gradient for `pos` is the sum over the batch of x's gradient, computed as a matmul with
  a vector of ones rather than as the reduction autodiff writes. Why: given a reduction over
  the batch, XLA:GPU's layout assignment made the batch the *minor* dim of the whole residual
  stream, so every block's adds, LayerNorms and their gradients ran as transposes ([L, width,
  B] layouts; 11.8 ms of the 111 ms estimated for a SigLIP B/16 step in a deviceless H100
  compile, docs/benchmarks.md). A matmul's operands keep their row-major layout.
  """
  return x + pos[None].astype(x.dtype)


def _add_position_embedding_fwd(x: Array, pos: Array):
  # A zero-size array carries pos's dtype to the backward pass (residuals must be arrays).
  return add_position_embedding(x, pos), jnp.zeros((0,), pos.dtype)


def _add_position_embedding_bwd(pos_dtype_carrier: Array, g: Array):
  ones = jnp.ones((g.shape[0],), g.dtype)
  pos_grad = jnp.einsum("b,bld->ld", ones, g, preferred_element_type=jnp.float32)
  return g, pos_grad.astype(pos_dtype_carrier.dtype)


add_position_embedding.defvjp(_add_position_embedding_fwd, _add_position_embedding_bwd)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype: Dtype = jnp.float32) -> Array:
  """Fixed 2-D sin-cos position embedding, [h * w, width] (MoCo v3, big_vision).

  A quarter of the channels each for sin(x), cos(x), sin(y), cos(y), with
  frequencies `temperature ** -(i / (width/4 - 1))`; rows in raster order.
  """
  if width % 4:
    raise ValueError(f"Width {width} must be a multiple of 4 for 2-D sincos.")
  y, x = np.mgrid[:h, :w]
  quarter = width // 4
  omega = np.arange(quarter) / max(quarter - 1, 1)
  omega = 1. / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)
