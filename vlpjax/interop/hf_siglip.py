"""Hugging Face `SiglipModel` weights and config <-> vlpjax `TwoTower` params and kwargs.

vlpjax's submodule names follow HF's, so the conversion is a renaming plus layout changes
(see `_hf_common`); the pooling head's torch `nn.MultiheadAttention` packs q/k/v into one
`in_proj_weight`. Arrays are numpy float32 both ways.

HF SigLIP's text tower pools the last position of whatever it is given (transformers 5.x
`SiglipTextModel`: `last_hidden_state[:, -1]`, full bidirectional attention when no
`attention_mask` is passed), which is what vlpjax's `pool_type="last"` does on its texts
padded with 0 to a fixed length without EOS: feed the same ids as `input_ids`, without an
attention mask.
"""
import math
from typing import Any, Dict, Mapping

import numpy as np

from vlpjax.interop import _hf_common as common

Params = common.Params
StateDict = common.StateDict


def _vision_from_hf(reader: common.Reader, num_heads: int) -> Params:
  p = "vision_model"
  params = {
      "patch_embedding": {
          "kernel": common.conv_to_flax(
              reader.pop(f"{p}.embeddings.patch_embedding.weight")),
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
            "q_proj": common.qkv_to_flax(q, qb, num_heads),
            "k_proj": common.qkv_to_flax(k, kb, num_heads),
            "v_proj": common.qkv_to_flax(v, vb, num_heads),
            "out_proj": common.out_to_flax(
                reader.pop(f"{h}.attention.out_proj.weight"),
                reader.pop(f"{h}.attention.out_proj.bias"), num_heads),
        },
        "layernorm": reader.layer_norm(f"{h}.layernorm"),
        "mlp": reader.mlp(f"{h}.mlp"),
    }
  return params


def _text_from_hf(reader: common.Reader, num_heads: int) -> Params:
  return {**reader.text_tower(num_heads), "head": reader.linear("text_model.head")}


def params_from_hf_siglip(state_dict: Mapping[str, Any], hf_config, *,
                          scan_layers: bool = False) -> Params:
  """HF `SiglipModel.state_dict()` -> `TwoTower` params {img, txt, logit_*}.

  `hf_config` (a `SiglipConfig` or its dict) supplies the head counts, which
  the (E, E) projection weights do not reveal. Either tower may be absent (a
  vision-only or text-only export); any other unconverted key is an error.
  `scan_layers=True` stacks each encoder's blocks as a `scan_layers` model holds them.
  """
  cfg = common.config_dict(hf_config)
  reader = common.Reader(state_dict)
  params: Params = {}
  if reader.has_prefix("vision_model."):
    params["img"] = _vision_from_hf(
        reader, cfg["vision_config"]["num_attention_heads"])
  if reader.has_prefix("text_model."):
    params["txt"] = _text_from_hf(reader, cfg["text_config"]["num_attention_heads"])
  for name in ("logit_scale", "logit_bias"):
    if name in reader.remaining:
      params[name] = reader.pop(name).reshape(())
  reader.check_done()
  return common.with_layer_layout(params, scan_layers)


def hf_siglip_from_params(params: Mapping[str, Any]) -> StateDict:
  """`TwoTower` params -> HF `SiglipModel` state dict (numpy float32).

  Params (boxed or not) must be shaped as HF SigLIP is: learned position embeddings, MAP
  pooling, no image projection, no class token. A text head without bias (`head_bias=False`)
  exports with a zero bias.
  """
  params = common.unbox(params)
  unsupported = {"proj", "cls", "pre_layernorm"} & set(params.get("img", {}))
  if unsupported:
    raise ValueError(f"HF SigLIP has no image-tower {sorted(unsupported)}.")
  w = common.Writer()
  if "img" in params:
    img, p = params["img"], "vision_model"
    w.put(f"{p}.embeddings.patch_embedding.weight",
          common.conv_to_hf(img["patch_embedding"]["kernel"]))
    w.put(f"{p}.embeddings.patch_embedding.bias", img["patch_embedding"]["bias"])
    w.put(f"{p}.embeddings.position_embedding.weight",
          img["position_embedding"]["embedding"])
    w.encoder(p, "post_layernorm", img["encoder"])
    if "head" in img:
      head, h = img["head"], f"{p}.head"
      w.put(f"{h}.probe", head["probe"])
      packed = [common.qkv_to_hf(head["attention"][n])
                for n in ("q_proj", "k_proj", "v_proj")]
      w.put(f"{h}.attention.in_proj_weight", np.concatenate([x[0] for x in packed]))
      w.put(f"{h}.attention.in_proj_bias", np.concatenate([x[1] for x in packed]))
      weight, bias = common.out_to_hf(head["attention"]["out_proj"])
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
    if "head" not in txt:
      raise ValueError("HF SigLIP's text tower always has a `head` projection; these "
                       "params have none (text out_dim=None).")
    w.linear(f"{p}.head", txt["head"])
  for name in ("logit_scale", "logit_bias"):
    if name in params:
      w.put(name, np.reshape(params[name], (1,)))
  return w.state


