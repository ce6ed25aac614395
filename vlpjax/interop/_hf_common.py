"""What HF SigLIP and HF CLIP conversions share: encoder layouts, tower kwargs, config checks.

Both HF models build their towers from the same pre-LN encoder layer (`self_attn.{q,k,v,
out}_proj`, `mlp.fc{1,2}`, `layer_norm{1,2}`), which vlpjax's `layers.Encoder` mirrors, so
`Reader` / `Writer` convert an encoder subtree for either; the model-specific modules
(`hf_siglip`, `hf_clip`) only place the embeddings, pooling and projections.

Layout changes: torch `Linear` weights are (out, in) where Flax kernels are (in, out);
attention kernels split the width into (heads, head_dim); the conv kernel goes OIHW -> HWIO.
Arrays are numpy float32 both ways.

Scanned towers (`scan_layers=True`: an encoder's blocks stacked under `scanned`) export as the
unscanned ones with the same weights do (`Writer.encoder` unstacks them); `Reader` builds
unscanned trees, which `with_layer_layout` stacks for a scanned model.
"""
import math
import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np
from flax import linen as nn

from vlpjax.models import layers
from vlpjax.models import scan_util
from vlpjax.models.text import TextEncoder
from vlpjax.models.vit import ViT

Params = Dict[str, Any]
StateDict = Dict[str, np.ndarray]

# The vlpjax vocabulary's special ids (seqio convention): written into exported HF configs.
PAD_ID = 0
EOS_ID = 1
HIDDEN_ACT = "gelu_pytorch_tanh"  # HF's name for `layers.MlpBlock`'s tanh-approximated gelu.

# Non-persistent buffers that some exports still carry; they hold no weights.
_IGNORED_KEYS = re.compile(r".*position_ids$")


def config_dict(hf_config) -> Dict[str, Any]:
  """An HF config object (or its `to_dict()`) as a plain nested dict."""
  return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)


def as_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor (maybe bf16, which numpy lacks).
    value = value.detach().float().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def unbox(params) -> Params:
  """Plain nested dicts of arrays (drops Flax partitioning boxes, FrozenDicts)."""
  return nn.unbox(dict(params)) if params else {}


def qkv_to_flax(weight, bias, num_heads):
  width_in = weight.shape[1]
  return {"kernel": weight.T.reshape(width_in, num_heads, -1),
          "bias": bias.reshape(num_heads, -1)}


def out_to_flax(weight, bias, num_heads):
  width_out = weight.shape[0]
  return {"kernel": weight.T.reshape(num_heads, -1, width_out), "bias": bias}


def qkv_to_hf(p: Params):
  kernel = np.asarray(p["kernel"])
  return kernel.reshape(kernel.shape[0], -1).T, np.asarray(p["bias"]).reshape(-1)


def out_to_hf(p: Params):
  kernel = np.asarray(p["kernel"])
  return kernel.reshape(-1, kernel.shape[-1]).T, np.asarray(p["bias"])


def conv_to_flax(weight: np.ndarray) -> np.ndarray:
  return weight.transpose(2, 3, 1, 0)  # torch OIHW -> flax HWIO.


def conv_to_hf(kernel) -> np.ndarray:
  return np.asarray(kernel).transpose(3, 2, 0, 1)


