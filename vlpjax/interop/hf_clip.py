"""Hugging Face `CLIPModel` weights and config <-> vlpjax `TwoTower` params and kwargs.

A CLIP-shaped TwoTower: image tower `pool_type="tok"`, `pre_norm=True`, bias-free `proj`
(`proj_bias=False`); text tower `causal=True`, `pool_type="eos"` with the vocabulary's
`eos_id`, bias-free `head` (`head_bias=False`); no logit bias (`bias_init=None`).

Where the layouts differ, the conversion folds exactly:
- Class token. HF adds `position_embedding` row 0 to `class_embedding`; vlpjax prepends
  `cls` after the patches got their position embeddings. Import: cls = class_embedding +
  pos[0]; export: class_embedding = cls, pos[0] = 0.
- Patch bias. HF's patch conv has no bias; vlpjax's does, and it is added to every patch
  token just like the patch position embeddings: export adds it to rows 1.. of HF's
  position table, import sets it to zero.
- Projections. HF always has bias-free `visual_projection` / `text_projection`; a vlpjax
  tower without a projection exports an identity one. Import always keeps them
  (`head_dim_out` / `out_dim` = `projection_dim`), even when square: they are learned.

Text pooling (transformers 5.x `CLIPTextModel`): the first position holding
`eos_token_id`, unless `eos_token_id == 2`, the legacy configs of the original OpenAI
checkpoints, which pool the position of the largest token id instead (their EOT token is
the last of the vocabulary). vlpjax `pool_type="eos"` pools the first `eos_id`, so import
maps the legacy case to `eos_id = vocab_size - 1` (the same position whenever the text
contains that token, as tokenized CLIP texts do) and export refuses `eos_id == 2`. Texts
without any EOS differ: HF pools position 0, vlpjax the last position.
"""
import math
from typing import Any, Dict, Mapping

import numpy as np

from vlpjax.interop import _hf_common as common

Params = common.Params
StateDict = common.StateDict

# transformers' CLIPTextModel switches to argmax-of-id pooling for this eos_token_id.
LEGACY_EOS_TOKEN_ID = 2


def _vision_from_hf(reader: common.Reader, num_heads: int) -> Params:
  p = "vision_model"
  pos = reader.pop(f"{p}.embeddings.position_embedding.weight")
  cls = reader.pop(f"{p}.embeddings.class_embedding")
  kernel = common.conv_to_flax(reader.pop(f"{p}.embeddings.patch_embedding.weight"))
  return {
      "patch_embedding": {"kernel": kernel,
                          "bias": np.zeros(kernel.shape[-1], np.float32)},
      "position_embedding": {"embedding": pos[1:]},
      "cls": (cls + pos[0]).reshape(1, 1, -1),
      "pre_layernorm": reader.layer_norm(f"{p}.pre_layrnorm"),
      "encoder": reader.encoder(p, "post_layernorm", num_heads),
  }


def params_from_hf_clip(state_dict: Mapping[str, Any], hf_config, *,
                        scan_layers: bool = False) -> Params:
  """HF `CLIPModel.state_dict()` -> `TwoTower` params {img, txt, logit_scale}.

  `hf_config` (a `CLIPConfig` or its dict) supplies the head counts. Either tower may be
  absent; any other unconverted key is an error. `scan_layers=True` stacks each encoder's
  blocks as a `scan_layers` model holds them.
  """
  cfg = common.config_dict(hf_config)
  reader = common.Reader(state_dict)
  params: Params = {}
  if reader.has_prefix("vision_model."):
    params["img"] = _vision_from_hf(reader, cfg["vision_config"]["num_attention_heads"])
    if "visual_projection.weight" in reader.remaining:
      params["img"]["proj"] = reader.linear("visual_projection", bias=False)
  if reader.has_prefix("text_model."):
    params["txt"] = reader.text_tower(cfg["text_config"]["num_attention_heads"])
    if "text_projection.weight" in reader.remaining:
      params["txt"]["head"] = reader.linear("text_projection", bias=False)
  if "logit_scale" in reader.remaining:
    params["logit_scale"] = reader.pop("logit_scale").reshape(())
  reader.check_done()
  return common.with_layer_layout(params, scan_layers)


