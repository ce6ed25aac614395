"""Checkpoint export (Orbax, safetensors, HF SigLIP / CLIP) and HF import, against transformers.

Tiny random models only (nothing is downloaded). Every weight is perturbed away from its init
value (LayerNorms off 1, biases off 0, class token off 0), so a mapping that drops or
misplaces one cannot hide behind a constant.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from tools import export_checkpoint, import_checkpoint
from vlpjax import checkpoint as checkpoint_lib
from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax import trainer
from vlpjax.interop import hf_clip, hf_siglip, posemb
from vlpjax.models.two_tower import TwoTower

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)  # The test machine's cores are shared.

IMAGE_SIZE = 16
TEXT_LENGTH = 8
VOCAB = 100
EOS = 1

SIGLIP_KWARGS = dict(
    image=dict(width=32, depth=2, mlp_dim=48, num_heads=4, patch_size=4, pool_type="map",
               posemb="learn"),
    text=dict(vocab_size=VOCAB, width=16, depth=2, mlp_dim=32, num_heads=2,
              max_len=TEXT_LENGTH, pool_type="last"),
    embed_dim=32, temperature_init=math.log(10.), bias_init=-10.)
# CLIP-shaped: class token, pre-LN, causal text pooled at EOS, bias-free projections (both
# towers project: 32 -> 24 and 16 -> 24), no logit bias.
CLIP_KWARGS = dict(
    image=dict(width=32, depth=2, mlp_dim=48, num_heads=4, patch_size=4, pool_type="tok",
               posemb="learn", pre_norm=True, proj_bias=False),
    text=dict(vocab_size=VOCAB, width=16, depth=2, mlp_dim=32, num_heads=2,
              max_len=TEXT_LENGTH, pool_type="eos", eos_id=EOS, causal=True,
              head_bias=False),
    embed_dim=24, temperature_init=math.log(1 / 0.07), bias_init=None)


def perturbed(params, seed):
  """Random values for a params tree (arrays or shapes): LayerNorm scales near 1, all else
  random, so nothing sits at its init value."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.unbox(params))
  out = {}
  for path, value in flat.items():
    shape = np.shape(value)
    if path[-1] == "scale":
      out[path] = (1. + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    elif path == ("logit_scale",):
      out[path] = np.asarray(2.4, np.float32)
    elif path == ("logit_bias",):
      out[path] = np.asarray(-2.5, np.float32)
    else:
      out[path] = (0.15 * rng.standard_normal(shape)).astype(np.float32)
  return traverse_util.unflatten_dict(out)


def run_config(model_kwargs):
  return config_lib.finalize(ml_collections.ConfigDict(dict(
      total_steps=1, global_batch_size=8, family="two_tower", model_name="two_tower",
      model=model_kwargs, compute_dtype="float32",
      mesh=dict(data=-1, fsdp=1, tensor=1),
      sharding_rules=sharding.rules_preset("data_parallel"),
      input=dict(task="unused_by_export", image_size=IMAGE_SIZE, text_length=TEXT_LENGTH),
      checkpoint=dict(every_steps=1, max_to_keep=1, async_save=False))))


def make_workdir(path, model_kwargs, seed):
  """A vlpjax.train workdir (config.json, checkpoint step 1) holding perturbed params.

  Written with the trainer's own build and Checkpointer, as `vlpjax.train` leaves it.
  Returns (workdir, the params as numpy).
  """
  config = run_config(model_kwargs)
  setup = trainer.build(config)
  params = perturbed(setup.abstract_state["params"], seed)
  state = dict(setup.abstract_state, params=params)
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype)
                       if isinstance(x, jax.ShapeDtypeStruct) else x, state)
  state = jax.device_put(state, setup.state_shardings)
  os.makedirs(path)
  config_lib.save_json(config, os.path.join(path, "config.json"))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(path, "checkpoints"),
                                     **config.checkpoint.to_dict())
  ckpt.save(1, state, {"data_position": 8})
  ckpt.wait()
  ckpt.close()
  return str(path), params


@pytest.fixture(scope="module")
def siglip_workdir(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp("siglip") / "workdir", SIGLIP_KWARGS, 1)


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp("clip") / "workdir", CLIP_KWARGS, 2)


