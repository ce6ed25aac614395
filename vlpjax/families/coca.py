"""CoCa family: a contrastive loss on pooled embeddings plus a captioning loss, one model.

Batches are the two-tower ones ({image, texts}: zero-padded token rows with no EOS); the
caption targets are built from `texts` here (`models.coca.caption_targets`).

loss = loss_weights.contrastive * contrastive (config.loss: 'softmax' as in CoCa, or
       'sigmoid') + loss_weights.caption * (token cross-entropy summed over the weighted
       targets / their number)

Gradient accumulation stays exact: `features` holds the embeddings and per-example caption
loss and weight sums, and `features_loss` combines them over the whole batch.
"""
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp

from vlpjax import decoding
from vlpjax import families
from vlpjax import flops
from vlpjax import losses
from vlpjax.families import (FAMILIES, checked_model_kwargs, image_text_specs,
                             module_fields)
from vlpjax.models import coca as coca_lib
from vlpjax.models.vit import ViT

# Weights of the two losses; 2.0 on captioning is the paper's (lambda_Cap = 2 lambda_Con).
DEFAULT_LOSS_WEIGHTS = {"contrastive": 1.0, "caption": 2.0}


def loss_weights(config) -> Dict[str, float]:
  """`config.loss_weights` over the defaults; unknown keys -> ConfigError."""
  return families.loss_weights(config, DEFAULT_LOSS_WEIGHTS)


@FAMILIES.register("coca")
class CoCaFamily:
  """Images [B,H,W,3] in [-1,1] and token ids [B,L] -> embeddings and caption logits."""

  input_format = "image_text"
  batch_keys = ("image", "texts")

  def __init__(self, config):
    self.config = config
    model_kwargs = checked_model_kwargs(
        config, module_fields(coca_lib.CoCa),
        {"image": module_fields(ViT), "text": list(coca_lib.TEXT_DEFAULTS)})
    self.model = coca_lib.CoCa(dtype=jnp.dtype(config.compute_dtype),
                               remat_policy=config.remat_policy,
                               attention_impl=config.attention_impl,
                               norm_impl=config.norm_impl, **model_kwargs)
    self.loss_fn = losses.LOSSES.get(config.loss)
    self.loss_weights = loss_weights(config)

  def input_specs(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    return image_text_specs(self.config.input, batch_size)

  def init(self, rng, batch):
    params_rng, dropout_rng = jax.random.split(rng)
    return self.model.init({"params": params_rng, "dropout": dropout_rng},
                           batch["image"], batch["texts"])["params"]

  def features(self, params, batch, rng) -> Dict[str, Any]:
    out = self.model.apply({"params": params}, batch["image"], batch["texts"], train=True,
                           rngs={"dropout": rng})
    _, targets, weights = coca_lib.caption_targets(batch["texts"])
    return {"zimg": out["zimg"], "ztxt": out["ztxt"],
            **losses.token_statistics(out["logits"], targets, weights)}

  def features_loss(self, params, features):
    bias = params.get("logit_bias")
    contrastive, metrics = self.loss_fn(features["zimg"], features["ztxt"],
                                        params["logit_scale"], bias)
    num_tokens = jnp.maximum(jnp.sum(features["weight_sum"]), 1.0)
    caption = jnp.sum(features["loss_sum"]) / num_tokens
    weights = self.loss_weights
    loss = weights["contrastive"] * contrastive + weights["caption"] * caption
    # The contrastive loss's own `loss` would shadow the total under the trainer's key.
    metrics = {k: v for k, v in metrics.items() if not k.startswith("loss")}
    metrics.update(contrastive_loss=contrastive, caption_loss=caption,
                   token_accuracy=jnp.sum(features["correct_sum"]) / num_tokens)
    return loss, metrics

  def forward_flops(self, batch_size: int) -> Dict[str, float]:
    """Forward model FLOPs of `batch_size` image-text pairs per part (`vlpjax.flops`).

    image_encoder: the ViT (train=True: patch dropping counts), both poolers and `img_proj`;
    text_encoder: the causal unimodal decoder over [BOS, text] + cls and `txt_proj`;
    decoder: the causal multimodal decoder, cross-attending to the caption tokens, + logits.
    """
    model, length = self.model, self.config.input.text_length
    text = model.settings
    vit = ViT(parent=None, **{**dict(model.image or {}), "pool_type": "none"})
    width = vit.dims["width"]
    embed_dim = model.embed_dim or text["width"]
    # What the ViT encoder (and so the poolers) sees: the kept patches in training.
    num_patches = (self.config.input.image_size // vit.dims["patch_size"]) ** 2
    image_tokens = flops.vit_tokens(num_patches, "none", vit.patch_dropout, train=True)
    caption_tokens = model.num_caption_queries or image_tokens
    image = (flops.vit_module_forward(vit, self.config.input.image_size, train=True)
             + flops.attention_pool(1, image_tokens, width)
             + flops.dense(1, width, embed_dim))
    if model.num_caption_queries:
      image += flops.attention_pool(model.num_caption_queries, image_tokens, width)
    return flops.scaled({
        "image_encoder": image,
        "text_encoder": (flops.decoder_layers(length + 1, text, text["unimodal_depth"])
                         + flops.dense(1, text["width"], embed_dim)),
        "decoder": (flops.decoder_layers(length, text, text["multimodal_depth"],
                                         cross_tokens=caption_tokens, cross_width=width)
                    + flops.dense(length, text["width"], text["vocab_size"])),
    }, batch_size)

  # Predict functions (evaluators, `vlpjax.predict`).

  def embed_images(self, params, images):
    return self.model.apply({"params": params}, images, method=coca_lib.CoCa.embed_images)

  def embed_texts(self, params, texts):
    return self.model.apply({"params": params}, texts, method=coca_lib.CoCa.embed_texts)

  def caption(self, params, images, *, decode, rng=None):
    """Captions images [B,H,W,3] -> int32 [B, max_decode_len] (0 after EOS; EOS kept).

    The prompt is BOS alone. The image encoding rides in the cache tree next to both KV
    caches, so beam search repeats and reorders it along with them.
    """
    if isinstance(decode, Mapping):
      decode = decoding.DecodeConfig.from_dict(dict(decode))
    max_len = self.model.settings["max_len"]
    if decode.max_decode_len > max_len:
      raise ValueError(f"decode max_decode_len={decode.max_decode_len} exceeds the model's "
                       f"text.max_len={max_len} (the longest caption it is built for); "
                       f"decode with max_decode_len <= {max_len}.")
    model, variables = self.model, {"params": params}
    encoded = model.apply(variables, images, method=coca_lib.CoCa.caption_encoding)
    batch = images.shape[0]
    # BOS takes slot 0 and generated token t slot t + 1; the last token is never fed.
    cache = model.apply(variables, batch, decode.max_decode_len,
                        method=coca_lib.CoCa.init_cache)
    bos = jnp.full((batch, 1), coca_lib.BOS_ID, jnp.int32)
    logits, cache = model.apply(variables, bos, encoded, cache, jnp.int32(0),
                                method=coca_lib.CoCa.decode_tokens)

    def step_fn(tokens, state, t):
      step_logits, kv = model.apply(variables, tokens[:, None], state["encoded"], state["kv"],
                                    t + 1, method=coca_lib.CoCa.decode_tokens)
      return step_logits[:, 0], {"kv": kv, "encoded": state["encoded"]}

    out = decoding.decode(step_fn, logits[:, 0], {"kv": cache, "encoded": encoded},
                          config=decode, rng=rng,
                          cache_batch_axes={"kv": model.cache_batch_axes, "encoded": 0})
    return out["tokens"]