def hf_clip_from_params(params: Mapping[str, Any]) -> StateDict:
  """`TwoTower` params (boxed or not) of a CLIP-shaped model -> HF `CLIPModel` state dict."""
  params = common.unbox(params)
  if "logit_bias" in params:
    raise ValueError("HF CLIP has no logit_bias; these params have one (bias_init is set).")
  w = common.Writer()
  if "img" in params:
    img, p = params["img"], "vision_model"
    missing = {"cls", "pre_layernorm", "position_embedding"} - set(img)
    if missing or "head" in img:
      raise ValueError(f"Not a CLIP image tower (HF CLIP needs pool_type='tok', "
                       f"pre_norm=True and posemb='learn'): params lack {sorted(missing)}"
                       f"{' and have a MAP head' if 'head' in img else ''}.")
    pos = np.asarray(img["position_embedding"]["embedding"])
    width = pos.shape[-1]
    w.put(f"{p}.embeddings.patch_embedding.weight",
          common.conv_to_hf(img["patch_embedding"]["kernel"]))
    w.put(f"{p}.embeddings.class_embedding", np.reshape(img["cls"], (width,)))
    patch_pos = pos + np.asarray(img["patch_embedding"]["bias"])[None]
    w.put(f"{p}.embeddings.position_embedding.weight",
          np.concatenate([np.zeros((1, width)), patch_pos]))
    w.layer_norm(f"{p}.pre_layrnorm", img["pre_layernorm"])
    w.encoder(p, "post_layernorm", img["encoder"])
    if "proj" in img:
      w.linear("visual_projection", img["proj"], bias=False)
    else:
      w.identity("visual_projection", width)
  if "txt" in params:
    txt, p = params["txt"], "text_model"
    table = np.asarray(txt["token_embedding"]["embedding"])
    w.put(f"{p}.embeddings.token_embedding.weight", table)
    w.put(f"{p}.embeddings.position_embedding.weight",
          txt["position_embedding"]["embedding"])
    w.encoder(p, "final_layer_norm", txt["encoder"])
    if "head" in txt:
      w.linear("text_projection", txt["head"], bias=False)
    else:
      w.identity("text_projection", table.shape[-1])
  if "logit_scale" in params:
    w.put("logit_scale", np.reshape(params["logit_scale"], ()))
  return w.state


def twotower_kwargs_from_hf_clip_config(hf_config, *, scan_layers: bool = False
                                        ) -> Dict[str, Any]:
  """`TwoTower` kwargs matching an HF `CLIPConfig` (or its dict).

  Refuses what vlpjax does not compute: activations other than tanh-gelu (the OpenAI
  checkpoints' `quick_gelu`), LayerNorm eps other than 1e-6, no `eos_token_id`.
  `scan_layers=True` adds `scan_layers=True` (both towers scanned).
  """
  cfg = common.config_dict(hf_config)
  vis, txt = cfg["vision_config"], cfg["text_config"]
  common.check_hf_tower_config("vision", vis)
  common.check_hf_tower_config("text", txt)
  projection_dim = cfg.get("projection_dim") or vis.get("projection_dim")
  eos = txt.get("eos_token_id")
  if not isinstance(eos, int):
    raise ValueError(f"HF CLIP text eos_token_id {eos!r}: one token id is needed, the "
                     f"text is pooled where it appears.")
  if eos == LEGACY_EOS_TOKEN_ID:
    eos = txt["vocab_size"] - 1  # See the module doc: argmax-of-id pooling.
  kwargs = dict(
      image=dict(width=vis["hidden_size"], depth=vis["num_hidden_layers"],
                 mlp_dim=vis["intermediate_size"], num_heads=vis["num_attention_heads"],
                 patch_size=common.hf_square_size(vis, "patch_size"),
                 pool_type="tok", posemb="learn", pre_norm=True,
                 head_dim_out=projection_dim, proj_bias=False),
      text=dict(vocab_size=txt["vocab_size"], width=txt["hidden_size"],
                depth=txt["num_hidden_layers"], mlp_dim=txt["intermediate_size"],
                num_heads=txt["num_attention_heads"],
                max_len=txt["max_position_embeddings"], pool_type="eos", eos_id=eos,
                causal=True, out_dim=projection_dim, head_bias=False),
      embed_dim=projection_dim,
      temperature_init=float(cfg.get("logit_scale_init_value", 2.6592)),
      bias_init=None,
  )
  return common.with_scan_kwarg(kwargs, scan_layers)


