"""Hugging Face Llama / Gemma causal-LM checkpoints -> vlpjax `Decoder` kwargs and params.

    kwargs, params = load_hf_decoder("/ckpt/gemma-2b")
    model = Decoder(**kwargs, dtype=jnp.bfloat16)
    logits, _ = model.apply({"params": params}, model.apply({"params": params}, tokens,
                            method=Decoder.embed), positions=..., mask=...)

The directory holds `config.json` and `model.safetensors` or shards listed in
`model.safetensors.index.json`; tensors are read with the safetensors numpy API (bf16 comes
back as ml_dtypes.bfloat16), so torch is not needed. Supported `model_type`s: `llama`
(LlamaForCausalLM: silu, RMSNorm scale stored directly, tied per `tie_word_embeddings`) and
`gemma` (GemmaForCausalLM: tanh-gelu, RMSNorm scale stored as an offset from 1, embeddings
times sqrt(width), tied). Only the default RoPE (no `rope_scaling`) and bias-free
projections are supported; anything else is a ValueError rather than a silently different
model.

`decoder_kwargs` describe the architecture only (dtype, remat, LoRA and cross-attention are
the caller's choice; LoRA params are not in a checkpoint, so a LoRA model needs its adapters
initialised separately). `params` is the content of the `params` collection as plain numpy
arrays in `dtype`, laid out like `Decoder`'s (unscanned `layers/layers_{i}`, or stacked on a
leading axis under `layers/scanned` with `scan_layers=True`); a VLM places it under its own
`llm` subtree. Every checkpoint tensor must be consumed and every Decoder param filled, with
the right shape; errors name the tensors.

Layout changes: torch `Linear` weights are (out, in), Flax kernels (in, out); q/k/v split
their output into (heads, head_dim) and o its input.
"""
import json
import os
import re
from typing import Any, Dict, Iterable, Mapping, Tuple

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpjax.models import scan_util
from vlpjax.models.decoder import Decoder, make_attention_mask

SUPPORTED_MODEL_TYPES = ("llama", "gemma")
# HF activation names -> Decoder.activation. Gemma's legacy "gelu" meant the tanh form
# (transformers rewrites it the same way).
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}
# Non-persistent buffers some older exports still carry; they hold no weights.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")

Params = Dict[str, Any]


def read_hf_config(path: str) -> Dict[str, Any]:
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise ValueError(f"No config.json in {path!r}: expected a Hugging Face checkpoint "
                     f"directory (save_pretrained output).")
  with open(config_path) as f:
    return json.load(f)


def decoder_kwargs_from_hf_config(config: Mapping[str, Any], *, scan_layers: bool = False
                                  ) -> Dict[str, Any]:
  """`Decoder` architecture kwargs for an HF Llama/Gemma config dict (see module doc)."""
  model_type = config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"Unsupported Hugging Face model_type {model_type!r}; supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
  for flag in ("attention_bias", "mlp_bias"):
    if config.get(flag):
      raise ValueError(f"HF config sets {flag}=True; the vlpjax decoder has no biases.")
  rope = dict(config.get("rope_parameters") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  scaling = config.get("rope_scaling")
  if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type"))
                                not in (None, "default")):
    raise ValueError(f"HF config uses RoPE scaling ({rope or scaling}); only the default "
                     f"RoPE is supported.")
  rope_theta = rope.get("rope_theta", config.get("rope_theta", 10_000.))

  width, num_heads = config["hidden_size"], config["num_attention_heads"]
  activation_name = config.get("hidden_activation") or config.get("hidden_act", "silu")
  if model_type == "gemma" and activation_name == "gelu":
    activation_name = "gelu_pytorch_tanh"
  if activation_name not in _ACTIVATIONS:
    raise ValueError(f"HF activation {activation_name!r} is not supported; supported: "
                     f"{', '.join(sorted(_ACTIVATIONS))}.")
  gemma = model_type == "gemma"
  return dict(
      vocab_size=config["vocab_size"], width=width, depth=config["num_hidden_layers"],
      mlp_dim=config["intermediate_size"], num_heads=num_heads,
      num_kv_heads=config.get("num_key_value_heads") or num_heads,
      head_dim=config.get("head_dim") or width // num_heads,
      activation=_ACTIVATIONS[activation_name],
      norm_eps=float(config.get("rms_norm_eps", 1e-6)),
      norm_offset=1.0 if gemma else 0.0,
      rope_theta=float(rope_theta),
      embed_scale=gemma,
      # Gemma's modelling code always ties; Llama follows the config (HF default True).
      tie_embeddings=True if gemma else bool(config.get("tie_word_embeddings", True)),
      scan_layers=scan_layers)


