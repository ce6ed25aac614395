"""Hugging Face `SiglipModel` weights <-> vlpjax `TwoTower` params.

vlpjax's submodule names follow HF's, so the conversion is a renaming plus
layout changes: torch `Linear` weights are (out, in) where Flax kernels are
(in, out); attention kernels split the width into (heads, head_dim); the conv
kernel goes OIHW -> HWIO; the pooling head's torch `nn.MultiheadAttention`
packs q/k/v into one `in_proj_weight`. Arrays are numpy float32 both ways.
"""
import math
import re
from typing import Any, Dict, Mapping

import numpy as np
from flax import linen as nn

Params = Dict[str, Any]
StateDict = Dict[str, np.ndarray]

# Non-persistent buffers that some exports still carry; they hold no weights.
_IGNORED_KEYS = re.compile(r".*position_ids$")


def _config_dict(hf_config) -> Dict[str, Any]:
  """A SiglipConfig (or its `to_dict()`) as a plain nested dict."""
  return hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)


def _as_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor (maybe bf16, which numpy lacks).
    value = value.detach().float().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


class _Reader:
  """Pops HF arrays by key so that unconverted leftovers can be reported."""

  def __init__(self, state_dict: Mapping[str, Any]):
    self.remaining = {k: v for k, v in state_dict.items()
                      if not _IGNORED_KEYS.match(k)}

  def has_prefix(self, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in self.remaining)

  def pop(self, key: str) -> np.ndarray:
    if key not in self.remaining:
      raise KeyError(f"HF state dict has no {key!r}.")
    return _as_numpy(self.remaining.pop(key))

  def layer_norm(self, prefix: str) -> Params:
    return {"scale": self.pop(f"{prefix}.weight"), "bias": self.pop(f"{prefix}.bias")}

  def linear(self, prefix: str) -> Params:
    return {"kernel": self.pop(f"{prefix}.weight").T,
            "bias": self.pop(f"{prefix}.bias")}

  def attention(self, prefix: str, num_heads: int) -> Params:
    params = {name: _qkv_to_flax(self.pop(f"{prefix}.{name}.weight"),
                                 self.pop(f"{prefix}.{name}.bias"), num_heads)
              for name in ("q_proj", "k_proj", "v_proj")}
    params["out_proj"] = _out_to_flax(self.pop(f"{prefix}.out_proj.weight"),
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


def _qkv_to_flax(weight, bias, num_heads):
  width_in = weight.shape[1]
  return {"kernel": weight.T.reshape(width_in, num_heads, -1),
          "bias": bias.reshape(num_heads, -1)}


def _out_to_flax(weight, bias, num_heads):
  width_out = weight.shape[0]
  return {"kernel": weight.T.reshape(num_heads, -1, width_out), "bias": bias}


def _vision_from_hf(reader: _Reader, num_heads: int) -> Params:
  p = "vision_model"
  params = {
      # torch conv OIHW -> flax HWIO.
      "patch_embedding": {
          "kernel": reader.pop(f"{p}.embeddings.patch_embedding.weight"
                               ).transpose(2, 3, 1, 0),
          "bias": reader.pop(f"{p}.embeddings.patch_embedding.bias")},
      "position_embedding": {
          "embedding": reader.pop(f"{p}.embeddings.position_embedding.weight")},
      "encoder": reader.encoder(p, "post_layernorm", num_heads),
  }
  if reader.has_prefix(f"{p}.head."):
    h = f"{p}.head"
    q, k, v = np.split(reader.pop(f"{h}.attention.in_proj_weight"), 3, axis=0)
    qb, kb, vb = np.split(reader.pop(f"{h}.attention.in_proj_bias"), 3, axis=0)
    params["head"] = {
        "probe": reader.pop(f"{h}.probe"),
        "attention": {
            "q_proj": _qkv_to_flax(q, qb, num_heads),
            "k_proj": _qkv_to_flax(k, kb, num_heads),
            "v_proj": _qkv_to_flax(v, vb, num_heads),
            "out_proj": _out_to_flax(reader.pop(f"{h}.attention.out_proj.weight"),
                                     reader.pop(f"{h}.attention.out_proj.bias"),
                                     num_heads),
        },
        "layernorm": reader.layer_norm(f"{h}.layernorm"),
        "mlp": reader.mlp(f"{h}.mlp"),
    }
  return params


def _text_from_hf(reader: _Reader, num_heads: int) -> Params:
  p = "text_model"
  return {
      "token_embedding": {
          "embedding": reader.pop(f"{p}.embeddings.token_embedding.weight")},
      "position_embedding": {
          "embedding": reader.pop(f"{p}.embeddings.position_embedding.weight")},
      "encoder": reader.encoder(p, "final_layer_norm", num_heads),
      "head": reader.linear(f"{p}.head"),
  }


def params_from_hf_siglip(state_dict: Mapping[str, Any], hf_config) -> Params:
  """HF `SiglipModel.state_dict()` -> `TwoTower` params {img, txt, logit_*}.

  `hf_config` (a `SiglipConfig` or its dict) supplies the head counts, which
  the (E, E) projection weights do not reveal. Either tower may be absent (a
  vision-only or text-only export); any other unconverted key is an error.
  """
  cfg = _config_dict(hf_config)
  reader = _Reader(state_dict)
  params: Params = {}
  if reader.has_prefix("vision_model."):
    params["img"] = _vision_from_hf(
        reader, cfg["vision_config"]["num_attention_heads"])
  if reader.has_prefix("text_model."):
    params["txt"] = _text_from_hf(reader, cfg["text_config"]["num_attention_heads"])
  for name in ("logit_scale", "logit_bias"):
    if name in reader.remaining:
      params[name] = reader.pop(name).reshape(())
  if reader.remaining:
    raise ValueError(f"Unconverted HF weights: {sorted(reader.remaining)}")
  return params


class _Writer:
  """Builds an HF state dict from vlpjax param subtrees."""

  def __init__(self):
    self.state: StateDict = {}

  def put(self, key: str, value) -> None:
    self.state[key] = np.asarray(value, dtype=np.float32)

  def layer_norm(self, prefix: str, p: Params) -> None:
    self.put(f"{prefix}.weight", p["scale"])
    self.put(f"{prefix}.bias", p["bias"])

  def linear(self, prefix: str, p: Params) -> None:
    self.put(f"{prefix}.weight", np.asarray(p["kernel"]).T)
    self.put(f"{prefix}.bias", p["bias"])

  def attention(self, prefix: str, p: Params) -> None:
    for name in ("q_proj", "k_proj", "v_proj"):
      weight, bias = _qkv_to_hf(p[name])
      self.put(f"{prefix}.{name}.weight", weight)
      self.put(f"{prefix}.{name}.bias", bias)
    weight, bias = _out_to_hf(p["out_proj"])
    self.put(f"{prefix}.out_proj.weight", weight)
    self.put(f"{prefix}.out_proj.bias", bias)

  def mlp(self, prefix: str, p: Params) -> None:
    self.linear(f"{prefix}.fc1", p["fc1"])
    self.linear(f"{prefix}.fc2", p["fc2"])

  def encoder(self, prefix: str, final_norm: str, p: Params) -> None:
    num_layers = sum(1 for k in p if k.startswith("layers_"))
    for i in range(num_layers):
      layer, lp = f"{prefix}.encoder.layers.{i}", p[f"layers_{i}"]
      self.layer_norm(f"{layer}.layer_norm1", lp["layer_norm1"])
      self.attention(f"{layer}.self_attn", lp["self_attn"])
      self.layer_norm(f"{layer}.layer_norm2", lp["layer_norm2"])
      self.mlp(f"{layer}.mlp", lp["mlp"])
    self.layer_norm(f"{prefix}.{final_norm}", p["encoder_norm"])


def _qkv_to_hf(p: Params):
  kernel = np.asarray(p["kernel"])
  return kernel.reshape(kernel.shape[0], -1).T, np.asarray(p["bias"]).reshape(-1)


def _out_to_hf(p: Params):
  kernel = np.asarray(p["kernel"])
  return kernel.reshape(-1, kernel.shape[-1]).T, np.asarray(p["bias"])


def hf_siglip_from_params(params: Mapping[str, Any]) -> StateDict:
  """`TwoTower` params -> HF `SiglipModel` state dict (numpy float32).

  Params must be unboxed (plain arrays) and shaped as HF SigLIP is: learned
  position embeddings, MAP pooling, no image projection.
  """
  params = _unbox(params)
  unsupported = {"proj", "cls"} & set(params.get("img", {}))
  if unsupported:
    raise ValueError(f"HF SigLIP has no image-tower {sorted(unsupported)}.")
  w = _Writer()
  if "img" in params:
    img, p = params["img"], "vision_model"
    w.put(f"{p}.embeddings.patch_embedding.weight",
          np.asarray(img["patch_embedding"]["kernel"]).transpose(3, 2, 0, 1))
    w.put(f"{p}.embeddings.patch_embedding.bias", img["patch_embedding"]["bias"])
    w.put(f"{p}.embeddings.position_embedding.weight",
          img["position_embedding"]["embedding"])
    w.encoder(p, "post_layernorm", img["encoder"])
    if "head" in img:
      head, h = img["head"], f"{p}.head"
      w.put(f"{h}.probe", head["probe"])
      packed = [_qkv_to_hf(head["attention"][n]) for n in ("q_proj", "k_proj", "v_proj")]
      w.put(f"{h}.attention.in_proj_weight", np.concatenate([x[0] for x in packed]))
      w.put(f"{h}.attention.in_proj_bias", np.concatenate([x[1] for x in packed]))
      weight, bias = _out_to_hf(head["attention"]["out_proj"])
      w.put(f"{h}.attention.out_proj.weight", weight)
      w.put(f"{h}.attention.out_proj.bias", bias)
      w.layer_norm(f"{h}.layernorm", head["layernorm"])
      w.mlp(f"{h}.mlp", head["mlp"])
  if "txt" in params:
    txt, p = params["txt"], "text_model"
    w.put(f"{p}.embeddings.token_embedding.weight", txt["token_embedding"]["embedding"])
    w.put(f"{p}.embeddings.position_embedding.weight",
          txt["position_embedding"]["embedding"])
    w.encoder(p, "final_layer_norm", txt["encoder"])
    w.linear(f"{p}.head", txt["head"])
  for name in ("logit_scale", "logit_bias"):
    if name in params:
      w.put(name, np.reshape(params[name], (1,)))
  return w.state


def _unbox(params):
  """Plain nested dicts of arrays (drops Flax partitioning boxes, FrozenDicts)."""
  return nn.unbox(dict(params)) if params else {}


def twotower_kwargs_from_hf_config(hf_config) -> Dict[str, Any]:
  """`TwoTower` kwargs matching an HF `SiglipConfig` (or its dict)."""
  cfg = _config_dict(hf_config)
  vis, txt = cfg["vision_config"], cfg["text_config"]
  for side, c in (("vision", vis), ("text", txt)):
    if c.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
      raise ValueError(f"HF {side} hidden_act {c['hidden_act']!r} is not "
                       f"supported: vlpjax uses tanh-approximated gelu.")
    if not math.isclose(c.get("layer_norm_eps", 1e-6), 1e-6):
      raise ValueError(f"HF {side} layer_norm_eps {c['layer_norm_eps']} is not "
                       f"supported: vlpjax uses 1e-6.")
  if not vis.get("vision_use_head", True):
    raise ValueError("HF vision_use_head=False has no pooled image embedding.")
  embed_dim = txt.get("projection_size") or txt["hidden_size"]
  if embed_dim != vis["hidden_size"]:
    raise ValueError(f"Text projection_size {embed_dim} != vision hidden_size "
                     f"{vis['hidden_size']}: not a SigLIP two-tower.")
  return dict(
      image=dict(width=vis["hidden_size"], depth=vis["num_hidden_layers"],
                 mlp_dim=vis["intermediate_size"],
                 num_heads=vis["num_attention_heads"],
                 patch_size=vis["patch_size"], pool_type="map", posemb="learn"),
      text=dict(vocab_size=txt["vocab_size"], width=txt["hidden_size"],
                depth=txt["num_hidden_layers"], mlp_dim=txt["intermediate_size"],
                num_heads=txt["num_attention_heads"],
                max_len=txt["max_position_embeddings"], pool_type="last",
                out_dim=embed_dim),
      embed_dim=embed_dim,
      temperature_init=math.log(10.),
      bias_init=-10.,
  )
