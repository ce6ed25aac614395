"""Two-tower contrastive family (SigLIP / CLIP / LiT): image and text towers, one loss."""
import dataclasses
from typing import Any, Dict

import jax
import jax.numpy as jnp

from vlpjax import config as config_lib
from vlpjax import losses
from vlpjax import models
from vlpjax.families import FAMILIES


def _module_fields(cls):
  return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


@FAMILIES.register("two_tower")
class TwoTowerFamily:
  """Images [B,H,W,3] in [-1,1] and token ids [B,L] -> L2-normalised embeddings."""

  batch_keys = ("image", "texts")

  def __init__(self, config):
    self.config = config
    model_cls = models.get_model(config.model_name)
    model_kwargs = config.model.to_dict()
    config_lib.check_kwargs("config.model", model_kwargs, _module_fields(model_cls))
    for tower, sub_cls in (("image", models.get_model("vit")),
                           ("text", models.get_model("text"))):
      config_lib.check_kwargs(f"config.model.{tower}", model_kwargs.get(tower, {}),
                              _module_fields(sub_cls))
    self.model = model_cls(dtype=jnp.dtype(config.compute_dtype),
                           remat_policy=config.remat_policy, **model_kwargs)
    self.loss_fn = losses.LOSSES.get(config.loss)

  def input_specs(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    size, length = self.config.input.image_size, self.config.input.text_length
    return {
        "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
        "texts": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
    }

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["texts"])["params"]

  def features(self, params, batch, rng) -> Dict[str, Any]:
    del rng  # No stochastic layers in the two-tower model.
    zimg, ztxt, _ = self.model.apply({"params": params}, batch["image"], batch["texts"])
    return {"zimg": zimg, "ztxt": ztxt}

  def features_loss(self, params, features):
    bias = params.get("logit_bias")
    loss, metrics = self.loss_fn(features["zimg"], features["ztxt"],
                                 params["logit_scale"], bias)
    metrics = dict(metrics, temperature=jnp.exp(params["logit_scale"]).reshape(()))
    if bias is not None:
      metrics["bias"] = jnp.reshape(bias, ())
    return loss, metrics

  # Predict functions (evaluators).
  def embed_images(self, params, images):
    zimg, _, _ = self.model.apply({"params": params}, images, None)
    return zimg

  def embed_texts(self, params, texts):
    _, ztxt, _ = self.model.apply({"params": params}, None, texts)
    return ztxt