def _safetensors_files(path: str) -> Iterable[str]:
  index_path = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    return sorted({os.path.join(path, name) for name in weight_map.values()})
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise ValueError(f"No model.safetensors or model.safetensors.index.json in {path!r} "
                   f"(torch .bin checkpoints are not read: re-save with "
                   f"save_pretrained(..., safe_serialization=True)).")


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory, as numpy (bf16 stays ml_dtypes.bfloat16)."""
  from safetensors import safe_open  # Only the import path needs it.
  tensors = {}
  for file in _safetensors_files(path):
    with safe_open(file, framework="np") as f:
      for key in f.keys():
        if key in tensors:
          raise ValueError(f"Tensor {key!r} appears in two checkpoint shards.")
        tensors[key] = f.get_tensor(key)
  return tensors


class _Reader:
  """Pops HF tensors by name, so that leftovers can be reported."""

  def __init__(self, tensors: Mapping[str, np.ndarray], dtype):
    self.remaining = {k: v for k, v in tensors.items() if not _IGNORED_KEYS.match(k)}
    self.dtype = dtype
    # LlamaForCausalLM nests the body under `model.`; a bare LlamaModel does not.
    self.prefix = "model." if "model.embed_tokens.weight" in self.remaining else ""

  def pop(self, name: str, body: bool = True) -> np.ndarray:
    key = self.prefix + name if body else name
    if key not in self.remaining:
      raise ValueError(f"HF checkpoint has no tensor {key!r}.")
    return np.asarray(self.remaining.pop(key), np.float32).astype(self.dtype)

  def linear_in(self, name: str, heads: int) -> Params:
    """(heads * head_dim, in) weight -> (in, heads, head_dim) kernel."""
    weight = self.pop(name + ".weight")
    return {"kernel": weight.T.reshape(weight.shape[1], heads, -1)}

  def linear_out(self, name: str, heads: int) -> Params:
    """(out, heads * head_dim) weight -> (heads, head_dim, out) kernel."""
    weight = self.pop(name + ".weight")
    return {"kernel": weight.T.reshape(heads, -1, weight.shape[0])}

  def linear(self, name: str) -> Params:
    return {"kernel": self.pop(name + ".weight").T}

  def norm(self, name: str) -> Params:
    return {"scale": self.pop(name + ".weight")}


def _layer_params(reader: _Reader, i: int, num_heads: int, num_kv_heads: int) -> Params:
  p = f"layers.{i}"
  return {
      "input_layernorm": reader.norm(f"{p}.input_layernorm"),
      "self_attn": {
          "q_proj": reader.linear_in(f"{p}.self_attn.q_proj", num_heads),
          "k_proj": reader.linear_in(f"{p}.self_attn.k_proj", num_kv_heads),
          "v_proj": reader.linear_in(f"{p}.self_attn.v_proj", num_kv_heads),
          "o_proj": reader.linear_out(f"{p}.self_attn.o_proj", num_heads),
      },
      "post_attention_layernorm": reader.norm(f"{p}.post_attention_layernorm"),
      "mlp": {name: reader.linear(f"{p}.mlp.{name}")
              for name in ("gate_proj", "up_proj", "down_proj")},
  }


def decoder_param_shapes(decoder_kwargs: Mapping[str, Any]) -> Params:
  """The `params` shapes a Decoder with these kwargs expects (abstract: nothing allocated)."""
  model = Decoder(**decoder_kwargs)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1, model.width)),
      positions=jnp.zeros((1, 1), jnp.int32),
      mask=make_attention_mask(jnp.ones((1, 1), jnp.int32))))
  return jax.tree_util.tree_map(lambda x: tuple(x.shape), nn.unbox(variables)["params"])


def _check_against_model(params: Params, decoder_kwargs: Mapping[str, Any]) -> None:
  want = flax.traverse_util.flatten_dict(decoder_param_shapes(decoder_kwargs), sep="/")
  got = flax.traverse_util.flatten_dict(params, sep="/")
  missing = sorted(set(want) - set(got))
  if missing:
    raise ValueError(f"HF checkpoint left Decoder params unfilled: {missing}.")
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f"Converted params not in the Decoder: {extra}.")
  bad = [f"{k}: {got[k].shape} vs expected {want[k]}" for k in sorted(want)
         if tuple(got[k].shape) != want[k]]
  if bad:
    raise ValueError("HF tensors do not fit the config's shapes: " + "; ".join(bad))


def load_hf_decoder(path: str, *, scan_layers: bool = False, dtype=np.float32
                    ) -> Tuple[Dict[str, Any], Params]:
  """(Decoder kwargs, params as numpy in `dtype`) from an HF Llama/Gemma directory."""
  config = read_hf_config(path)
  kwargs = decoder_kwargs_from_hf_config(config, scan_layers=scan_layers)
  reader = _Reader(read_safetensors(path), np.dtype(dtype))
  num_heads, num_kv_heads = kwargs["num_heads"], kwargs["num_kv_heads"]

  params: Params = {
      "embed_tokens": {"embedding": reader.pop("embed_tokens.weight")},
      "norm": reader.norm("norm"),
  }
  layer_list = [_layer_params(reader, i, num_heads, num_kv_heads)
                for i in range(kwargs["depth"])]
  params["layers"] = {f"layers_{i}": layer for i, layer in enumerate(layer_list)}
  if scan_layers:
    params["layers"] = scan_util.stack_layers(params["layers"], where="layers")

  if "lm_head.weight" in reader.remaining:
    head = reader.pop("lm_head.weight", body=False)
    if not kwargs["tie_embeddings"]:
      params["lm_head"] = {"kernel": head.T}
    elif not np.array_equal(head, params["embed_tokens"]["embedding"]):
      raise ValueError("Tied-embedding checkpoint has an lm_head.weight that differs from "
                       "embed_tokens.weight.")
  elif not kwargs["tie_embeddings"]:
    raise ValueError("Config has tie_word_embeddings=False but the checkpoint has no "
                     "lm_head.weight.")
  if reader.remaining:
    raise ValueError(f"HF checkpoint tensors not converted: {sorted(reader.remaining)}.")
  _check_against_model(params, kwargs)
  return kwargs, params
