"""Two-tower contrastive family (SigLIP / CLIP / LiT / FLIP): image and text towers, one loss.

FLIP (Li et al. 2023) is this family with `config.model.image.patch_dropout` > 0: training
steps encode only a random subset of each image's patches (a fresh subset every step, drawn
from the step's rng), while evaluation (`embed_images`) sees every patch. The gain is compute,
not regularisation: at 0.5 the image tower processes half the tokens, so a step costs roughly
half and the paper spends the saving on larger batches / more samples seen. FLIP ends with a
short unmasked tuning phase to close the train/eval gap; the ratio changes no parameter, so
that phase is the same workdir resumed with `patch_dropout=0` and a larger `total_steps`.
"""
from typing import Any, Dict

import jax
import jax.numpy as jnp

from vlpjax import flops
from vlpjax import losses
from vlpjax import models
from vlpjax.families import (FAMILIES, checked_model_kwargs, image_text_specs,
                             module_fields)
from vlpjax.models.text import TextEncoder
from vlpjax.models.vit import ViT


@FAMILIES.register("two_tower")
class TwoTowerFamily:
  """Images [B,H,W,3] in [-1,1] and token ids [B,L] -> L2-normalised embeddings."""

  batch_keys = ("image", "texts")
  input_format = "image_text"

  def __init__(self, config):
    self.config = config
    model_cls = models.get_model(config.model_name)
    model_kwargs = checked_model_kwargs(
        config, module_fields(model_cls),
        {"image": module_fields(models.get_model("vit")),
         "text": module_fields(models.get_model("text"))})
    self.model = model_cls(dtype=jnp.dtype(config.compute_dtype),
                           remat_policy=config.remat_policy,
                           attention_impl=config.attention_impl,
                           norm_impl=config.norm_impl, **model_kwargs)
    self.loss_fn = losses.LOSSES.get(config.loss)

  def input_specs(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    return image_text_specs(self.config.input, batch_size)

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["texts"])["params"]

  def features(self, params, batch, rng) -> Dict[str, Any]:
    # train=True: the image tower drops patches when `patch_dropout` > 0 (else a no-op). The
    # mask depends only on `rng`, so the trainer's GradCache re-run of a micro-batch (same
    # rng) sees the same patches as its first pass and the accumulated gradient stays exact.
    zimg, ztxt, _ = self.model.apply({"params": params}, batch["image"], batch["texts"],
                                     train=True, rngs={"dropout": rng})
    return {"zimg": zimg, "ztxt": ztxt}

  def features_loss(self, params, features):
    bias = params.get("logit_bias")
    loss, metrics = self.loss_fn(features["zimg"], features["ztxt"],
                                 params["logit_scale"], bias)
    metrics = dict(metrics, temperature=jnp.exp(params["logit_scale"]).reshape(()))
    if bias is not None:
      metrics["bias"] = jnp.reshape(bias, ())
    return loss, metrics

  def forward_flops(self, batch_size: int) -> Dict[str, float]:
    """Forward model FLOPs of `batch_size` pairs per tower (`vlpjax.flops`).

    Training runs the image tower with `train=True`, so FLIP's patch dropping counts.
    """
    image, text = self._tower_modules()
    inp = self.config.input
    return flops.scaled({
        "image_encoder": flops.vit_module_forward(image, inp.image_size, train=True),
        "text_encoder": flops.text_encoder_forward(text, inp.text_length),
    }, batch_size)

  def _tower_modules(self):
    """Detached ViT / TextEncoder with the heads `TwoTower.setup` gives them."""
    image_kwargs, text_kwargs = dict(self.model.image or {}), dict(self.model.text or {})
    image_width = ViT(parent=None, **image_kwargs).dims["width"]
    embed_dim = self.model.embed_dim or image_width
    if image_width != embed_dim:
      image_kwargs.setdefault("head_dim_out", embed_dim)
    text_kwargs.setdefault("out_dim", embed_dim)
    return ViT(parent=None, **image_kwargs), TextEncoder(parent=None, **text_kwargs)

  # Predict functions (evaluators).
  def embed_images(self, params, images):
    zimg, _, _ = self.model.apply({"params": params}, images, None)
    return zimg

  def embed_texts(self, params, texts):
    _, ztxt, _ = self.model.apply({"params": params}, None, texts)
    return ztxt
