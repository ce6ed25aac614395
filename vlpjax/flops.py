"""Model FLOPs: analytic counts per model family (for MFU) and the matmuls of a traced program.

Analytic model FLOPs follow the usual MFU convention (PaLM, appendix B):

- a matmul with a [d_in, d_out] parameter matrix costs 2 * d_in * d_out FLOPs per token it
  is applied to (`dense`): attention projections, MLPs, patch embedding, pooling heads,
  projectors and the vocabulary projection (logits);
- attention itself, QK^T and AV, costs 4 * Lq * Lkv * d per layer (`attention`; d = heads x
  head_dim), halved where it is causal: the upper triangle is masked work, not model work;
- a training step is 3 x the forward pass (the backward pass runs two matmuls for each
  forward one: gradients of the activations and of the weights). Rematerialisation is left
  out: recomputing the forward pass is a memory trade, not model work.

Not counted: element-wise work (norms, activations, softmax, RoPE), embedding lookups
(gathers, not matmuls) and the losses. Padding is counted: the model runs on every position
of a fixed-shape batch (padded tokens, empty image slots), so that is the work per step.

The building blocks give the forward FLOPs of ONE sequence / image; a family's
`forward_flops(batch_size)` adds them up per component and scales by the batch, and
`step_model_flops` turns that into a training step's. `matmul_flops` is the second, independent
count: it reads the dot products and convolutions of a traced jaxpr (`tools/aot_compile.py`
reports it for a whole train step, remat included).
"""
import math
from typing import Any, Dict, Mapping, Optional

from jax.extend import core as jax_core

from vlpjax.models import vit as vit_lib

TRAIN_MULTIPLIER = 3.0  # forward + backward (2x forward), without rematerialisation
TOTAL = "total"


# -------------------------------------------------------------------------- building blocks


def dense(tokens: float, d_in: int, d_out: int) -> float:
  """A [d_in, d_out] matmul applied to `tokens` positions: 2 * tokens * d_in * d_out."""
  return 2.0 * tokens * d_in * d_out


def lora_dense(tokens: float, d_in: int, d_out: int, lora_rank: int = 0) -> float:
  """`dense` plus a LoRA adapter's x @ a @ b (rank `lora_rank`; 0 = none)."""
  flops = dense(tokens, d_in, d_out)
  if lora_rank:
    flops += dense(tokens, d_in, lora_rank) + dense(tokens, lora_rank, d_out)
  return flops


def attention(q_tokens: float, kv_tokens: float, width: int, causal: bool = False) -> float:
  """QK^T and AV of one layer: 4 * Lq * Lkv * width, halved when causal.

  `width` is the queries' total size, heads x head_dim (grouped-query attention repeats the
  kv heads, so the products still run over every query head).
  """
  flops = 4.0 * q_tokens * kv_tokens * width
  return flops / 2 if causal else flops


def multi_head_attention(q_tokens: float, kv_tokens: float, width: int,
                         kv_width: Optional[int] = None, causal: bool = False) -> float:
  """`layers.MultiHeadAttention`: q/k/v/out projections (heads x head_dim = width) + attention.

  k and v project the `kv_tokens` inputs of size `kv_width` (default: `width`).
  """
  kv_width = kv_width or width
  return (dense(q_tokens, width, width) + 2 * dense(kv_tokens, kv_width, width)
          + attention(q_tokens, kv_tokens, width, causal) + dense(q_tokens, width, width))


def mlp(tokens: float, width: int, mlp_dim: int, gated: bool = False,
        lora_rank: int = 0) -> float:
  """fc1 -> act -> fc2 (`layers.MlpBlock`), or the gated gate/up/down MLP (`GatedMlp`)."""
  return (3 if gated else 2) * lora_dense(tokens, width, mlp_dim, lora_rank)


def mlp_head(tokens: float, width: int, hidden: int, outputs: int) -> float:
  """Dense(hidden) -> act -> Dense(outputs) (e.g. the video grounding head)."""
  return dense(tokens, width, hidden) + dense(tokens, hidden, outputs)