def images(seed=0, size=IMAGE_SIZE):
  return np.random.default_rng(seed).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)


def padded_texts(seed=0):
  """vlpjax two-tower texts: ids >= 2, padded with 0 to the length, no EOS."""
  rng = np.random.default_rng(seed)
  texts = rng.integers(2, VOCAB, (3, TEXT_LENGTH)).astype(np.int32)
  for row, length in zip(texts, (3, 5, TEXT_LENGTH)):
    row[length:] = 0
  return texts


def eos_texts(seed=0, eos=EOS):
  """CLIP texts: ids, then EOS, then padding (one row fills the length, EOS last)."""
  texts = padded_texts(seed)
  texts[texts == eos] = 2
  for row, length in zip(texts, (3, 5, TEXT_LENGTH - 1)):
    row[length] = eos
  return texts


def vlpjax_embeddings(model_kwargs, params, image_batch, texts):
  zimg, ztxt, _ = jax.jit(TwoTower(**model_kwargs).apply)({"params": params}, image_batch,
                                                          texts)
  return np.asarray(zimg), np.asarray(ztxt)


def hf_embeddings(model, image_batch, texts):
  """L2-normalised image and text features of an HF SiglipModel / CLIPModel, in float32."""
  with torch.no_grad():
    pixel_values = torch.from_numpy(image_batch.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    img = model.get_image_features(pixel_values=pixel_values.to(model.dtype))
    txt = model.get_text_features(input_ids=torch.from_numpy(texts).long())
  # transformers 5 returns a ModelOutput here, 4.x the pooled tensor itself.
  img, txt = (getattr(x, "pooler_output", x).float() for x in (img, txt))
  return ((img / img.norm(dim=-1, keepdim=True)).numpy(),
          (txt / txt.norm(dim=-1, keepdim=True)).numpy())


def file_data_bytes(path):
  from safetensors import safe_open
  with safe_open(path, framework="np") as f:
    return sum(f.get_tensor(k).nbytes for k in f.keys())


# -- vlpjax -> HF ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, model_cls_name, texts_fn", [
    ("hf_siglip", "SiglipModel", padded_texts),
    ("hf_clip", "CLIPModel", eos_texts),
])
def test_export_to_hf_matches_transformers(fmt, model_cls_name, texts_fn, siglip_workdir,
                                           clip_workdir, tmp_path, capsys):
  (workdir, params), kwargs = ((siglip_workdir, SIGLIP_KWARGS) if fmt == "hf_siglip"
                               else (clip_workdir, CLIP_KWARGS))
  model_cls = getattr(transformers, model_cls_name)
  image_batch, texts = images(), texts_fn()
  want_img, want_txt = vlpjax_embeddings(kwargs, params, image_batch, texts)

  out = export_checkpoint.export(workdir, str(tmp_path / "f32"), fmt)
  printed = capsys.readouterr().out
  assert "model.safetensors" in printed and "params" in printed
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                     "preprocessor_config.json"]
  model = model_cls.from_pretrained(out).eval()
  # HF texts are the vlpjax ids as input_ids, no attention mask (SigLIP: padding with 0 and
  # no EOS, pooled at the last position; CLIP: pooled at the first EOS).
  got_img, got_txt = hf_embeddings(model, image_batch, texts)
  np.testing.assert_allclose(got_img, want_img, atol=1e-4)
  np.testing.assert_allclose(got_txt, want_txt, atol=1e-4)
  assert float(model.logit_scale.detach().reshape(())) == pytest.approx(2.4)
  # The exported image processor maps uint8 pixels as vlpjax's `value_range(-1, 1)` does.
  processor = transformers.AutoImageProcessor.from_pretrained(out)
  pixels = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  processed = processor(images=pixels, return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(processed[0].transpose(1, 2, 0), pixels / 127.5 - 1., atol=1e-6)

  out16 = export_checkpoint.export(workdir, str(tmp_path / "bf16"), fmt, dtype="bfloat16")
  with open(os.path.join(out16, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  f32_file, bf16_file = (os.path.join(d, "model.safetensors") for d in (out, out16))
  assert file_data_bytes(bf16_file) * 2 == file_data_bytes(f32_file)
  assert os.path.getsize(bf16_file) < 0.55 * os.path.getsize(f32_file)
  model16 = model_cls.from_pretrained(out16).eval().float()
  got_img, got_txt = hf_embeddings(model16, image_batch, texts)
  np.testing.assert_allclose(got_img, want_img, atol=5e-2)
  np.testing.assert_allclose(got_txt, want_txt, atol=5e-2)


def test_clip_export_without_image_projection_is_identity():
  """embed_dim == image width and no `proj`: an identity visual_projection."""
  kwargs = dict(CLIP_KWARGS, embed_dim=32)
  image_batch, texts = images(1), eos_texts(1)
  shapes = jax.eval_shape(TwoTower(**kwargs).init, jax.random.PRNGKey(0), image_batch, texts)
  params = perturbed(shapes["params"], 3)
  assert "proj" not in params["img"]
  config = transformers.CLIPConfig(**hf_clip.hf_clip_config(kwargs, IMAGE_SIZE))
  model = transformers.CLIPModel(config).eval()
  state = {k: torch.from_numpy(v) for k, v in hf_clip.hf_clip_from_params(params).items()}
  np.testing.assert_array_equal(state["visual_projection.weight"], np.eye(32))
  model.load_state_dict(state, strict=True)
  want = vlpjax_embeddings(kwargs, params, image_batch, texts)
  for got, ref in zip(hf_embeddings(model, image_batch, texts), want):
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_hf_config_refuses_what_hf_cannot_express():
  with pytest.raises(ValueError, match=r"image\.pool_type"):
    hf_siglip.hf_siglip_config(CLIP_KWARGS, IMAGE_SIZE)
  with pytest.raises(ValueError, match=r"text\.pool_type"):
    hf_siglip.hf_siglip_config(dict(SIGLIP_KWARGS, text=CLIP_KWARGS["text"]), IMAGE_SIZE)
  with pytest.raises(ValueError, match=r"image\.head_dim_out"):
    hf_siglip.hf_siglip_config(dict(SIGLIP_KWARGS, embed_dim=16), IMAGE_SIZE)
  with pytest.raises(ValueError, match=r"bias_init"):
    hf_siglip.hf_siglip_config(dict(SIGLIP_KWARGS, bias_init=None), IMAGE_SIZE)
  with pytest.raises(ValueError, match=r"image\.posemb"):
    hf_siglip.hf_siglip_config(
        dict(SIGLIP_KWARGS, image=dict(SIGLIP_KWARGS["image"], posemb="sincos2d")),
        IMAGE_SIZE)
  with pytest.raises(ValueError, match="multiple of the patch"):
    hf_siglip.hf_siglip_config(SIGLIP_KWARGS, 18)

  with pytest.raises(ValueError, match=r"text\.eos_id.*legacy"):
    hf_clip.hf_clip_config(dict(CLIP_KWARGS, text=dict(CLIP_KWARGS["text"], eos_id=2)),
                           IMAGE_SIZE)
  with pytest.raises(ValueError, match=r"image\.proj_bias"):
    hf_clip.hf_clip_config(dict(CLIP_KWARGS, image=dict(CLIP_KWARGS["image"],
                                                        proj_bias=True)), IMAGE_SIZE)
  with pytest.raises(ValueError, match=r"text\.causal"):
    hf_clip.hf_clip_config(dict(CLIP_KWARGS, text=dict(CLIP_KWARGS["text"], causal=False)),
                           IMAGE_SIZE)
  with pytest.raises(ValueError, match=r"image\.pre_norm"):
    hf_clip.hf_clip_config(dict(CLIP_KWARGS, image=dict(CLIP_KWARGS["image"],
                                                        pre_norm=False)), IMAGE_SIZE)
  with pytest.raises(ValueError, match=r"bias_init"):
    hf_clip.hf_clip_config(dict(CLIP_KWARGS, bias_init=-10.), IMAGE_SIZE)
  # The config functions resolve `variant`s through the towers' own tables.
  config = hf_siglip.hf_siglip_config(
      dict(SIGLIP_KWARGS, image=dict(pool_type="map", variant="mu/4"), embed_dim=None),
      IMAGE_SIZE)
  assert config["vision_config"]["hidden_size"] == 32
  assert config["vision_config"]["patch_size"] == 4
  assert config["text_config"]["projection_size"] == 32


def test_export_errors(siglip_workdir, clip_workdir, tmp_path):
  workdir, _ = siglip_workdir
  with pytest.raises(ValueError, match=r"image\.pool_type"):  # before reading any array
    export_checkpoint.export(clip_workdir[0], str(tmp_path / "a"), "hf_siglip")
  with pytest.raises(ValueError, match="--format"):
    export_checkpoint.export(workdir, str(tmp_path / "b"), "onnx")
  with pytest.raises(ValueError, match="--dtype"):
    export_checkpoint.export(workdir, str(tmp_path / "c"), "orbax", dtype="int8")
  with pytest.raises(ValueError, match="no checkpoint at step 7"):
    export_checkpoint.export(workdir, str(tmp_path / "d"), "orbax", step=7)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  with pytest.raises(ValueError, match="not empty"):
    export_checkpoint.export(workdir, str(tmp_path / "full"), "orbax")
  coca = tmp_path / "coca"
  coca.mkdir()
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  (coca / "config.json").write_text(json.dumps(dict(config, family="coca")))
  with pytest.raises(ValueError, match="two-tower models only"):
    export_checkpoint.export(str(coca), str(tmp_path / "e"), "hf_clip")


def test_command_lines_report_errors_without_a_traceback(siglip_workdir, tmp_path, capsys):
  workdir, _ = siglip_workdir
  # "hf-clip" is accepted for hf_clip; a SigLIP-shaped run cannot become CLIP.
  assert export_checkpoint.main(["--workdir", workdir, "--format", "hf-clip",
                                 "--out", str(tmp_path / "a")]) == 1
  assert "Error: config.model.image.pool_type='map' cannot be exported" in capsys.readouterr().err
  other = tmp_path / "bert"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
  assert import_checkpoint.main(["--hf", str(other), "--out", str(tmp_path / "b")]) == 1
  assert "model_type 'bert'" in capsys.readouterr().err


# -- orbax / safetensors ---------------------------------------------------------------------

def test_orbax_and_safetensors_exports_read_back_equal(siglip_workdir, tmp_path):
  workdir, params = siglip_workdir
  out = export_checkpoint.export(workdir, str(tmp_path / "orbax"), "orbax")
  jax.tree.map(np.testing.assert_array_equal, checkpoint_lib.load_params(out), params)

  out = export_checkpoint.export(workdir, str(tmp_path / "st"), "safetensors")
  read, config = export_checkpoint.read_safetensors_export(out)
  jax.tree.map(np.testing.assert_array_equal, read, params)
  with open(os.path.join(workdir, "config.json")) as f:
    assert config == json.load(f)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f) == config
  from safetensors import safe_open
  with safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
    assert "img/encoder/layers_0/self_attn/q_proj/kernel" in f.keys()

  out = export_checkpoint.export(workdir, str(tmp_path / "st16"), "safetensors",
                                 dtype="bfloat16")
  read, _ = export_checkpoint.read_safetensors_export(out)
  want = export_checkpoint.cast_floats(params, export_checkpoint.DTYPES["bfloat16"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.view(np.uint16),
                                                          b.view(np.uint16)), read, want)


# -- HF -> vlpjax ----------------------------------------------------------------------------

def _perturb_torch(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1. + 0.1 * torch.randn_like(p))
      elif name in ("logit_scale", "logit_bias"):
        p.fill_(2.4 if name == "logit_scale" else -2.5)
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def hf_siglip_dir(tmp_path_factory):
  config = transformers.SiglipConfig(
      vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, patch_size=4, image_size=IMAGE_SIZE),
      text_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, vocab_size=VOCAB, projection_size=32,
                       max_position_embeddings=TEXT_LENGTH))
  model = _perturb_torch(transformers.SiglipModel(config), 0)
  path = str(tmp_path_factory.mktemp("hf") / "siglip")
  model.save_pretrained(path)
  return path, model


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
  config = transformers.CLIPConfig(
      vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, patch_size=4, image_size=IMAGE_SIZE,
                         hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
      text_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, vocab_size=VOCAB,
                       max_position_embeddings=TEXT_LENGTH, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6, eos_token_id=EOS, pad_token_id=0,
                       bos_token_id=None),
      projection_dim=24)
  model = _perturb_torch(transformers.CLIPModel(config), 1)
  path = str(tmp_path_factory.mktemp("hf") / "clip")
  model.save_pretrained(path)
  return path, model


