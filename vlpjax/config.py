"""Experiment configs: `file.py:arg` loading, `--config.a.b=v` overrides, strict validation.

Configs are Python files with `get_config(arg)` returning an `ml_collections.ConfigDict`, as in
big_vision. Every key the trainer reads is declared in `defaults()`; a key in a config file or an
override that is not declared there is a typo until proven otherwise, so it fails before any
work starts, naming the key and its nearest valid names.
"""
import ast
import importlib.util
import json
import os
from typing import Any, Iterable, Optional, Sequence

import ml_collections

from vlpjax.registry import nearest

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A config that cannot be run; the message names the key."""


def defaults() -> ConfigDict:
  """Every key the trainer understands, with its default. `None` marks a required key."""
  c = ConfigDict()
  c.seed = 0
  c.total_steps = None           # required
  c.global_batch_size = None     # required: examples per step summed over all hosts
  c.grad_accum_steps = 1         # micro-batches per step; the update equals the full batch's
  c.steps_per_call = 1           # train steps per compiled call (a lax.scan over that many
                                 # batches): amortises each call's host costs (README, benchmarks)
  c.family = "two_tower"         # model family: which init/loss/predict functions to use
  c.model_name = "two_tower"     # registered Flax module
  c.model = ConfigDict()         # kwargs of the module (checked against its fields)
  c.loss = "sigmoid"             # family-specific loss name
  c.loss_weights = ConfigDict()  # family-specific loss terms' weights (e.g. CoCa's caption)
  c.compute_dtype = "bfloat16"   # activations/matmuls; params and optimizer state stay f32
  c.remat_policy = "none"        # none | full | dots_saveable | dots_with_no_batch_dims_saveable
  c.attention_impl = "auto"      # auto (cuDNN on GPU for bf16, else einsum) | einsum | xla | cudnn | pallas
  c.norm_impl = "auto"           # LayerNorm backward: auto (= xla) | xla | pallas (one fused kernel, GPU)

  # Axis sizes within a slice (one may be -1); `slices` > 1: data parallel across
  # TPU slices (docs/scaling.md).
  c.mesh = ConfigDict(dict(slices=1, data=-1, fsdp=1, tensor=1))
  c.sharding_rules = None        # required: list of (logical name, mesh axes)
  c.distributed = ConfigDict(dict(auto=True, coordinator_address="", num_processes=-1,
                                  process_id=-1))

  c.optim = ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=1e-4,
      wd_mask="",           # regex of params that decay ('a/b/c' paths); '' = all ndim >= 2
      grad_clip_norm=1.0,   # 0 disables clipping
      freeze="",            # regex of params to keep fixed (LiT: 'img/.*')
  ))
  c.schedule = ConfigDict(dict(
      type="cosine",            # cosine | rsqrt | constant
      warmup_steps=0,
      end_lr_fraction=0.0,      # cosine: final lr as a fraction of the peak
      timescale=10_000,         # rsqrt: lr = peak * sqrt(timescale / max(step, timescale))
  ))

  c.input = ConfigDict(dict(
      task=None,                # required: seqio task or mixture name
      split="train",
      files=ConfigDict(),       # optional split -> TFRecord glob: registers `task` over them
      pp="",                    # vlpjax preprocessing ops after the seqio task
      image_size=224,
      text_length=64,
      shuffle_buffer=10_000,
      keys=(),                  # features the model reads; () = the data's default
      threads=0,                # tf.data thread pool size; 0 = tf.data's default
      prefetch_to_device=2,     # batches copied to the devices ahead of the step; 0 = none
      bad_records="error",      # error | skip: stop naming the record, or skip and count
      # host: each process reads its own seqio shard (scales to pods); global: every process
      # reads the whole stream and keeps its rows, so batches do not depend on the host count.
      sharding="host",
      use_cached=False,         # read the tasks' offline Beam cache (docs/data.md)
      cache_dir="",             # where that cache is, if not in seqio's global dirs
      # Packed prefix-LM rows (families with input_format "prefix_lm"; vlpjax/data/packing.py):
      row_length=0,             # tokens per packed row
      max_images_per_row=0,     # image slots per row
      tokens_per_image=0,       # 0 = what the model's image encoder gives (checked if set)
      task_loss_weights=ConfigDict(),  # task name -> weight of its target tokens (default 1)
      frame_feature_dim=0,      # > 0: the "images" are precomputed frame features [D]
  ))
  c.data_modules = ["data_mixtures"]  # imported so their seqio tasks are registered

  c.evals = ConfigDict()        # name -> dict(type=..., every_steps=..., ...)
  c.pretrained = ConfigDict()   # family-specific initialisation, e.g. llm_hf_path for a VLM
  # Start from other weights (vlpjax/init_from.py): a params dir or a workdir; include = regex
  # of params to take ('' = all the source has); step = the workdir's checkpoint (-1 = latest).
  c.init_from = ConfigDict(dict(path="", include="", step=-1))

  c.log_every_steps = 10
  c.checkpoint = ConfigDict(dict(every_steps=1000, max_to_keep=3, async_save=True))
  return c


# Keys with a closed set of values, checked before any work.
_CHOICES = {"input.bad_records": ("error", "skip"), "input.sharding": ("host", "global")}

# Sections whose contents are checked by their consumer rather than by `defaults()`.
_OPEN_SECTIONS = ("model", "evals", "input.files", "input.task_loss_weights", "loss_weights",
                  "pretrained")


def load(spec: str) -> ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"--config: no such file {path!r}.")
  module_spec = importlib.util.spec_from_file_location(
      "vlpjax_experiment_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg) function.")
  return module.get_config(arg or None)


def parse_arg(arg: Optional[str], **declared: Any) -> ConfigDict:
  """Parses a config argument `key=val,flag` against declared defaults (big_vision style).

  A bare `flag` sets a boolean to True. Unknown keys fail with the nearest declared names.
  """
  result = ConfigDict(declared)
  for item in filter(None, (arg or "").split(",")):
    key, eq, raw = item.partition("=")
    key = key.strip()
    if key not in declared:
      raise ConfigError(f"config arg {key!r} is not one of {sorted(declared)}"
                        f"{_did_you_mean(key, declared)}.")
    result[key] = _coerce(raw, declared[key], f"config arg {key!r}") if eq else True
  return result


def split_overrides(parser, rest: Sequence[str]) -> list:
  """`--config.a.b=value` command-line items -> ["a.b=value", ...]; anything else is an
  argparse error (the tools that take a config all accept overrides this way)."""
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognised argument {item!r} (overrides look like --config.a.b=value)")
    overrides.append(item[len("--config."):])
  return overrides


def apply_overrides(config: ConfigDict, overrides: Iterable[str]) -> ConfigDict:
  """Applies `a.b=value` overrides; values parse as Python literals of the field's type."""
  for item in overrides:
    dotted, eq, raw = item.partition("=")
    if not eq:
      raise ConfigError(f"override --config.{item} needs a value: --config.{dotted}=VALUE.")
    *parents, leaf = dotted.split(".")
    node = config
    for depth, part in enumerate(parents):
      if part not in node:
        if not _is_open(parents[:depth]):
          raise ConfigError(_unknown_key(".".join(parents[:depth + 1]), node))
        node[part] = ConfigDict()
      node = node[part]
    if not isinstance(node, ConfigDict):
      raise ConfigError(f"--config.{dotted}: {'.'.join(parents)} is not a section.")
    if leaf in node:
      node[leaf] = _coerce(raw, node[leaf], f"--config.{dotted}")
    elif _is_open(parents):
      # A key the config file did not set (`model.image.scan_layers`): the section's consumer
      # checks it against what it accepts, with the nearest names, when it builds.
      node[leaf] = _literal(raw)
    else:
      raise ConfigError(_unknown_key(dotted, node))
  return config