def encoder_layers(tokens: float, width: int, depth: int, mlp_dim: int,
                   causal: bool = False) -> float:
  """`depth` pre-LN encoder blocks (`layers.Encoder`: ViT, text and temporal encoders)."""
  per_layer = multi_head_attention(tokens, tokens, width, causal=causal) + mlp(
      tokens, width, mlp_dim)
  return depth * per_layer


def decoder_layers(tokens: float, dims: Mapping[str, Any], depth: int, *, causal: bool = True,
                   cross_tokens: float = 0, cross_width: Optional[int] = None) -> float:
  """`depth` decoder blocks (`decoder.DecoderBlock`) over `tokens` positions.

  `dims`: a `Decoder`'s kwargs or CoCa's text settings, i.e. `width`, `mlp_dim`, `num_heads`
  and optionally `num_kv_heads` / `head_dim` (None: all heads / width // num_heads, the
  decoder's own defaults) and `lora_rank`. `cross_tokens` > 0 adds a cross-attention
  sublayer over that many encoded tokens of size `cross_width` (default: the width); it is
  never causal.
  """
  width, num_heads = dims["width"], dims["num_heads"]
  head_dim = dims.get("head_dim") or width // num_heads
  q_dim = num_heads * head_dim
  kv_dim = (dims.get("num_kv_heads") or num_heads) * head_dim
  rank = dims.get("lora_rank") or 0

  def attention_sublayer(kv_tokens, kv_width, is_causal):
    return (lora_dense(tokens, width, q_dim, rank)
            + 2 * lora_dense(kv_tokens, kv_width, kv_dim, rank)
            + attention(tokens, kv_tokens, q_dim, is_causal)
            + lora_dense(tokens, q_dim, width, rank))

  per_layer = attention_sublayer(tokens, width, causal)
  if cross_tokens:
    per_layer += attention_sublayer(cross_tokens, cross_width or width, False)
  per_layer += mlp(tokens, width, dims["mlp_dim"], gated=True, lora_rank=rank)
  return depth * per_layer


def decoder_forward(llm: Mapping[str, Any], tokens: float, *, causal: bool = True,
                    cross_tokens: float = 0, cross_width: Optional[int] = None) -> float:
  """A `decoder.Decoder` (its kwargs `llm`): blocks + the vocabulary projection (logits).

  The token embedding is a lookup and costs nothing; the logits matmul (tied or `lm_head`)
  runs on every position.
  """
  return (decoder_layers(tokens, llm, llm["depth"], causal=causal, cross_tokens=cross_tokens,
                         cross_width=cross_width)
          + dense(tokens, llm["width"], llm["vocab_size"]))


def attention_pool(num_queries: int, tokens: float, width: int) -> float:
  """Learned queries attending over tokens (CoCa's `AttentionPooler`)."""
  return multi_head_attention(num_queries, tokens, width)


def projector(tokens: float, in_width: int, width: int, kind: str = "linear") -> float:
  """`vlm.Projector` (image width -> LM width): one Dense, or Dense-gelu-Dense for "mlp"."""
  flops = dense(tokens, in_width, width)
  if kind == "mlp":
    flops += dense(tokens, width, width)
  return flops


def vit_tokens(num_patches: int, pool_type: str = "map", patch_dropout: float = 0.0,
               train: bool = False) -> int:
  """Tokens the ViT encoder runs on: the kept patches (FLIP, training only) + a class token."""
  tokens = num_patches
  if train and patch_dropout > 0:
    tokens = vit_lib.num_kept_patches(num_patches, patch_dropout)
  return tokens + (pool_type == "tok")


