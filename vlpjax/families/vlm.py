"""Prefix-LM VLM family (PaliGemma / LLaVA / VILA): ViT -> projector -> decoder LM.

Batches are packed prefix-LM rows (`vlpjax/data/packing.py`): token features [B, row_length]
and the rows' images [B, max_images_per_row, S, S, 3] in [-1, 1]. The loss is token
cross-entropy on `decoder_loss_weights` (the targets; never the prompt or image tokens),
summed per example in `features` and divided by the batch's target count in
`features_loss`, so gradient accumulation stays exact.

Training stages are config, not code: `optim.freeze` takes one of `FREEZE_BY_STAGE`'s regexes
(LLaVA's projector-only alignment stage, full fine-tuning, or LoRA on the LM with the
projector trained). `config.pretrained.llm_hf_path` starts the LM from a Hugging Face
Llama/Gemma checkpoint (the trainer calls `pretrained` when a run starts from scratch).
"""
import dataclasses
import sys
from typing import Any, Dict, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlpjax import config as config_lib
from vlpjax import decoding
from vlpjax import flops
from vlpjax import losses
from vlpjax.families import (FAMILIES, check_packed_rows, checked_model_kwargs,
                             module_fields)
from vlpjax.models import decoder as decoder_lib
from vlpjax.models import vlm as vlm_lib
from vlpjax.models.vit import ViT

TOKEN_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
              "decoder_causal_attention", "decoder_segment_ids", "decoder_positions")
BOS_ID = 0  # seqio's convention: the pad id starts every decoder sequence.
# Finite, so that log-softmax and beam scores stay finite; exp() of it is exactly 0.
NEVER_LOGIT = -1e9

# `optim.freeze` per training stage (param paths look like `llm/layers/layers_0/...`).
FREEZE_BY_STAGE = {
    "projector": "img/.*|llm/.*",          # LLaVA stage 1: align the projector only
    "full": "",                            # everything trains
    "lora": "img/.*|llm/(?!.*lora).*",     # LoRA adapters of the LM (+ the projector)
}
PRETRAINED_KEYS = ("llm_hf_path",)


def freeze_regex(stage: str, lora_rank: int = 0) -> str:
  """The `optim.freeze` regex of a training stage (`FREEZE_BY_STAGE`)."""
  if stage not in FREEZE_BY_STAGE:
    raise config_lib.ConfigError(f"VLM stage {stage!r} is not one of {list(FREEZE_BY_STAGE)}.")
  if stage == "lora" and lora_rank <= 0:
    raise config_lib.ConfigError("VLM stage 'lora' needs lora_rank > 0 (the LM's adapters); "
                                 "with none it would train the projector alone.")
  return FREEZE_BY_STAGE[stage]


def _task_vocabulary(task_name: str):
  """The `inputs` vocabulary of a registered task or mixture, else None."""
  # Registering a task imports seqio; where nothing has, there is no task to look up, and the
  # step alone (benchmarks, AOT compiles: `vlpjax/train_setup.py`) needs no input stack.
  seqio = sys.modules.get("seqio")
  if seqio is None:
    return None
  try:
    provider = seqio.get_mixture_or_task(task_name)
  except ValueError:  # Not registered (yet): nothing to check against.
    return None
  if isinstance(provider, seqio.Mixture):
    provider = provider.tasks[0]
  feature = provider.output_features.get("inputs")
  return None if feature is None else feature.vocabulary


def _image_token_id(config, model_kwargs, vocabulary) -> int:
  """model.image_token_id, checked against (or else taken from) the task's vocabulary."""
  from_task = None
  if vocabulary is not None and hasattr(vocabulary, "special_ids"):
    from_task = int(vocabulary.special_ids.image_id(0))
  given = model_kwargs.get("image_token_id")
  if given is None:
    if from_task is None:
      from vlpjax.data import vocab  # pylint: disable=g-import-not-at-top
      from_task = int(vocab.multimodal_vocabulary().special_ids.image_id(0))
    return from_task
  if from_task is not None and given != from_task:
    raise config_lib.ConfigError(
        f"config.model.image_token_id={given}, but task {config.input.task!r} marks images "
        f"with id {from_task}; leave image_token_id unset to take the task's.")
  return int(given)


