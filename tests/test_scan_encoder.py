"""`scan_layers` for the transformer encoders (`layers.Encoder` and the towers built on it).

The reference for a scanned model is the unscanned one with the same weights: its params,
restacked by `scan_util.stack_layers`, must give the same outputs and gradients, export to the
same Hugging Face tensors and count the same matmuls. Tiny models, random (perturbed) weights
so that a block applied out of order or twice cannot hide behind an identity-like init.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from vlpjax import checkpoint as checkpoint_lib
from vlpjax import config as config_lib
from vlpjax import families
from vlpjax import flops
from vlpjax import init_from
from vlpjax import sharding
from vlpjax.interop import hf_clip, hf_siglip
from vlpjax.models import layers, scan_util
from vlpjax.models.coca import CoCa
from vlpjax.models.text import TextEncoder
from vlpjax.models.two_tower import TwoTower
from vlpjax.models.video import TemporalEncoder
from vlpjax.models.vit import ViT
from vlpjax.models.vlm import VLM

KEY = jax.random.key(0)
RTOL, ATOL = 1e-5, 1e-6
VIT = dict(width=32, depth=3, mlp_dim=48, num_heads=4, patch_size=4)
TEXT = dict(vocab_size=50, width=16, depth=2, mlp_dim=32, num_heads=2, max_len=8)


def perturbed(params, seed=0):
  """Random values of `params`' shapes: LayerNorm scales near 1, everything else ~N(0, 0.2)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.unbox(params))
  out = {}
  for path, value in flat.items():
    noise = rng.standard_normal(np.shape(value)).astype(np.float32)
    out[path] = 1. + 0.1 * noise if path[-1] == "scale" else 0.2 * noise
  return traverse_util.unflatten_dict(out)


def random_images(batch=2, size=8, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def random_texts(batch=2, length=8, seed=2):
  return np.random.default_rng(seed).integers(2, TEXT["vocab_size"], (batch, length),
                                              dtype=np.int32)


def shapes(tree):
  return jax.tree.map(np.shape, nn.unbox(tree))


def outputs_of(out):
  """The arrays of a model's output (tuples and dicts of arrays, Nones dropped)."""
  return [np.asarray(x) for x in jax.tree.leaves(out)]


def assert_grads_close(got, want):
  """Gradient trees equal up to float32 rounding relative to the largest gradient entry.

  The scan and the unrolled loop fuse and order their sums differently, so an entry that is
  the small difference of large terms differs by the rounding of those terms, not of itself
  (the key-projection bias, whose exact gradient is 0 as softmax ignores a shift, is all
  such noise).
  """
  scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=RTOL,
                                                       atol=RTOL * scale + ATOL),
               got, want)


def assert_scan_matches(make, args, seed=0, restack=scan_util.stack_layers, **apply_kwargs):
  """make(scan_layers) -> model; scanned and unscanned with the same weights agree.

  Checks that the scanned model's own init has exactly the restacked tree (`restack`: the
  unscanned params -> the scanned model's), that every output is equal, and that the
  gradients of a random projection of the outputs are equal (the scanned gradient restacked
  from the unscanned one). Returns both params.
  """
  plain, scanned = make(False), make(True)
  params = perturbed(jax.eval_shape(plain.init, KEY, *args)["params"], seed)
  stacked = restack(params)
  assert shapes(jax.eval_shape(scanned.init, KEY, *args)["params"]) == shapes(stacked)

  def apply(model, p):
    return model.apply({"params": p}, *args, **apply_kwargs)

  want, got = outputs_of(jax.jit(lambda p: apply(plain, p))(params)), outputs_of(
      jax.jit(lambda p: apply(scanned, p))(stacked))
  assert len(want) == len(got)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)

  weights = [np.random.default_rng(seed + 1).standard_normal(w.shape).astype(np.float32)
             for w in want]

  def loss(model, p):
    leaves = jax.tree.leaves(apply(model, p))
    return sum(jnp.sum(x.astype(jnp.float32) * w) for x, w in zip(leaves, weights))

  grad_plain = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
  grad_scanned = jax.jit(jax.grad(lambda p: loss(scanned, p)))(stacked)
  assert_grads_close(grad_scanned, restack(grad_plain))
  return params, stacked


