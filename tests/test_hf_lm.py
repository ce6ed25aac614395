"""HF Llama / Gemma checkpoints imported into the vlpjax Decoder give transformers' logits.

Tiny random models (weights re-drawn at a scale where every tensor matters) are saved with
safetensors, imported, and run on the same token ids with positions 0..L-1 and a causal
mask. Tolerance: logits within atol 1e-4 in f32 (the two frameworks sum in different
orders; a wrong layout or convention gives errors of order 0.1-1).
"""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax.interop import hf_lm
from vlpjax.models.decoder import Decoder, make_attention_mask

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TOKENS = np.array([[5, 17, 3, 60, 2, 9, 33, 41], [1, 2, 3, 4, 5, 6, 7, 8]])


def randomize_(model, seed):
  """Re-draws every weight (HF's 0.02 init would make attention nearly uniform)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name and model.config.model_type == "llama":
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      else:
        param.normal_(0.0, 0.2)
  return model.eval()


def tiny_llama(path, **save_kwargs):
  config = transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
      rms_norm_eps=1e-5, rope_theta=500.)
  model = randomize_(transformers.LlamaForCausalLM(config), seed=0)
  model.save_pretrained(path, safe_serialization=True, **save_kwargs)
  return model


def tiny_gemma(path):
  config = transformers.GemmaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, head_dim=16)
  model = randomize_(transformers.GemmaForCausalLM(config), seed=1)
  model.save_pretrained(path, safe_serialization=True)
  return model


def hf_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


def vlpjax_logits(kwargs, params):
  model = Decoder(**kwargs)
  variables = {"params": params}
  x = model.apply(variables, jnp.asarray(TOKENS), method=Decoder.embed)
  batch, length = TOKENS.shape
  logits, _ = model.apply(variables, x,
                          positions=jnp.broadcast_to(jnp.arange(length), (batch, length)),
                          mask=make_attention_mask(jnp.ones((batch, length), jnp.int32)))
  return np.asarray(logits)


def test_llama_gqa_untied_sharded_matches_transformers(tmp_path):
  path = str(tmp_path / "llama")
  model = tiny_llama(path, max_shard_size="20KB")
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  kwargs, params = hf_lm.load_hf_decoder(path)
  assert kwargs["num_kv_heads"] == 2 and not kwargs["tie_embeddings"]
  assert kwargs["activation"] == "silu" and kwargs["rope_theta"] == 500.
  assert params["lm_head"]["kernel"].shape == (32, 64)
  want = hf_logits(model)
  np.testing.assert_allclose(vlpjax_logits(kwargs, params), want, atol=1e-4)
  # The scanned layout holds the same model.
  kwargs, params = hf_lm.load_hf_decoder(path, scan_layers=True)
  assert params["layers"]["scanned"]["self_attn"]["k_proj"]["kernel"].shape == (2, 32, 2, 8)
  np.testing.assert_allclose(vlpjax_logits(kwargs, params), want, atol=1e-4)


def test_gemma_matches_transformers(tmp_path):
  path = str(tmp_path / "gemma")
  model = tiny_gemma(path)
  kwargs, params = hf_lm.load_hf_decoder(path)
  assert kwargs["activation"] == "gelu_tanh" and kwargs["norm_offset"] == 1.0
  assert kwargs["embed_scale"] and kwargs["tie_embeddings"]
  assert kwargs["head_dim"] == 16 and kwargs["num_kv_heads"] == 1
  assert "lm_head" not in params
  np.testing.assert_allclose(vlpjax_logits(kwargs, params), hf_logits(model), atol=1e-4)


def test_unsupported_model_type(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"model_type": "gpt2", "vocab_size": 10}, f)
  with pytest.raises(ValueError, match=r"Unsupported .*'gpt2'.*llama, gemma"):
    hf_lm.load_hf_decoder(str(tmp_path))


def test_leftover_and_missing_tensors_are_named(tmp_path):
  from safetensors.numpy import save_file
  source = str(tmp_path / "llama")
  tiny_llama(source)
  tensors = hf_lm.read_safetensors(source)

  def write(name, tensors):
    path = tmp_path / name
    path.mkdir()
    shutil.copy(os.path.join(source, "config.json"), path / "config.json")
    save_file(tensors, str(path / "model.safetensors"))
    return str(path)

  extra = write("extra", {**tensors, "model.layers.0.self_attn.q_proj.bias":
                          np.zeros(32, np.float32)})
  with pytest.raises(ValueError, match=r"not converted.*q_proj\.bias"):
    hf_lm.load_hf_decoder(extra)
  missing = write("missing", {k: v for k, v in tensors.items() if k != "model.norm.weight"})
  with pytest.raises(ValueError, match=r"model\.norm\.weight"):
    hf_lm.load_hf_decoder(missing)
  wrong_shape = dict(tensors)
  wrong_shape["model.layers.1.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
  with pytest.raises(ValueError, match=r"layers_1/mlp/up_proj/kernel"):
    hf_lm.load_hf_decoder(write("wrong_shape", wrong_shape))