@pytest.mark.parametrize("which", ["siglip", "clip"])
def test_import_hf_matches_transformers(which, hf_siglip_dir, hf_clip_dir, tmp_path, capsys):
  hf_dir, model = hf_siglip_dir if which == "siglip" else hf_clip_dir
  texts = padded_texts(2) if which == "siglip" else eos_texts(2)
  out = str(tmp_path / "params")
  kwargs = import_checkpoint.import_hf(hf_dir, out)
  printed = capsys.readouterr().out
  assert f"c.init_from = dict(path={os.path.abspath(out)!r})" in printed
  assert 'c.optim.freeze = "img/.*"' in printed
  with open(os.path.join(out, "model.json")) as f:
    assert json.load(f) == json.loads(json.dumps(kwargs))
  params = checkpoint_lib.load_params(out)
  # Exactly the tree vlpjax would init for these kwargs.
  want_shapes = jax.eval_shape(TwoTower(**kwargs).init, jax.random.PRNGKey(0), images(),
                               texts)["params"]
  assert (jax.tree.map(lambda x: x.shape, nn.unbox(want_shapes))
          == jax.tree.map(np.shape, params))

  got = vlpjax_embeddings(kwargs, params, images(2), texts)
  want = hf_embeddings(model, images(2), texts)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4)