# -------------------------------------------------------------------------------- helpers


def test_stack_and_unstack_layers_are_inverse_and_check_their_input():
  rng = np.random.default_rng(0)
  block = lambda: {"mlp": {"kernel": rng.standard_normal((2, 3))},
                   "norm": {"scale": rng.standard_normal(3)}}
  tree = {"img": {"encoder": {"layers_0": block(), "layers_1": block(), "layers_2": block(),
                              "encoder_norm": {"scale": np.ones(3)}}},
          "llm": {"layers": {"layers_0": block(), "layers_1": block()}},
          "logit_scale": np.float32(2.)}
  stacked = scan_util.stack_layers(tree)
  enc = stacked["img"]["encoder"]
  assert set(enc) == {"scanned", "encoder_norm"}
  assert set(stacked["llm"]["layers"]) == {"scanned"}
  # Block i is row i of every stacked leaf.
  for i in range(3):
    np.testing.assert_array_equal(enc["scanned"]["mlp"]["kernel"][i],
                                  tree["img"]["encoder"][f"layers_{i}"]["mlp"]["kernel"])
  assert enc["scanned"]["norm"]["scale"].shape == (3, 3)
  back = scan_util.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)
  again = scan_util.stack_layers(back)
  jax.tree.map(np.testing.assert_array_equal, again, stacked)

  with pytest.raises(ValueError, match=r"enc has layers \[0, 2\]"):
    scan_util.stack_layers({"enc": {"layers_0": block(), "layers_2": block()}})
  with pytest.raises(ValueError, match="enc/layers_1 has other params"):
    scan_util.stack_layers({"enc": {"layers_0": block(), "layers_1": {"x": np.ones(2)}}})
  with pytest.raises(ValueError, match="both 'scanned' and layers_"):
    scan_util.unstack_layers({"scanned": block(), "layers_0": block()})


def test_match_layers_converts_only_where_the_target_layout_differs():
  rng = np.random.default_rng(1)
  block = lambda: {"kernel": rng.standard_normal((2, 2))}
  source = {"img": {"encoder": {"layers_0": block(), "layers_1": block()}},
            "txt": {"encoder": {"scanned": {"kernel": rng.standard_normal((2, 2, 2))}}},
            "other": {"layers_0": block()}}
  like = {"img": {"encoder": {"scanned": {"kernel": np.zeros((2, 2, 2))}}},
          "txt": {"encoder": {"layers_0": block(), "layers_1": block()}}}
  converted = []
  out = scan_util.match_layers(source, like, converted=converted)
  assert converted == ["img/encoder -> scanned", "txt/encoder -> layers_*"]
  np.testing.assert_array_equal(out["img"]["encoder"]["scanned"]["kernel"][1],
                                source["img"]["encoder"]["layers_1"]["kernel"])
  np.testing.assert_array_equal(out["txt"]["encoder"]["layers_1"]["kernel"],
                                source["txt"]["encoder"]["scanned"]["kernel"][1])
  assert set(out["other"]) == {"layers_0"}  # Not in `like`: left alone.


# ------------------------------------------------------------------------- models agree


def test_encoder_tree_and_logical_axes():
  x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
  plain = layers.Encoder(3, 32, 2)
  scanned = layers.Encoder(3, 32, 2, scan_layers=True)
  names = jax.eval_shape(scanned.init, KEY, x)["params"]
  assert set(names) == {"scanned", "encoder_norm"}
  plain_names = jax.eval_shape(plain.init, KEY, x)["params"]
  assert set(plain_names) == {"layers_0", "layers_1", "layers_2", "encoder_norm"}
  # Every stacked leaf: the unscanned leaf's logical names behind a leading `layers` axis.
  flat = traverse_util.flatten_dict(names["scanned"])
  flat_plain = traverse_util.flatten_dict(plain_names["layers_0"])
  assert set(flat) == set(flat_plain)
  for path, boxed in flat.items():
    assert boxed.names == ("layers",) + flat_plain[path].names, path
    assert boxed.value.shape == (3,) + flat_plain[path].value.shape, path


