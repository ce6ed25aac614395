"""Model families: the small interface through which the one trainer serves every model.

A family turns a config into a Flax module and tells the trainer how to

- `input_specs(batch_size)`: the shapes of a batch (for init and ahead-of-time compilation),
- `init(rng, batch)`: boxed params (with logical axis names),
- `features(params, batch, rng)`: per-example outputs that do not mix examples,
- `features_loss(params, features)`: the loss over a whole batch of features,
- `forward_flops(batch_size)`: analytic forward model FLOPs of a batch per component
  (e.g. {"image_encoder", "decoder"}; `vlpjax.flops.step_model_flops` makes a step's for MFU),
- `input_format`: which batches it reads: "image_text" (`vlpjax.data.pipeline`: image, texts)
  or "prefix_lm" (`vlpjax.data.prefix_lm_pipeline`: packed rows carrying their images),
- optionally `pretrained(params, config) -> params`: weights to start from (e.g. a Hugging Face
  LM), applied when a run starts without a checkpoint,
- and per-family predict functions used by evaluators (`embed_images`, `embed_texts`,
  `caption`, `token_losses`).

Splitting the loss into `features` and `features_loss` is what makes gradient accumulation exact
for losses that couple the batch (contrastive): see `vlpjax/train_step.py`.
"""
import dataclasses
from typing import Any, Dict, Mapping, Sequence

from vlpjax import config as config_lib
from vlpjax.registry import Registry

FAMILIES = Registry("model family")


def module_fields(cls):
  """The config-settable fields of a Flax module class (for checking `config.model` keys)."""
  return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def input_config(config, family):
  """config.input with what the family decides filled in (tokens per image of packed rows).

  Prefix-LM families check the packed-row settings when they are built
  (`check_packed_rows`), before any work.
  """
  data_config = config.input.copy_and_resolve_references()
  if family.input_format == "prefix_lm":
    data_config.tokens_per_image = family.tokens_per_image
  return data_config


def image_text_specs(input_config, batch_size: int) -> Dict[str, Any]:
  """Shapes of an "image_text" batch: images [B, S, S, 3] in [-1, 1], padded token ids [B, L]."""
  import jax  # pylint: disable=g-import-not-at-top  (the registry itself needs no JAX)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  size, length = input_config.image_size, input_config.text_length
  return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
          "texts": jax.ShapeDtypeStruct((batch_size, length), jnp.int32)}


def check_packed_rows(config, tokens_per_image: int) -> None:
  """Fails fast on `config.input` settings that packed prefix-LM rows cannot work with.

  `tokens_per_image` is what the family's image encoder gives per image.
  """
  for key in ("row_length", "max_images_per_row"):
    if config.input.get(key, 0) <= 0:
      raise config_lib.ConfigError(
          f"config.input.{key} must be > 0 for family {config.family!r}, which trains on "
          "packed prefix-LM rows (see vlpjax/data/packing.py).")
  given = config.input.get("tokens_per_image", 0)
  if given and given != tokens_per_image:
    raise config_lib.ConfigError(
        f"config.input.tokens_per_image={given}, but the model's image encoder gives "
        f"{tokens_per_image} tokens per {config.input.image_size} px image; set it to 0 or "
        f"{tokens_per_image}.")


def checked_model_kwargs(config, model_fields: Sequence[str],
                         parts: Mapping[str, Sequence[str]]) -> Dict[str, Any]:
  """`config.model` as a dict, after checking its keys and those of its sub-dicts `parts`.

  A typo in any of them fails before anything is built, naming the nearest valid keys.
  """
  kwargs = config.model.to_dict()
  config_lib.check_kwargs("config.model", kwargs, model_fields)
  for part, allowed in parts.items():
    config_lib.check_kwargs(f"config.model.{part}", kwargs.get(part) or {}, allowed)
  return kwargs


def loss_weights(config, defaults: Mapping[str, float]) -> Dict[str, float]:
  """`config.loss_weights` over a family's `defaults`; unknown keys -> ConfigError."""
  given = config.get("loss_weights", None) or {}
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
  config_lib.check_kwargs("config.loss_weights", given, list(defaults))
  return {k: float(given.get(k, v)) for k, v in defaults.items()}


def get_family(config):
  """The family named by `config.family`, built for this config."""
  # Importing registers the built-in families; kept local so the registry has no model deps.
  # pylint: disable=g-import-not-at-top,unused-import
  from vlpjax.families import coca, document, two_tower, video, vlm
  from vlpjax import chunked_loss  # registers loss "sigmoid_chunked"
  return FAMILIES.get(config.family)(config)