def vit_forward(dims: Mapping[str, int], image_size: int, *, pool_type: str = "map",
                head_dim_out: Optional[int] = None, patch_dropout: float = 0.0,
                train: bool = False, channels: int = 3) -> float:
  """One image through `vit.ViT` (`dims`: `vit.resolve_dims`'s width/depth/mlp_dim/patch_size).

  Patch embedding (a stride-`patch` convolution: a [patch^2 * channels, width] matmul per
  patch), the encoder on the kept tokens, and for pooled outputs the MAP head (a one-query
  attention + MLP) and the optional `proj` to `head_dim_out`.
  """
  width, patch = dims["width"], dims["patch_size"]
  num_patches = (image_size // patch) ** 2
  tokens = vit_tokens(num_patches, pool_type, patch_dropout, train)
  flops = dense(num_patches, patch * patch * channels, width)
  flops += encoder_layers(tokens, width, dims["depth"], dims["mlp_dim"])
  if pool_type == "none":
    return flops
  if pool_type == "map":
    flops += multi_head_attention(1, tokens, width) + mlp(1, width, dims["mlp_dim"])
  if head_dim_out is not None:
    flops += dense(1, width, head_dim_out)
  return flops


def vit_module_forward(vit_module, image_size: int, train: bool = False) -> float:
  """`vit_forward` with the settings of a (detached) `vit.ViT` module."""
  return vit_forward(vit_module.dims, image_size, pool_type=vit_module.pool_type,
                     head_dim_out=vit_module.head_dim_out,
                     patch_dropout=vit_module.patch_dropout, train=train)


def text_encoder_forward(text_module, length: int) -> float:
  """One text of `length` tokens through a (detached) `text.TextEncoder`: blocks + `head`."""
  dims = text_module.dims
  flops = encoder_layers(length, dims["width"], dims["depth"], dims["mlp_dim"],
                         causal=text_module.causal)
  if text_module.out_dim is not None:
    flops += dense(1, dims["width"], text_module.out_dim)
  return flops


def scaled(components: Mapping[str, float], factor: float) -> Dict[str, float]:
  """Every component times `factor` (per example -> per batch, forward -> training)."""
  return {name: float(value) * factor for name, value in components.items()}


# ------------------------------------------------------------------------------ per step


def with_total(components: Mapping[str, float]) -> Dict[str, float]:
  """`components` plus their sum under "total" (an existing "total" is recomputed)."""
  out = {name: float(value) for name, value in components.items() if name != TOTAL}
  out[TOTAL] = sum(out.values())
  return out


def step_model_flops(family, batch_size: int) -> Dict[str, float]:
  """Training model FLOPs of one step on `batch_size` examples, per component and "total".

  Examples are image-text pairs, or packed rows for prefix-LM families. 3 x the family's
  `forward_flops(batch_size)` (forward + backward; rematerialisation excluded).
  """
  if batch_size <= 0:
    raise ValueError(f"step_model_flops needs batch_size > 0, got {batch_size}.")
  forward = getattr(family, "forward_flops", None)
  if forward is None:
    raise TypeError(f"Model family {type(family).__name__} has no forward_flops(batch_size): "
                    "its model FLOPs are unknown.")
  return with_total(scaled(forward(batch_size), TRAIN_MULTIPLIER))


# --------------------------------------------------------------------- traced-program count


def sub_jaxprs(value) -> list:
  """The jaxprs inside an equation parameter (a body, a list of branches, ...)."""
  values = value if isinstance(value, (tuple, list)) else (value,)
  found = []
  for v in values:
    if isinstance(v, jax_core.ClosedJaxpr):
      found.append(v.jaxpr)
    elif isinstance(v, jax_core.Jaxpr):
      found.append(v)
  return found


def dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
  # Each output element is a dot product over (input features / groups) x kernel window.
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features


def matmul_flops(jaxpr) -> float:
  """FLOPs of the matrix multiplications and convolutions of a (closed) jaxpr, in total.

  Scan bodies count `length` times, cond branches by the costliest one, shard_map bodies
  once per shard, rematerialised (checkpointed) computations as often as they appear in the
  differentiated program. A `while_loop` body counts once: its trip count is not static.
  Element-wise work is left out (a few percent of a transformer's).
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += dot_flops(eqn)
      continue
    if name == "conv_general_dilated":
      total += _conv_flops(eqn)
      continue
    inner = [j for v in eqn.params.values() for j in sub_jaxprs(v)]
    if not inner:
      continue
    if name == "cond":
      total += max(matmul_flops(j) for j in inner)
      continue
    flops = sum(matmul_flops(j) for j in inner)
    if name == "scan":
      flops *= eqn.params["length"]
    elif name == "shard_map":
      mesh = eqn.params["mesh"]
      manual = eqn.params.get("newly_manual_axes", eqn.params.get("axis_names"))
      flops *= math.prod(mesh.shape[a] for a in (manual or mesh.axis_names))
    total += flops
  return total