@pytest.mark.parametrize("vit_kwargs", [
    dict(pool_type="map"),
    dict(pool_type="tok", pre_norm=True, head_dim_out=24, proj_bias=False),
], ids=["map", "tok_pre_norm"])
def test_vit_scanned_matches_unscanned(vit_kwargs):
  assert_scan_matches(lambda scan: ViT(**VIT, **vit_kwargs, scan_layers=scan),
                      (random_images(),))


@pytest.mark.parametrize("causal", [False, True])
def test_text_encoder_scanned_matches_unscanned(causal):
  assert_scan_matches(
      lambda scan: TextEncoder(**TEXT, causal=causal, pool_type="gap", out_dim=12,
                               scan_layers=scan), (random_texts(),))


def test_two_tower_scan_reaches_both_towers_unless_a_tower_says_otherwise():
  args = (random_images(), random_texts())
  kwargs = dict(image=VIT, text=TEXT, embed_dim=24)
  _, stacked = assert_scan_matches(lambda scan: TwoTower(**kwargs, scan_layers=scan), args)
  assert "scanned" in stacked["img"]["encoder"] and "scanned" in stacked["txt"]["encoder"]
  # A tower's own kwargs win over the shared setting.
  mixed = TwoTower(image=dict(VIT, scan_layers=False), text=TEXT, embed_dim=24,
                   scan_layers=True)
  tree = jax.eval_shape(mixed.init, KEY, *args)["params"]
  assert "layers_0" in tree["img"]["encoder"] and "scanned" in tree["txt"]["encoder"]


def test_temporal_encoder_scanned_matches_unscanned():
  rng = np.random.default_rng(3)
  tokens = rng.standard_normal((2, 4, 1, 16)).astype(np.float32)
  times = rng.uniform(0, 1, (2, 4)).astype(np.float32)
  segments = np.array([[1, 1, 2, 0], [1, 1, 1, 1]], np.int32)
  assert_scan_matches(
      lambda scan: TemporalEncoder(2, 32, 2, num_time_positions=10, scan_layers=scan),
      (tokens, times, segments))


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_applies_inside_the_scan(policy):
  make = lambda scan, remat="none": ViT(**VIT, pool_type="gap", scan_layers=scan,
                                        remat_policy=remat)
  images = random_images()
  # Values and gradients: the same function with and without remat, scanned or not.
  assert_scan_matches(lambda scan: make(scan, policy), (images,))
  params = perturbed(jax.eval_shape(make(True).init, KEY, images)["params"])

  def grad_program(model):
    loss = lambda p: jnp.sum(model.apply({"params": p}, images)[0] ** 2)
    return jax.make_jaxpr(jax.grad(loss))(params)

  def primitives(jaxpr):
    names = set()
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for value in eqn.params.values():
        for sub in flops.sub_jaxprs(value):
          names |= primitives(sub)
    return names

  program = grad_program(make(True, policy))
  assert {"scan", "remat2"} <= primitives(program.jaxpr)
  baseline = flops.matmul_flops(grad_program(make(True)))
  if policy == "full":  # The backward pass recomputes every block's matmuls.
    assert flops.matmul_flops(program) > baseline
  else:  # dots_saveable keeps the matmul outputs: nothing to recompute there.
    assert flops.matmul_flops(program) == baseline


def test_scanned_vit_forward_has_the_same_matmuls():
  images = random_images()
  counts = []
  for scan in (False, True):
    model = ViT(**VIT, pool_type="map", scan_layers=scan)
    params = nn.unbox(jax.eval_shape(model.init, KEY, images))["params"]
    counts.append(flops.matmul_flops(jax.make_jaxpr(
        lambda p, m=model: m.apply({"params": p}, images))(params)))
  assert counts[0] == counts[1]
  vit = ViT(parent=None, **VIT, pool_type="map")
  assert counts[0] == pytest.approx(2 * flops.vit_module_forward(vit, 8), rel=1e-12)