def twotower_kwargs_from_hf_config(hf_config, *, scan_layers: bool = False
                                   ) -> Dict[str, Any]:
  """`TwoTower` kwargs matching an HF `SiglipConfig` (or its dict); `scan_layers=True` adds
  `scan_layers=True` (both towers scanned)."""
  cfg = common.config_dict(hf_config)
  vis, txt = cfg["vision_config"], cfg["text_config"]
  common.check_hf_tower_config("vision", vis)
  common.check_hf_tower_config("text", txt)
  if not vis.get("vision_use_head", True):
    raise ValueError("HF vision_use_head=False has no pooled image embedding.")
  embed_dim = txt.get("projection_size") or txt["hidden_size"]
  if embed_dim != vis["hidden_size"]:
    raise ValueError(f"Text projection_size {embed_dim} != vision hidden_size "
                     f"{vis['hidden_size']}: not a SigLIP two-tower.")
  kwargs = dict(
      image=dict(width=vis["hidden_size"], depth=vis["num_hidden_layers"],
                 mlp_dim=vis["intermediate_size"],
                 num_heads=vis["num_attention_heads"],
                 patch_size=common.hf_square_size(vis, "patch_size"),
                 pool_type="map", posemb="learn"),
      text=dict(vocab_size=txt["vocab_size"], width=txt["hidden_size"],
                depth=txt["num_hidden_layers"], mlp_dim=txt["intermediate_size"],
                num_heads=txt["num_attention_heads"],
                max_len=txt["max_position_embeddings"], pool_type="last",
                out_dim=embed_dim),
      embed_dim=embed_dim,
      temperature_init=math.log(10.),
      bias_init=-10.,
  )
  return common.with_scan_kwarg(kwargs, scan_layers)


def hf_siglip_config(model_kwargs: Mapping[str, Any], image_size: int) -> Dict[str, Any]:
  """The HF `config.json` content (model_type "siglip") of a vlpjax `TwoTower`.

  `model_kwargs` are the run's `config.model` (TwoTower kwargs; `variant`s resolved to
  sizes), `image_size` its input resolution. What HF SigLIP cannot compute is a ValueError
  naming the key: a text tower not pooling the last position or attending causally, an
  image tower not MAP-pooled, with a class token, fixed position embeddings, a LayerNorm
  before the encoder or a projection (SigLIP embeds in the image width), no learned
  logit bias.
  """
  vit, text, embed_dim = common.resolved_towers(model_kwargs)
  refuse = common.refuse_unless
  refuse(vit.pool_type == "map", "image.pool_type", vit.pool_type,
         "HF SigLIP pools images with its attention head ('map').")
  refuse(vit.posemb == "learn", "image.posemb", vit.posemb,
         "HF SigLIP has learned position embeddings ('learn').")
  refuse(not vit.pre_norm, "image.pre_norm", vit.pre_norm,
         "HF SigLIP has no LayerNorm before the encoder.")
  refuse(vit.head_dim_out is None, "image.head_dim_out", vit.head_dim_out,
         f"HF SigLIP has no image projection: embed_dim ({embed_dim}) must equal the image "
         f"width ({vit.dims['width']}).")
  refuse(text.pool_type == "last", "text.pool_type", text.pool_type,
         "HF SigLIP pools the text's last position ('last').")
  refuse(not text.causal, "text.causal", text.causal,
         "HF SigLIP's text attention is bidirectional.")
  refuse(text.out_dim == embed_dim, "text.out_dim", text.out_dim,
         f"HF SigLIP's text tower always has a head onto the image width ({embed_dim}).")
  refuse(model_kwargs.get("bias_init", -10.) is not None, "bias_init", None,
         "HF SigLIP has a learned logit_bias (sigmoid loss).")
  vdims, tdims = vit.dims, text.dims
  common.image_grid(image_size, vdims["patch_size"])
  return dict(
      architectures=["SiglipModel"],
      model_type="siglip",
      vision_config=dict(
          common.encoder_config(vdims), model_type="siglip_vision_model",
          num_channels=3, image_size=int(image_size), patch_size=vdims["patch_size"],
          vision_use_head=True),
      text_config=dict(
          common.encoder_config(tdims), model_type="siglip_text_model",
          vocab_size=text.vocab_size, max_position_embeddings=text.max_len,
          projection_size=text.out_dim, pad_token_id=common.PAD_ID, bos_token_id=None,
          eos_token_id=text.eos_id if text.eos_id is not None else common.EOS_ID),
  )