class Reader:
  """Pops HF arrays by key so that unconverted leftovers can be reported."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self.remaining = {k: v for k, v in state_dict.items()
                      if not _IGNORED_KEYS.match(k)}

  def has_prefix(self, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in self.remaining)

  def pop(self, key: str) -> np.ndarray:
    if key not in self.remaining:
      raise ValueError(f"HF state dict has no {key!r}.")
    return as_numpy(self.remaining.pop(key))

  def layer_norm(self, prefix: str) -> Params:
    return {"scale": self.pop(f"{prefix}.weight"), "bias": self.pop(f"{prefix}.bias")}

  def linear(self, prefix: str, bias: bool = True) -> Params:
    params = {"kernel": self.pop(f"{prefix}.weight").T}
    if bias:
      params["bias"] = self.pop(f"{prefix}.bias")
    return params

  def attention(self, prefix: str, num_heads: int) -> Params:
    params = {name: qkv_to_flax(self.pop(f"{prefix}.{name}.weight"),
                                self.pop(f"{prefix}.{name}.bias"), num_heads)
              for name in ("q_proj", "k_proj", "v_proj")}
    params["out_proj"] = out_to_flax(self.pop(f"{prefix}.out_proj.weight"),
                                     self.pop(f"{prefix}.out_proj.bias"), num_heads)
    return params

  def mlp(self, prefix: str) -> Params:
    return {"fc1": self.linear(f"{prefix}.fc1"), "fc2": self.linear(f"{prefix}.fc2")}

  def encoder(self, prefix: str, final_norm: str, num_heads: int) -> Params:
    params = {}
    i = 0
    while self.has_prefix(f"{prefix}.encoder.layers.{i}."):
      layer = f"{prefix}.encoder.layers.{i}"
      params[f"layers_{i}"] = {
          "layer_norm1": self.layer_norm(f"{layer}.layer_norm1"),
          "self_attn": self.attention(f"{layer}.self_attn", num_heads),
          "layer_norm2": self.layer_norm(f"{layer}.layer_norm2"),
          "mlp": self.mlp(f"{layer}.mlp"),
      }
      i += 1
    params["encoder_norm"] = self.layer_norm(f"{prefix}.{final_norm}")
    return params

  def text_tower(self, num_heads: int) -> Params:
    """HF `text_model` embeddings and encoder (both SigLIP and CLIP name them so)."""
    p = "text_model"
    return {
        "token_embedding": {
            "embedding": self.pop(f"{p}.embeddings.token_embedding.weight")},
        "position_embedding": {
            "embedding": self.pop(f"{p}.embeddings.position_embedding.weight")},
        "encoder": self.encoder(p, "final_layer_norm", num_heads),
    }

  def check_done(self) -> None:
    if self.remaining:
      raise ValueError(f"Unconverted HF weights: {sorted(self.remaining)}")


class Writer:
  """Builds an HF state dict from vlpjax param subtrees."""

  def __init__(self):
    self.state: StateDict = {}

  def put(self, key: str, value) -> None:
    self.state[key] = np.asarray(value, dtype=np.float32)

  def layer_norm(self, prefix: str, p: Params) -> None:
    self.put(f"{prefix}.weight", p["scale"])
    self.put(f"{prefix}.bias", p["bias"])

  def linear(self, prefix: str, p: Params, bias: bool = True) -> None:
    """An HF `Linear`; `bias` says whether the HF layer has one.

    A vlpjax layer without a bias exports as an exact zero bias; one with a bias cannot go
    where HF has none.
    """
    kernel = np.asarray(p["kernel"])
    self.put(f"{prefix}.weight", kernel.T)
    if bias:
      self.put(f"{prefix}.bias", p["bias"] if "bias" in p else np.zeros(kernel.shape[-1]))
    elif "bias" in p:
      raise ValueError(f"HF {prefix} has no bias but the vlpjax layer has one (train with "
                       f"proj_bias / head_bias False to export it).")

  def identity(self, prefix: str, width: int) -> None:
    """A bias-free HF `Linear` that changes nothing (a vlpjax tower without projection)."""
    self.put(f"{prefix}.weight", np.eye(width))

  def attention(self, prefix: str, p: Params) -> None:
    for name in ("q_proj", "k_proj", "v_proj"):
      weight, bias = qkv_to_hf(p[name])
      self.put(f"{prefix}.{name}.weight", weight)
      self.put(f"{prefix}.{name}.bias", bias)
    weight, bias = out_to_hf(p["out_proj"])
    self.put(f"{prefix}.out_proj.weight", weight)
    self.put(f"{prefix}.out_proj.bias", bias)

  def mlp(self, prefix: str, p: Params) -> None:
    self.linear(f"{prefix}.fc1", p["fc1"])
    self.linear(f"{prefix}.fc2", p["fc2"])

  def encoder(self, prefix: str, final_norm: str, p: Params) -> None:
    if scan_util.is_scanned(p):  # HF has one module per layer: slice the stacked blocks.
      p = scan_util.unstack_layers(p, where=prefix)
    num_layers = sum(1 for k in p if k.startswith("layers_"))
    for i in range(num_layers):
      layer, lp = f"{prefix}.encoder.layers.{i}", p[f"layers_{i}"]
      self.layer_norm(f"{layer}.layer_norm1", lp["layer_norm1"])
      self.attention(f"{layer}.self_attn", lp["self_attn"])
      self.layer_norm(f"{layer}.layer_norm2", lp["layer_norm2"])
      self.mlp(f"{layer}.mlp", lp["mlp"])
    self.layer_norm(f"{prefix}.{final_norm}", p["encoder_norm"])


def with_layer_layout(params: Params, scan_layers: bool) -> Params:
  """Converted (unscanned) params as a model with `scan_layers` holds them."""
  return scan_util.stack_layers(params) if scan_layers else params


def with_scan_kwarg(model_kwargs: Dict[str, Any], scan_layers: bool) -> Dict[str, Any]:
  """TwoTower kwargs with `scan_layers` (both towers) set when asked; unchanged otherwise."""
  return dict(model_kwargs, scan_layers=True) if scan_layers else model_kwargs


# -- configs -----------------------------------------------------------------------------


def check_hf_tower_config(side: str, c: Mapping[str, Any]) -> None:
  """Refuses an HF tower config whose activation or LayerNorm eps vlpjax does not compute."""
  act = c.get("hidden_act", HIDDEN_ACT)
  if act != HIDDEN_ACT:
    raise ValueError(f"HF {side} hidden_act {act!r} is not supported: vlpjax uses "
                     f"tanh-approximated gelu ({HIDDEN_ACT!r}).")
  eps = c.get("layer_norm_eps", layers.LAYER_NORM_EPS)
  if not math.isclose(eps, layers.LAYER_NORM_EPS):
    raise ValueError(f"HF {side} layer_norm_eps {eps} is not supported: vlpjax uses "
                     f"{layers.LAYER_NORM_EPS}.")
  if c.get("num_channels", 3) != 3:
    raise ValueError(f"HF {side} num_channels {c['num_channels']} is not supported: vlpjax "
                     f"images are RGB.")


def hf_square_size(c: Mapping[str, Any], key: str) -> int:
  """An HF `image_size` / `patch_size`: an int, or a square [n, n]."""
  value = c[key]
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"HF vision {key} {value} is not square; vlpjax ViTs are.")
    value = value[0]
  return int(value)


def resolved_towers(model_kwargs: Mapping[str, Any]) -> Tuple[ViT, TextEncoder, int]:
  """(ViT, TextEncoder, embed_dim) as `TwoTower(**model_kwargs)` would build them.

  Detached module instances: their fields (with defaults filled in) describe the towers
  without creating any parameter. Mirrors `TwoTower.setup`'s choice of projections.
  """
  image = dict(model_kwargs.get("image") or {})
  text = dict(model_kwargs.get("text") or {})
  width = ViT(parent=None, **image).dims["width"]
  embed_dim = model_kwargs.get("embed_dim") or width
  if width != embed_dim:
    image.setdefault("head_dim_out", embed_dim)
  text.setdefault("out_dim", embed_dim)
  return ViT(parent=None, **image), TextEncoder(parent=None, **text), embed_dim


def refuse_unless(ok: bool, key: str, value: Any, why: str) -> None:
  """A ValueError naming the vlpjax model key whose value the HF model cannot express."""
  if not ok:
    raise ValueError(f"config.model.{key}={value!r} cannot be exported: {why}")


def image_grid(image_size: int, patch_size: int) -> int:
  """Patches per side; the image size must be a multiple of the patch size."""
  if image_size <= 0 or image_size % patch_size:
    raise ValueError(f"image_size {image_size} is not a positive multiple of the patch "
                     f"size {patch_size}.")
  return image_size // patch_size


def encoder_config(dims: Mapping[str, int]) -> Dict[str, Any]:
  """The HF encoder fields of one tower (both HF models name them alike)."""
  return dict(hidden_size=dims["width"], intermediate_size=dims["mlp_dim"],
              num_hidden_layers=dims["depth"], num_attention_heads=dims["num_heads"],
              hidden_act=HIDDEN_ACT, layer_norm_eps=layers.LAYER_NORM_EPS,
              attention_dropout=0.0)