def test_families_forward_flops_match_the_trace_when_scanned():
  from tests import test_flops  # pylint: disable=g-import-not-at-top
  sections = {"model.image": dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8),
              "model.text": dict(width=24, depth=2, mlp_dim=48, num_heads=2, max_len=8,
                                 causal=True),
              "model": dict(embed_dim=16), "input": dict(text_length=8)}
  plain = families.get_family(test_flops.tiny_config("siglip_shapes.py", "size=16",
                                                     **sections))
  sections["model"] = dict(embed_dim=16, scan_layers=True)
  scanned = families.get_family(test_flops.tiny_config("siglip_shapes.py", "size=16",
                                                       **sections))
  assert scanned.model.scan_layers
  assert scanned.forward_flops(2) == plain.forward_flops(2)
  test_flops.assert_matches_trace(scanned, excess=2 * test_flops.causal_excess(8, 24, 2))

  video = test_flops.video_sections(image=dict(scan_layers=True),
                                    temporal=dict(depth=2, scan_layers=True))
  family = families.get_family(test_flops.tiny_config("vid2seq_shapes.py", **video))
  tree = jax.eval_shape(family.init, KEY, family.input_specs(2))
  assert "scanned" in tree["img"]["encoder"]
  assert "scanned" in tree["temporal_encoder"]["encoder"]
  test_flops.assert_matches_trace(
      family, 2 * test_flops.causal_excess(24, test_flops.q_dim(video["model.llm"]), 2))


def test_coca_and_vlm_scan_their_image_tower_through_its_kwargs():
  image = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
  text = dict(vocab_size=40, width=32, unimodal_depth=1, multimodal_depth=2, mlp_dim=64,
              num_heads=4, max_len=8)
  images = random_images(size=16)
  texts = np.random.default_rng(5).integers(2, 40, (2, 6), dtype=np.int32)
  for image_scan, lm_scan in ((True, False), (False, True)):
    coca = CoCa(image=dict(image, scan_layers=image_scan), text=text, embed_dim=16,
                num_caption_queries=2, scan_layers=lm_scan)
    tree = jax.eval_shape(coca.init, KEY, images, texts)["params"]
    assert ("scanned" in tree["img"]["encoder"]) == image_scan
    assert ("scanned" in tree["txt_multimodal"]) == lm_scan
  # CoCa's outputs with a scanned ViT are those of the unscanned one (only `img` restacked:
  # the text decoders stay unscanned).
  assert_scan_matches(
      lambda scan: CoCa(image=dict(image, scan_layers=scan), text=text, embed_dim=16,
                        num_caption_queries=2), (images, texts),
      restack=lambda p: {**p, "img": scan_util.stack_layers(p["img"])})

  llm = dict(vocab_size=64, width=32, depth=2, mlp_dim=64, num_heads=4)
  batch = dict(decoder_input_tokens=np.full((1, 10), 5, np.int32),
               decoder_segment_ids=np.ones((1, 10), np.int32),
               decoder_causal_attention=np.zeros((1, 10), np.int32),
               decoder_positions=np.arange(10, dtype=np.int32)[None],
               images=random_images(1, 16)[:, None])
  for image_scan, lm_scan in ((True, False), (False, True)):
    vlm = VLM(image=dict(image, scan_layers=image_scan), llm=llm, image_token_id=60,
              scan_layers=lm_scan)
    tree = jax.eval_shape(vlm.init, KEY, batch)["params"]
    assert ("scanned" in tree["img"]["encoder"]) == image_scan
    assert ("scanned" in tree["llm"]["layers"]) == lm_scan


# ------------------------------------------------------------------------------ sharding