def test_import_at_another_image_size_resamples_posemb(hf_siglip_dir, tmp_path):
  hf_dir, model = hf_siglip_dir
  kwargs = import_checkpoint.import_hf(hf_dir, str(tmp_path / "p24"), image_size=24)
  params = checkpoint_lib.load_params(str(tmp_path / "p24"))
  hf_pos = model.vision_model.embeddings.position_embedding.weight.detach().numpy()
  np.testing.assert_allclose(params["img"]["position_embedding"]["embedding"],
                             posemb.resample_posemb(hf_pos, 36), rtol=1e-6)
  zimg, _ = vlpjax_embeddings(kwargs, params, images(size=24), padded_texts())
  assert zimg.shape == (3, 32) and np.all(np.isfinite(zimg))
  with pytest.raises(ValueError, match="multiple of the patch size"):
    import_checkpoint.import_hf(hf_dir, str(tmp_path / "p18"), image_size=18)
  with pytest.raises(ValueError, match="already exists"):
    import_checkpoint.import_hf(hf_dir, str(tmp_path / "p24"))


def test_clip_legacy_eos_pools_the_largest_id(hf_clip_dir):
  """eos_token_id == 2 (old OpenAI configs): HF pools the largest id, vlpjax the last id."""
  hf_dir, model = hf_clip_dir
  with open(os.path.join(hf_dir, "config.json")) as f:
    config = json.load(f)
  config["text_config"]["eos_token_id"] = 2
  kwargs = hf_clip.twotower_kwargs_from_hf_clip_config(config)
  assert kwargs["text"]["eos_id"] == VOCAB - 1
  from vlpjax.interop import hf_lm
  params = hf_clip.params_from_hf_clip(hf_lm.read_safetensors(hf_dir), config)
  texts = eos_texts(3, eos=VOCAB - 1)
  model.text_model.eos_token_id = 2
  try:
    want = hf_embeddings(model, images(3), texts)
  finally:
    model.text_model.eos_token_id = EOS
  got = vlpjax_embeddings(kwargs, params, images(3), texts)
  np.testing.assert_allclose(got[1], want[1], atol=1e-4)