@FAMILIES.register("vlm")
class VLMFamily:
  """Packed prefix-LM rows with images -> next-token logits; captions images."""

  input_format = "prefix_lm"
  model_class = vlm_lib.VLM  # Families that extend the VLM (documents) swap the module.
  batch_keys = TOKEN_KEYS + ("images",)

  def __init__(self, config):
    self.config = config
    model_kwargs = checked_model_kwargs(config, module_fields(self.model_class),
                                        self.model_parts())
    vocabulary = _task_vocabulary(config.input.task) if config.input.task else None
    model_kwargs["image_token_id"] = _image_token_id(config, model_kwargs, vocabulary)
    self.model = self.model_class(dtype=jnp.dtype(config.compute_dtype),
                                  remat_policy=config.remat_policy,
                                  attention_impl=config.attention_impl,
                                  norm_impl=config.norm_impl, **model_kwargs)
    self.tokens_per_image = self.model.num_image_tokens(config.input.image_size)
    check_packed_rows(config, self.tokens_per_image)
    vocab_size = self.model.llm_kwargs().get("vocab_size")
    if vocabulary is not None and vocab_size and vocabulary.vocab_size > vocab_size:
      raise config_lib.ConfigError(
          f"config.model.llm.vocab_size={vocab_size} is smaller than the "
          f"{vocabulary.vocab_size} ids of task {config.input.task!r}'s vocabulary.")
    config_lib.check_kwargs("config.pretrained", dict(config.get("pretrained", {})),
                            PRETRAINED_KEYS)

  @classmethod
  def model_parts(cls) -> Dict[str, Sequence[str]]:
    """The sub-dicts of `config.model` and their allowed keys (checked before building)."""
    return {"image": module_fields(ViT), "llm": module_fields(decoder_lib.Decoder)}

  @property
  def image_token_id(self) -> int:
    return self.model.image_token_id

  def input_specs(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    inp = self.config.input
    length, size = inp.row_length, inp.image_size
    specs = {k: jax.ShapeDtypeStruct((batch_size, length), jnp.int32) for k in TOKEN_KEYS}
    # Float: per-task loss weights (`input.task_loss_weights`) scale the target tokens.
    specs["decoder_loss_weights"] = jax.ShapeDtypeStruct((batch_size, length), jnp.float32)
    specs["images"] = jax.ShapeDtypeStruct(
        (batch_size, inp.max_images_per_row, size, size, 3), jnp.float32)
    return specs

  def init(self, rng, batch):
    return self.model.init(rng, batch)["params"]

  def features(self, params, batch, rng) -> Dict[str, Any]:
    del rng  # No stochastic layers.
    logits = self.model.apply({"params": params}, batch)
    return losses.token_statistics(logits, batch["decoder_target_tokens"],
                            batch["decoder_loss_weights"].astype(jnp.float32))

  def features_loss(self, params, features):
    """Weighted token cross-entropy over the batch's target-token count.

    Normalising by the count, not by the weights' sum, is what makes per-task weights act as
    multipliers: the loss is sum_task weight * (that task's summed loss) / targets.
    """
    del params
    num_tokens = jnp.maximum(jnp.sum(features["count_sum"]), 1.0)
    loss = jnp.sum(features["loss_sum"]) / num_tokens
    return loss, {"token_accuracy": jnp.sum(features["correct_sum"]) / num_tokens}

  def forward_flops(self, batch_size: int) -> Dict[str, float]:
    """Forward model FLOPs of `batch_size` packed rows per part (`vlpjax.flops`).

    Every image slot of a row is encoded (empty ones too: the shapes are fixed) and every
    one of the `row_length` positions runs through the LM. A row's attention is
    bidirectional on each example's prefix and causal on the rest; where that boundary lies
    varies per row, so the whole row counts as causal (attention halved), the issue's
    definition.
    """
    inp = self.config.input
    image_tokens = inp.max_images_per_row * self.tokens_per_image
    llm = self.model.llm_kwargs()
    vit = ViT(parent=None, **self.model.image_kwargs())
    return flops.scaled({
        "image_encoder": inp.max_images_per_row * flops.vit_module_forward(vit, inp.image_size),
        "projector": flops.projector(image_tokens, vit.dims["width"], llm["width"],
                                     self.model.projector),
        "decoder": flops.decoder_forward(llm, inp.row_length),
    }, batch_size)

  # -- predict functions (evaluators, `vlpjax.predict`) ------------------------------------

  def token_losses(self, params, batch):
    """(cross-entropy summed over each row's targets [B], their count [B])."""
    stats = self.features(params, batch, None)
    return stats["loss_sum"], stats["weight_sum"]

  def caption_prompt(self, prompt: Sequence[int] = ()) -> np.ndarray:
    """[BOS, T image tokens, *prompt]: how a packed one-image example's prefix begins."""
    return np.array([BOS_ID] + [self.image_token_id] * self.tokens_per_image + list(prompt),
                    np.int32)

  def caption(self, params, images, *, decode, rng=None, prompt: Sequence[int] = ()):
    """Captions images [B, S, S, 3] in [-1, 1] -> int32 [B, max_decode_len] (0 after EOS).

    The prompt (`caption_prompt`: BOS, the image's T tokens, then `prompt`, the task's
    prompt tokens if it has any) is a one-image `generate` prompt.
    """
    batch = images.shape[0]
    prompt_tokens = self.caption_prompt(prompt)
    tokens = jnp.broadcast_to(jnp.asarray(prompt_tokens), (batch, prompt_tokens.size))
    prompts = {"decoder_input_tokens": tokens, "prompt_mask": jnp.ones(tokens.shape, bool),
               "images": images[:, None], "image_mask": jnp.ones((batch, 1), bool),
               "image_segment_ids": jnp.ones((batch, 1), jnp.int32)}
    return self.generate(params, prompts, decode=decode, rng=rng)

  def generate(self, params, prompts: Mapping[str, Any], *, decode, rng=None):
    """Continues prompts -> int32 [B, max_decode_len] (0 after EOS); jittable.

    `prompts` is a prompt batch (`vlpjax.data.prompts.prompt_batch`): one example per row,
    `decoder_input_tokens` int32 [B, P] (BOS, then the inputs with every image expanded to
    its T image positions, as in a packed row), `prompt_mask` bool [B, P] (the valid ones;
    padding may sit on either side), `images` [B, N, ...] with `image_mask` /
    `image_segment_ids` [B, N], and whatever else the model reads (`decoder_boxes`,
    `image_times`). The prompt is prefilled bidirectionally, as in training, and decoding
    goes on from its last valid position. The pad/BOS id and `<image>` are never generated:
    a 0 would read as padding, an `<image>` as an image without pixels.
    """
    if isinstance(decode, Mapping):
      decode = decoding.DecodeConfig.from_dict(dict(decode))
    model, variables = self.model, {"params": params}
    tokens = prompts["decoder_input_tokens"]
    prompt_x, context = model.apply(variables, tokens, prompts,
                                    method=self.model_class.prepare_inputs)

    def run_llm(x, positions, mask, cache, cache_index, context=None):
      return model.apply(variables, x, positions=positions, mask=mask, cache=cache,
                         cache_index=cache_index, context=context,
                         method=self.model_class.run_llm)

    lm = decoding.prefix_lm_step_fn(
        run_llm, lambda t: model.apply(variables, t, method=self.model_class.embed_tokens),
        prompt_x, prompts["prompt_mask"],
        init_cache=lambda b, n: model.apply(variables, b, n,
                                            method=self.model_class.init_cache),
        max_decode_len=decode.max_decode_len, cache_batch_axis=model.cache_batch_axis,
        context=context)

    def step_fn(step_tokens, cache, t):
      logits, cache = lm.step_fn(step_tokens, cache, t)
      return self.never_generated(logits), cache

    out = decoding.decode(step_fn, self.never_generated(lm.first_logits), lm.cache,
                          config=decode, rng=rng, cache_batch_axes=lm.cache_batch_axes)
    return out["tokens"]

  def never_generated(self, logits):
    """Logits [..., V] with pad/BOS and `<image>` made (finitely) impossible."""
    banned = jnp.array([BOS_ID, self.image_token_id])
    return logits.at[..., banned].set(NEVER_LOGIT)

  # -- initialisation from a pretrained LM -----------------------------------------------

  def pretrained(self, params, config=None):
    """`params` with `llm` replaced by `config.pretrained.llm_hf_path`'s weights, if set.

    The checkpoint's architecture must be the configured LM's, except that the config may
    have more vocabulary rows (a base tokenizer extended with structure tokens, as PaliGemma
    extends Gemma's): those rows start at the mean of the checkpoint's rows, so the new
    tokens neither dominate nor vanish from the softmax. LoRA adapters keep their
    initialisation (lora_b = 0: the adapted LM starts equal to the checkpoint). The `llm`
    leaves come back as host numpy arrays; the caller places them.
    """
    config = config or self.config
    path = dict(config.get("pretrained", {})).get("llm_hf_path", "")
    if not path:
      return params
    from vlpjax.interop import hf_lm  # pylint: disable=g-import-not-at-top  (safetensors)
    llm_kwargs = self.model.llm_kwargs()
    hf_kwargs, loaded = hf_lm.load_hf_decoder(path, scan_layers=llm_kwargs["scan_layers"])
    check_architecture(llm_kwargs, hf_kwargs, where=path)
    return {**params, "llm": merge_pretrained(params["llm"], loaded, where=path)}


def check_architecture(llm_kwargs: Mapping[str, Any], hf_kwargs: Mapping[str, Any],
                       where: str) -> None:
  """ConfigError unless config.model.llm describes the checkpoint's architecture."""
  defaults = {f.name: f.default for f in dataclasses.fields(decoder_lib.Decoder)}
  wrong = []
  for key, value in hf_kwargs.items():
    if key == "scan_layers":
      continue
    ours = llm_kwargs.get(key, defaults.get(key))
    if key == "num_kv_heads":
      ours = ours or llm_kwargs["num_heads"]
    elif key == "head_dim" and ours is None:
      ours = llm_kwargs["width"] // llm_kwargs["num_heads"]
    if key == "vocab_size" and ours >= value:
      continue
    if ours != value:
      wrong.append(f"{key}={ours!r} (checkpoint: {value!r})")
  if wrong:
    raise config_lib.ConfigError(
        f"config.model.llm does not describe the pretrained LM {where!r}: "
        f"{', '.join(wrong)}.")


def merge_pretrained(init: Mapping[str, Any], loaded: Mapping[str, Any], where: str):
  """`loaded` in place of `init` (same tree); vocabulary tables may be shorter in `loaded`.

  Only the shapes and dtypes of `init` are read (its values may live on other hosts), except
  for leaves that `loaded` lacks (LoRA adapters), which are kept as they are.
  """
  init_leaves = dict(_flat(init))
  loaded_leaves = dict(_flat(loaded))
  missing = [k for k in sorted(set(init_leaves) - set(loaded_leaves)) if "lora" not in k]
  extra = sorted(set(loaded_leaves) - set(init_leaves))
  if missing or extra:
    raise ValueError(f"pretrained LM {where!r} does not match config.model.llm: params "
                     f"missing from the checkpoint {missing[:5]}, unexpected {extra[:5]}.")
  out = {}
  for name, value in init_leaves.items():
    if name not in loaded_leaves:
      out[name] = value
      continue
    new = np.asarray(loaded_leaves[name])
    if new.shape != tuple(value.shape):
      new = _grow_vocab(name, new, tuple(value.shape), where)
    out[name] = new.astype(value.dtype)
  return _unflat(out)


def _grow_vocab(name: str, table: np.ndarray, shape, where: str) -> np.ndarray:
  """`table` padded along its vocabulary axis to `shape` with the mean of its rows."""
  axis = _vocab_axis(name, table.ndim)
  fits = (axis is not None and table.ndim == len(shape) and table.shape[axis] <= shape[axis]
          and all(a == b for i, (a, b) in enumerate(zip(table.shape, shape)) if i != axis))
  if not fits:
    raise ValueError(f"pretrained LM {where!r}: {name} has shape {table.shape}, "
                     f"config.model.llm gives {shape}; make the config's width/depth/heads/"
                     "mlp_dim/vocab_size match the checkpoint.")
  mean = np.mean(table.astype(np.float32), axis=axis, keepdims=True)
  reps = [1] * table.ndim
  reps[axis] = shape[axis] - table.shape[axis]
  return np.concatenate([table.astype(np.float32), np.tile(mean, reps)], axis=axis)


def _vocab_axis(name: str, ndim: int):
  """The vocabulary axis of the LM's token tables: embedding rows, or lm_head columns."""
  if name.startswith("embed_tokens/"):
    return 0
  if name.startswith("lm_head/"):
    return ndim - 1
  return None


def _flat(tree, prefix=""):
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      yield from _flat(value, name + "/")
    else:
      yield name, value


def _unflat(flat: Mapping[str, Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out