def test_scanned_vit_params_get_a_leading_replicated_axis():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = sharding.rules_preset("fsdp_tensor")
  images = random_images()

  def specs(model):
    boxed = jax.eval_shape(model.init, KEY, images)["params"]
    shard = sharding.param_shardings(boxed, mesh, rules)
    return boxed, shard

  _, plain = specs(ViT(**VIT, pool_type="map"))
  boxed, scanned = specs(ViT(**VIT, pool_type="map", scan_layers=True))
  padded = lambda spec, ndim: tuple(spec) + (None,) * (ndim - len(spec))
  flat = traverse_util.flatten_dict(scanned["encoder"]["scanned"])
  flat_plain = traverse_util.flatten_dict(plain["encoder"]["layers_0"])
  flat_shapes = traverse_util.flatten_dict(nn.unbox(boxed)["encoder"]["scanned"])
  sharded_somewhere = False
  for path, shard in flat.items():
    ndim = len(flat_shapes[path].shape)
    spec = padded(shard.spec, ndim)
    assert spec == (None,) + padded(flat_plain[path].spec, ndim - 1), path
    sharded_somewhere |= any(s is not None for s in spec)
  assert sharded_somewhere  # The rules do shard the blocks' other axes.
  assert scanned["encoder"]["encoder_norm"]["scale"].spec == plain["encoder"]["encoder_norm"][
      "scale"].spec

  # Placed on the 8 devices, each shard holds every layer; the forward pass runs as is.
  params = perturbed(boxed)
  placed = jax.device_put(params, scanned)
  kernel = placed["encoder"]["scanned"]["mlp"]["fc1"]["kernel"]
  assert all(s.data.shape[0] == VIT["depth"] for s in kernel.addressable_shards)
  model = ViT(**VIT, pool_type="map", scan_layers=True)
  want = model.apply({"params": params}, images)[0]
  with sharding.logical_context(mesh, rules):
    got = jax.jit(lambda p: model.apply({"params": p}, images)[0])(placed)
  # Sharded matmuls sum in another order: an output near 0 among outputs of size ~5 keeps
  # the rounding of the large terms, so the tolerance scales with the largest output.
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * float(np.abs(want).max()) + ATOL)


# ------------------------------------------------------------------------------ HF interop


def _two_tower_params(kwargs, texts, seed):
  model = TwoTower(**kwargs)
  shapes_ = jax.eval_shape(model.init, KEY, random_images(3, 16), texts)["params"]
  return perturbed(shapes_, seed)


@pytest.mark.parametrize("which", ["siglip", "clip"])
def test_hf_export_and_import_of_a_scanned_two_tower(which):
  from tests import test_export_import as ei  # pylint: disable=g-import-not-at-top
  kwargs, texts = ((ei.SIGLIP_KWARGS, ei.padded_texts()) if which == "siglip"
                   else (ei.CLIP_KWARGS, ei.eos_texts()))
  to_hf = hf_siglip.hf_siglip_from_params if which == "siglip" else hf_clip.hf_clip_from_params
  from_hf = hf_siglip.params_from_hf_siglip if which == "siglip" else hf_clip.params_from_hf_clip
  config_fn = hf_siglip.hf_siglip_config if which == "siglip" else hf_clip.hf_clip_config
  params = _two_tower_params(kwargs, texts, seed=4)
  stacked = scan_util.stack_layers(params)
  assert "scanned" in stacked["img"]["encoder"] and "scanned" in stacked["txt"]["encoder"]

  want = to_hf(params)
  got = to_hf(stacked)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  hf_config = config_fn(dict(kwargs, scan_layers=True), ei.IMAGE_SIZE)
  assert hf_config == config_fn(kwargs, ei.IMAGE_SIZE)
  # Import: the unscanned conversion (CLIP's folds its class token and patch bias into
  # other tensors, so it is not `params` itself), stacked.
  imported = from_hf(want, hf_config, scan_layers=True)
  jax.tree.map(np.testing.assert_array_equal, imported,
               scan_util.stack_layers(from_hf(want, hf_config)))
  scanned_model = dict(kwargs, scan_layers=True)
  assert shapes(jax.eval_shape(TwoTower(**scanned_model).init, KEY, ei.images(), texts)[
      "params"]) == shapes(imported)
  got_emb = ei.vlpjax_embeddings(scanned_model, imported, ei.images(), texts)
  want_emb = ei.vlpjax_embeddings(kwargs, params, ei.images(), texts)
  for g, w in zip(got_emb, want_emb):
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_scanned_run_exports_to_transformers_and_imports_scanned(tmp_path):
  """The tools end to end: a scanned SigLIP workdir -> HF (checked by transformers) -> a
  scanned params dir whose embeddings are the run's."""
  from tests import test_export_import as ei  # pylint: disable=g-import-not-at-top
  from tools import export_checkpoint, import_checkpoint  # pylint: disable=g-import-not-at-top
  kwargs = dict(ei.SIGLIP_KWARGS, scan_layers=True)
  workdir, params = ei.make_workdir(tmp_path / "workdir", kwargs, 5)
  assert "scanned" in params["img"]["encoder"]
  image_batch, texts = ei.images(), ei.padded_texts()
  want = ei.vlpjax_embeddings(kwargs, params, image_batch, texts)

  out = export_checkpoint.export(workdir, str(tmp_path / "hf"), "hf_siglip")
  model = ei.transformers.SiglipModel.from_pretrained(out).eval()
  for got, ref in zip(ei.hf_embeddings(model, image_batch, texts), want):
    np.testing.assert_allclose(got, ref, atol=1e-4)

  back = str(tmp_path / "params")
  imported_kwargs = import_checkpoint.import_hf(out, back, scan_layers=True)
  assert imported_kwargs["scan_layers"] is True
  with open(os.path.join(back, "model.json")) as f:
    assert json.load(f)["scan_layers"] is True
  loaded = checkpoint_lib.load_params(back)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), loaded, params)