def test_import_refuses_unsupported_hf_models(hf_clip_dir, tmp_path):
  hf_dir, _ = hf_clip_dir
  with open(os.path.join(hf_dir, "config.json")) as f:
    config = json.load(f)
  quick = json.loads(json.dumps(config))
  quick["vision_config"]["hidden_act"] = "quick_gelu"
  with pytest.raises(ValueError, match="quick_gelu"):
    hf_clip.twotower_kwargs_from_hf_clip_config(quick)
  eps = json.loads(json.dumps(config))
  eps["text_config"]["layer_norm_eps"] = 1e-5
  with pytest.raises(ValueError, match="layer_norm_eps"):
    hf_clip.twotower_kwargs_from_hf_clip_config(eps)
  other = tmp_path / "bert"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="model_type 'bert'"):
    import_checkpoint.import_hf(str(other), str(tmp_path / "out"))


def test_clip_round_trip_is_exact(hf_clip_dir):
  """HF -> vlpjax -> HF gives back every tensor (the class-token fold included)."""
  hf_dir, model = hf_clip_dir
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  from vlpjax.interop import hf_lm
  config = hf_lm.read_hf_config(hf_dir)
  back = hf_clip.hf_clip_from_params(hf_clip.params_from_hf_clip(state, config))
  assert set(back) == set(state) - {"vision_model.embeddings.position_ids",
                                     "text_model.embeddings.position_ids"}
  for key, value in back.items():
    if key in ("vision_model.embeddings.class_embedding",
               "vision_model.embeddings.position_embedding.weight"):
      continue  # Row 0 moves into the class embedding (checked below).
    np.testing.assert_array_equal(value, state[key], err_msg=key)
  pos, cls = (state[f"vision_model.embeddings.{k}"]
              for k in ("position_embedding.weight", "class_embedding"))
  np.testing.assert_allclose(back["vision_model.embeddings.class_embedding"], cls + pos[0])
  np.testing.assert_array_equal(back["vision_model.embeddings.position_embedding.weight"],
                                np.concatenate([np.zeros_like(pos[:1]), pos[1:]]))