def hf_clip_config(model_kwargs: Mapping[str, Any], image_size: int) -> Dict[str, Any]:
  """The HF `config.json` content (model_type "clip") of a CLIP-shaped vlpjax `TwoTower`.

  What HF CLIP cannot compute is a ValueError naming the key (see the module doc for the
  shape it needs). Activation and LayerNorm eps are vlpjax's (`gelu_pytorch_tanh`, 1e-6),
  which HF CLIP configs can express.
  """
  vit, text, embed_dim = common.resolved_towers(model_kwargs)
  vdims, tdims = vit.dims, text.dims
  refuse = common.refuse_unless
  refuse(vit.pool_type == "tok", "image.pool_type", vit.pool_type,
         "HF CLIP pools the image's class token ('tok').")
  refuse(vit.posemb == "learn", "image.posemb", vit.posemb,
         "HF CLIP has learned position embeddings ('learn').")
  refuse(vit.pre_norm, "image.pre_norm", vit.pre_norm,
         "HF CLIP always normalises the tokens before its encoder (pre_norm=True).")
  if vit.head_dim_out is None:
    refuse(vdims["width"] == embed_dim, "embed_dim", embed_dim,
           f"without an image projection it must equal the image width {vdims['width']}.")
  else:
    refuse(not vit.proj_bias, "image.proj_bias", vit.proj_bias,
           "HF CLIP's visual_projection has no bias.")
  refuse(text.pool_type == "eos", "text.pool_type", text.pool_type,
         "HF CLIP pools the text at its first EOS token ('eos', with eos_id).")
  refuse(text.eos_id is not None and text.eos_id != LEGACY_EOS_TOKEN_ID, "text.eos_id",
         text.eos_id, f"HF CLIP needs an EOS id, and reads eos_token_id="
         f"{LEGACY_EOS_TOKEN_ID} as its legacy pooling at the largest token id instead.")
  refuse(text.causal, "text.causal", text.causal,
         "HF CLIP's text attention is causal (causal=True).")
  if text.out_dim is None:
    refuse(tdims["width"] == embed_dim, "text.out_dim", None,
           f"without a text head the text width {tdims['width']} must equal embed_dim "
           f"{embed_dim}.")
  else:
    refuse(text.out_dim == embed_dim, "text.out_dim", text.out_dim,
           f"both towers must project to embed_dim {embed_dim}.")
    refuse(not text.head_bias, "text.head_bias", text.head_bias,
           "HF CLIP's text_projection has no bias.")
  refuse(model_kwargs.get("bias_init", -10.) is None, "bias_init",
         model_kwargs.get("bias_init", -10.), "HF CLIP has no logit bias (bias_init=None).")
  common.image_grid(image_size, vdims["patch_size"])
  return dict(
      architectures=["CLIPModel"],
      model_type="clip",
      projection_dim=embed_dim,
      logit_scale_init_value=float(model_kwargs.get("temperature_init", math.log(10.))),
      vision_config=dict(
          common.encoder_config(vdims), model_type="clip_vision_model",
          projection_dim=embed_dim, num_channels=3, image_size=int(image_size),
          patch_size=vdims["patch_size"]),
      text_config=dict(
          common.encoder_config(tdims), model_type="clip_text_model",
          projection_dim=embed_dim, vocab_size=text.vocab_size,
          max_position_embeddings=text.max_len, pad_token_id=common.PAD_ID,
          bos_token_id=None, eos_token_id=text.eos_id),
  )