def _is_open(parents: Sequence[str]) -> bool:
  """Whether a key under `parents` lies in a section its consumer checks (`_OPEN_SECTIONS`)."""
  return any(".".join(parents[:depth]) in _OPEN_SECTIONS for depth in range(1, len(parents) + 1))


def _literal(raw: str) -> Any:
  """A new key's value: a Python literal, `true`/`false` as booleans, else the string."""
  if raw.lower() in ("true", "false"):
    return raw.lower() == "true"
  return _coerce(raw, None, "")   # no type to hold it to


def finalize(config: ConfigDict, overrides: Iterable[str] = ()) -> ConfigDict:
  """Validates a user config against `defaults()`, fills in defaults, applies overrides."""
  merged = defaults()
  _merge(merged, config, prefix="")
  apply_overrides(merged, overrides)
  missing = [k for k, v in _flatten(merged) if v is None]
  if missing:
    raise ConfigError(f"config is missing required keys: {', '.join(missing)}.")
  for key, allowed in _CHOICES.items():
    section, leaf = key.rsplit(".", 1)
    value = merged[section][leaf]
    if value not in allowed:
      raise ConfigError(f"config key {key!r} is {value!r}{_did_you_mean(str(value), allowed)}; "
                        f"valid values: {', '.join(allowed)}.")
  spc = merged.steps_per_call
  if isinstance(spc, bool) or not isinstance(spc, int) or spc < 1:
    raise ConfigError(f"config key 'steps_per_call' must be an int >= 1 (train steps per "
                      f"compiled call), got {spc!r}.")
  if merged.global_batch_size % merged.grad_accum_steps:
    raise ConfigError(f"global_batch_size={merged.global_batch_size} is not divisible by "
                      f"grad_accum_steps={merged.grad_accum_steps}.")
  return merged