# ------------------------------------------------------------------------------ init_from


def _init_cfg(path, include=""):
  return ml_collections.ConfigDict(dict(path=path, include=include, step=-1))


def test_init_from_converts_between_layouts(tmp_path):
  images, texts = random_images(3, 16), random_texts()
  kwargs = dict(image=dict(VIT, pool_type="map"), text=TEXT, embed_dim=24)
  plain_params = _two_tower_params(kwargs, texts, seed=6)
  checkpoint_lib.save_params(str(tmp_path / "plain"), plain_params)
  stacked = scan_util.stack_layers(plain_params)
  checkpoint_lib.save_params(str(tmp_path / "scanned"), stacked)

  scanned_fresh = jax.jit(TwoTower(**kwargs, scan_layers=True).init)(KEY, images, texts)
  merged, lines = init_from.merge_init_params(nn.unbox(scanned_fresh["params"]),
                                              _init_cfg(str(tmp_path / "plain")))
  jax.tree.map(np.testing.assert_array_equal, merged, stacked)
  assert any("img/encoder -> scanned" in line and "txt/encoder -> scanned" in line
             for line in lines), lines

  plain_fresh = jax.jit(TwoTower(**kwargs).init)(KEY, images, texts)
  merged, lines = init_from.merge_init_params(nn.unbox(plain_fresh["params"]),
                                              _init_cfg(str(tmp_path / "scanned")))
  jax.tree.map(np.testing.assert_array_equal, merged, plain_params)
  assert any("img/encoder -> layers_*" in line for line in lines), lines

  # LiT-style partial load into a scanned model: the include regex sees this model's paths.
  merged, _ = init_from.merge_init_params(nn.unbox(scanned_fresh["params"]),
                                          _init_cfg(str(tmp_path / "plain"), "img/.*"))
  jax.tree.map(np.testing.assert_array_equal, merged["img"], stacked["img"])
  np.testing.assert_array_equal(merged["txt"]["encoder"]["scanned"]["mlp"]["fc1"]["kernel"],
                                nn.unbox(scanned_fresh["params"])["txt"]["encoder"]["scanned"][
                                    "mlp"]["fc1"]["kernel"])

  # A deeper scanned model cannot take a shallower stack: the error names the param.
  deeper = dict(kwargs, image=dict(kwargs["image"], depth=4))
  deeper_fresh = jax.eval_shape(TwoTower(**deeper, scan_layers=True).init, KEY, images, texts)
  with pytest.raises(config_lib.ConfigError,
                     match=r"img/encoder/scanned/\S+ has shape \(3, .* but \(4, "):
    init_from.merge_init_params(nn.unbox(deeper_fresh["params"]),
                                _init_cfg(str(tmp_path / "plain")))