# -- position embedding resampling -----------------------------------------------------------

def test_resample_posemb_identity_and_errors():
  table = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
  assert posemb.resample_posemb(table, 16) is table
  with pytest.raises(ValueError, match="not a square"):
    posemb.resample_posemb(table[:15], 16)
  with pytest.raises(ValueError, match="not a square"):
    posemb.resample_posemb(table, 10)
  with pytest.raises(ValueError, match=r"\[num_tokens, width\]"):
    posemb.resample_posemb(table[:, 0], 16)


def test_resample_posemb_upsamples_a_linear_field_exactly():
  """Bilinear (half-pixel centres, edge clamped) reproduces a linear field at each sample."""
  old, new, width = 4, 7, 3
  a, b, c = np.array([0.3, -1.0, 2.0]), np.array([0.7, 0.2, -0.5]), np.array([1., 0., .5])
  y, x = np.meshgrid(np.arange(old), np.arange(old), indexing="ij")
  field = (a * y[..., None] + b * x[..., None] + c).reshape(old * old, width)
  coord = np.clip((np.arange(new) + 0.5) * old / new - 0.5, 0, old - 1)
  yy, xx = np.meshgrid(coord, coord, indexing="ij")
  want = (a * yy[..., None] + b * xx[..., None] + c).reshape(new * new, width)
  np.testing.assert_allclose(posemb.resample_posemb(field.astype(np.float32), new * new),
                             want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("old, new", [(8, 3), (12, 8), (4, 9)])
def test_resample_posemb_matches_jax_image_resize(old, new):
  """Antialiased when shrinking: the same as jax.image.resize('linear', antialias=True)."""
  y, x = np.meshgrid(np.linspace(0, 3, old), np.linspace(0, 3, old), indexing="ij")
  field = np.stack([np.sin(y) * np.cos(x), np.cos(2 * y + x), y * x / 9], -1)
  want = jax.image.resize(jnp.asarray(field, jnp.float32), (new, new, 3), "linear",
                          antialias=True)
  got = posemb.resample_posemb(field.reshape(-1, 3).astype(np.float32), new * new)
  np.testing.assert_allclose(got, np.asarray(want).reshape(-1, 3), atol=1e-5)
  constant = posemb.resample_posemb(np.full((old * old, 2), 0.25, np.float32), new * new)
  np.testing.assert_allclose(constant, 0.25, rtol=1e-6)