def check_kwargs(where: str, kwargs: dict, allowed: Sequence[str]) -> None:
  """Errors on kwargs that a component does not accept (used for `model`, `evals.*`)."""
  for key in kwargs:
    if key not in allowed:
      raise ConfigError(f"{where}.{key} is not a valid key{_did_you_mean(key, allowed)}. "
                        f"Valid keys: {', '.join(sorted(allowed))}.")


def save_json(config: ConfigDict, path: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (gs:// paths)
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))


def _merge(target: ConfigDict, source: ConfigDict, prefix: str) -> None:
  for key in source.keys():
    path = prefix + key
    if key not in target:
      raise ConfigError(_unknown_key(path, target))
    value = source[key]
    if path in _OPEN_SECTIONS:
      target[key] = ConfigDict(value.to_dict() if isinstance(value, ConfigDict) else value)
    elif isinstance(target[key], ConfigDict):
      if not isinstance(value, (ConfigDict, dict)):
        raise ConfigError(f"config key {path!r} must be a section, got {value!r}.")
      _merge(target[key], ConfigDict(value) if isinstance(value, dict) else value,
             prefix=path + ".")
    else:
      _check_type(path, target[key], value)
      with target.ignore_type():
        target[key] = value


def _check_type(path: str, default: Any, value: Any) -> None:
  if default is None or value is None:
    return
  ok = isinstance(value, type(default))
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    ok = True
  if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
    ok = True
  if not ok:
    raise ConfigError(f"config key {path!r} must be {type(default).__name__}, "
                      f"got {value!r} ({type(value).__name__}).")


def _flatten(config: ConfigDict, prefix: str = ""):
  for key in config.keys():
    value = config[key]
    if isinstance(value, ConfigDict) and prefix + key not in _OPEN_SECTIONS:
      yield from _flatten(value, prefix + key + ".")
    else:
      yield prefix + key, value


def _unknown_key(path: str, section: ConfigDict) -> str:
  leaf = path.rsplit(".", 1)[-1]
  parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
  valid = [parent + k for k in section.keys()]
  return (f"unknown config key {path!r}{_did_you_mean(parent + leaf, valid)}. "
          f"Valid keys here: {', '.join(sorted(valid))}.")


def _did_you_mean(key: str, candidates) -> str:
  near = nearest(key, candidates)
  return f" (did you mean {' or '.join(repr(c) for c in near)}?)" if near else ""


def _coerce(raw: str, current: Any, where: str) -> Any:
  """Parses an override string into the type of the value it replaces."""
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if current is None:
      return raw  # an unset field takes a plain string
    raise ConfigError(f"{where}={raw!r}: expected a {type(current).__name__} literal.") from None
  if isinstance(current, ConfigDict) and isinstance(value, dict):
    return ConfigDict(value)
  if isinstance(current, bool):
    if not isinstance(value, bool):
      raise ConfigError(f"{where}={raw!r}: expected True or False.")
  elif isinstance(current, float) and isinstance(value, int):
    value = float(value)
  elif current is not None and not isinstance(value, type(current)):
    if not (isinstance(current, (list, tuple)) and isinstance(value, (list, tuple))):
      raise ConfigError(f"{where}={raw!r}: expected a {type(current).__name__}, "
                        f"got {type(value).__name__}.")
  return value
