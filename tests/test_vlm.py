"""Prefix-LM VLM: image merging, packed rows, loss, cached captions, stages, sharding, data."""
import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from vlpjax import config as config_lib
from vlpjax import decoding
from vlpjax import optim
from vlpjax import sharding
from vlpjax import trainer
from vlpjax.data import packing
from vlpjax.families import vlm as vlm_family
from vlpjax.models import vlm as vlm_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "experiments", "vlm_shapes.py")
IMAGE_ID = 60   # <image> of the tiny test vocabulary
VOCAB = 64
SIZE, PATCH = 16, 8   # 4 tokens per image
T = 4
ROW, SLOTS = 32, 3


def tiny_config(arg="steps=4,batch=8,eval_every=0", overrides=(), lora_rank=0):
  """The demo config with tiny towers, a 64-id vocabulary and 16 px images."""
  config = config_lib.load(f"{DEMO}:{arg}")
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=PATCH)
  config.model.llm.update(vocab_size=VOCAB, width=32, depth=1, mlp_dim=64, num_heads=4,
                          num_kv_heads=2, lora_rank=lora_rank)
  config.model.image_token_id = IMAGE_ID
  # No registered task: the family then checks nothing against a vocabulary.
  config.input.update(task="", image_size=SIZE, row_length=ROW, max_images_per_row=SLOTS)
  config.evals = {}
  config.schedule.warmup_steps = 0  # a first step with lr > 0
  return config_lib.finalize(config, list(overrides))


def random_examples(rng, n, max_images=2):
  """Raw prefix-LM examples: 0-2 images, some prompt text, a target ending in EOS."""
  examples = []
  for i in range(n):
    n_img = int(rng.integers(0, max_images + 1))
    text = rng.integers(3, IMAGE_ID, size=int(rng.integers(0, 3))).tolist()
    examples.append(dict(
        id=str(i), inputs=np.array([IMAGE_ID] * n_img + text, np.int32),
        targets=np.array(rng.integers(3, IMAGE_ID, size=int(rng.integers(1, 5))).tolist() + [1],
                         np.int32),
        images=rng.uniform(-1, 1, (n_img, SIZE, SIZE, 3)).astype(np.float32)))
  return examples


def packed_batch(rows, seed=0, n_examples=40):
  rng = np.random.default_rng(seed)
  packed = packing.pack(random_examples(rng, n_examples), row_length=ROW,
                        max_images_per_row=SLOTS, tokens_per_image=T, image_token_id=IMAGE_ID,
                        image_shape=(SIZE, SIZE, 3))
  assert len(packed) >= rows
  return packing.batch_rows(packed[:rows])


def model_inputs(batch):
  return {k: batch[k] for k in vlm_family.TOKEN_KEYS + ("images",)}


def init_params(family, seed=0):
  specs = family.input_specs(1)
  init = jax.jit(lambda rng: nn.unbox(family.init(rng, {k: jnp.zeros(s.shape, s.dtype)
                                                        for k, s in specs.items()})))
  return jax.device_get(init(jax.random.key(seed)))


@pytest.fixture(scope="module")
def family_and_params():
  family = vlm_family.VLMFamily(tiny_config())
  return family, init_params(family)


# -- merging -------------------------------------------------------------------------------


def numpy_merge(tokens, is_image, images):
  out = tokens.copy()
  for b in range(tokens.shape[0]):
    k = 0
    for pos in range(tokens.shape[1]):
      if is_image[b, pos]:
        out[b, pos] = images[b, k]
        k += 1
  return out


def test_merge_puts_each_image_at_its_placeholders():
  # Row 0: two examples, the first with two images and the second with one (three slots);
  # row 1: text only; row 2: one image.
  ex = lambda n_img, text, tgt: dict(
      inputs=np.array([IMAGE_ID] * n_img + text, np.int32), targets=np.array(tgt, np.int32),
      images=np.zeros((n_img, SIZE, SIZE, 3), np.float32))
  rows = [packing.pack([ex(2, [5], [6, 1]), ex(1, [7, 8], [9, 1])], **_pack_args())[0],
          packing.pack([ex(0, [5, 6], [7, 1])], **_pack_args())[0],
          packing.pack([ex(1, [], [4, 4, 1])], **_pack_args())[0]]
  batch = packing.batch_rows(rows)
  is_image = batch["decoder_input_tokens"] == IMAGE_ID
  assert is_image.sum(axis=1).tolist() == [3 * T, 0, T]
  d = 5
  # Image token t of slot s of row b is the vector filled with 1000 b + 10 s + t.
  b, s, t = np.meshgrid(np.arange(3), np.arange(SLOTS), np.arange(T), indexing="ij")
  images = np.repeat((1000 * b + 10 * s + t).reshape(3, SLOTS * T, 1), d, axis=2).astype(np.float32)
  tokens = np.random.default_rng(0).normal(size=(3, ROW, d)).astype(np.float32)
  merged = np.asarray(vlm_lib.merge_image_tokens(jnp.asarray(tokens), jnp.asarray(is_image),
                                                 jnp.asarray(images, jnp.float32)))
  np.testing.assert_allclose(merged, numpy_merge(tokens, is_image, images), rtol=1e-6)
  # Semantics of packing's invariant: group k of T image positions is slot k, in order.
  positions = np.nonzero(is_image[0])[0]
  np.testing.assert_array_equal(merged[0, positions, 0],
                                [10 * s + t for s in range(3) for t in range(T)])
  np.testing.assert_array_equal(merged[1], tokens[1])  # text-only row untouched
  np.testing.assert_array_equal(merged[~is_image], tokens[~is_image])


def _pack_args():
  return dict(row_length=ROW, max_images_per_row=SLOTS, tokens_per_image=T,
              image_token_id=IMAGE_ID, image_shape=(SIZE, SIZE, 3))


def test_tokens_per_image_and_config_mismatch():
  assert vlm_lib.tokens_per_image(224, 14) == 256
  with pytest.raises(ValueError, match="multiple of the ViT patch"):
    vlm_lib.tokens_per_image(30, 8)
  assert vlm_family.VLMFamily(tiny_config()).tokens_per_image == T
  with pytest.raises(config_lib.ConfigError, match="tokens_per_image=9"):
    vlm_family.VLMFamily(tiny_config(overrides=["input.tokens_per_image=9"]))
  with pytest.raises(ValueError, match="must not pool"):
    vlm_lib.VLM(image=dict(pool_type="map")).image_kwargs()


# -- the model on packed rows ----------------------------------------------------------------


def test_text_rows_and_segments_do_not_see_other_images(family_and_params):
  family, params = family_and_params
  apply = jax.jit(lambda p, b: family.model.apply({"params": p}, b))
  img = dict(inputs=np.array([IMAGE_ID, 5], np.int32), targets=np.array([6, 7, 1], np.int32),
             images=np.random.default_rng(1).uniform(-1, 1, (1, SIZE, SIZE, 3)))
  txt = dict(inputs=np.array([8, 9], np.int32), targets=np.array([10, 11, 1], np.int32))
  both = packing.pack([img, txt], **_pack_args())          # one row, two segments
  alone = packing.pack([txt], **_pack_args())
  assert len(both) == 1
  batch = packing.batch_rows([both[0], alone[0]])
  logits = np.asarray(apply(params, model_inputs(batch)))
  n_img, n_txt = T + 1 + 3, 2 + 3   # expanded inputs + targets (BOS is the shift)
  # The text segment packed after an image example = the same text alone in its row.
  np.testing.assert_allclose(logits[0, n_img:n_img + n_txt], logits[1, :n_txt],
                             rtol=1e-5, atol=1e-5)
  # Garbage in the text row's (empty) image slots changes nothing, nor do no slots at all.
  noisy = dict(batch, images=batch["images"].copy())
  noisy["images"][1] = 5.0
  np.testing.assert_allclose(np.asarray(apply(params, model_inputs(noisy)))[1], logits[1],
                             rtol=1e-6, atol=1e-6)
  text_only = packing.batch_rows(packing.pack([txt], **dict(_pack_args(),
                                                          max_images_per_row=0)))
  np.testing.assert_allclose(np.asarray(apply(params, model_inputs(text_only)))[0], logits[1],
                             rtol=1e-5, atol=1e-5)
  # And the image does reach the image example's logits.
  other = dict(batch, images=batch["images"] * -1.0)
  assert not np.allclose(np.asarray(apply(params, model_inputs(other)))[0, :n_img],
                         logits[0, :n_img], atol=1e-4)


def test_loss_counts_only_target_tokens(family_and_params):
  family, params = family_and_params
  batch = model_inputs(packed_batch(4))
  features = jax.jit(lambda p, b: family.features(p, b, None))
  logits = np.asarray(jax.jit(family.model.apply)({"params": params}, batch), np.float64)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  weights = batch["decoder_loss_weights"]
  nll = -np.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  out = jax.device_get(features(params, batch))
  np.testing.assert_allclose(out["loss_sum"], np.sum(nll * weights, 1), rtol=1e-5)
  np.testing.assert_array_equal(out["weight_sum"], weights.sum(1))
  loss, metrics = family.features_loss(params, out)
  np.testing.assert_allclose(loss, np.sum(nll * weights) / weights.sum(), rtol=1e-5)
  assert 0 <= metrics["token_accuracy"] <= 1
  # Changing a target where the weight is 0 (prompt, image, padding) changes nothing.
  changed = dict(batch, decoder_target_tokens=np.where(
      weights == 0, (batch["decoder_target_tokens"] + 7) % VOCAB,
      batch["decoder_target_tokens"]))
  np.testing.assert_allclose(jax.device_get(features(params, changed))["loss_sum"],
                             out["loss_sum"], rtol=1e-6)
  losses, counts = family.token_losses(params, batch)
  np.testing.assert_allclose(losses, out["loss_sum"], rtol=1e-6)


# -- captions ------------------------------------------------------------------------------


def greedy_without_cache(family, params, images, max_len, eos=1):
  """Re-runs the whole sequence for every token: the prompt bidirectional, the rest causal.

  The sequence lives in a buffer of its final length; positions after the last token are
  filled with 0s, which the causal mask keeps from every position that is read.
  """
  batch = images.shape[0]
  prompt = family.caption_prompt()
  length = prompt.size + max_len
  tokens = np.zeros((batch, length), np.int32)
  tokens[:, :prompt.size] = prompt
  feats = dict(decoder_segment_ids=np.ones((batch, length), np.int32),
               decoder_causal_attention=np.tile(np.arange(length) < prompt.size, (batch, 1)),
               decoder_positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
               images=images[:, None])
  apply = jax.jit(lambda p, b: family.model.apply({"params": p}, b))
  out = np.zeros((batch, max_len), np.int32)
  done = np.zeros(batch, bool)
  for t in range(max_len):
    logits = np.array(apply(params, dict(feats, decoder_input_tokens=tokens)))
    logits[..., [0, IMAGE_ID]] = -np.inf  # never generated
    nxt = np.argmax(logits[:, prompt.size - 1 + t], axis=-1).astype(np.int32)
    out[:, t] = np.where(done, 0, nxt)
    done |= nxt == eos
    if prompt.size + t < length:
      tokens[:, prompt.size + t] = nxt
  return out


def test_cached_greedy_caption_equals_uncached():
  # Scanned layers, as the 3B config: the cache's batch axis is then 1.
  config = tiny_config()
  config.model.scan_layers = True
  config.model.llm.depth = 2
  family = vlm_family.VLMFamily(config)
  params = init_params(family, seed=3)
  images = np.random.default_rng(0).uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
  # Sharpen the random LM, then make EOS's (tied) embedding a stretched copy of a token
  # that row 0 emits third: EOS then wins where that token would, and some rows stop early.
  table = np.array(params["llm"]["embed_tokens"]["embedding"]) * 8
  params["llm"]["embed_tokens"]["embedding"] = table
  third = greedy_without_cache(family, params, images, 3)[0, 2]
  table[1] = 1.5 * table[third]
  want = greedy_without_cache(family, params, images, 6)
  assert (want == 1).any()
  decode = decoding.DecodeConfig(method="greedy", max_decode_len=6, eos_id=1)
  cached = np.asarray(jax.jit(lambda p, x: family.caption(p, x, decode=decode))(params, images))
  np.testing.assert_array_equal(cached, want)
  assert cached.shape == (3, 6)


# -- training stages and sharding --------------------------------------------------------------


def one_step(config, batch, devices=None):
  setup = trainer.build(config, devices)
  state = setup.init_state()
  init = jax.device_get(state["params"])
  state, metrics = setup.train_step(
      state, sharding.global_batch(batch, setup.mesh, config.sharding_rules))
  return init, jax.device_get(state["params"]), jax.device_get(metrics)


def changed_paths(before, after):
  flat_a = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_b = jax.tree.leaves(after)
  return {optim.param_path(p) for (p, a), b in zip(flat_a, flat_b)
          if not np.array_equal(a, b)}


def all_paths(params):
  return {optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def frozen_paths(config):
  """What the trainer freezes for `config` (`optim.make_optimizer`'s mask)."""
  family = vlm_family.VLMFamily(config)
  specs = family.input_specs(1)
  params = nn.unbox(jax.eval_shape(family.init, jax.random.key(0), specs))
  _, _, frozen = optim.make_optimizer(config, params)
  flat = jax.tree_util.tree_flatten_with_path(frozen)[0]
  return {optim.param_path(p) for p, f in flat if f}, all_paths(params)


def test_projector_stage_freezes_all_but_the_projector():
  frozen, paths = frozen_paths(tiny_config("steps=4,batch=8,eval_every=0,stage=projector"))
  assert paths - frozen == {"projector/fc1/kernel", "projector/fc1/bias",
                            "projector/fc2/kernel", "projector/fc2/bias"}
  with pytest.raises(config_lib.ConfigError, match="lora_rank > 0"):
    vlm_family.freeze_regex("lora", lora_rank=0)


def test_lora_stage_trains_only_adapters_and_projector():
  config = tiny_config("steps=4,batch=8,eval_every=0,stage=lora,lora_rank=2", lora_rank=2)
  frozen, paths = frozen_paths(config)
  assert {p for p in paths - frozen if not p.startswith("projector/")} == {
      p for p in paths if "lora" in p}
  # And a real step moves exactly the trainable ones that have a gradient.
  init, after, _ = one_step(config, model_inputs(packed_batch(8)), jax.devices()[:1])
  changed = changed_paths(init, after)
  lora = {p for p in all_paths(init) if "lora" in p}
  assert lora and all(p.startswith("llm/") for p in lora)
  assert {p for p in changed if p.startswith("llm/")} <= lora
  assert any(p.endswith("lora_b") for p in changed)  # lora_b leaves zero on the first step
  assert not any(p.startswith("img/") for p in changed)
  assert any(p.startswith("projector/") for p in changed)


# As tests/test_trainer.py (f32 sum order, Adam eps), with a looser floor: these models have
# near-zero gradient entries (~1e-7, the projector's) whose round-off Adam's first step still
# turns into update differences of ~1e-5 at eps=1e-6. A wrong sharding moves updates by the
# learning rate's size (2e-3), a hundred times more.
STEP_TOL = dict(rtol=2e-5, atol=2e-5)


def test_fsdp_tensor_step_on_8_devices_equals_1_device():
  batch = model_inputs(packed_batch(8))
  config = tiny_config(overrides=["optim.eps=1e-6"])
  _, params_1, metrics_1 = one_step(config, batch, jax.devices()[:1])
  config_8 = tiny_config(overrides=["optim.eps=1e-6", "mesh.data=2", "mesh.fsdp=2",
                                    "mesh.tensor=2"])
  config_8.sharding_rules = sharding.rules_preset("fsdp_tensor")
  _, params_8, metrics_8 = one_step(config_8, batch)
  assert np.isfinite(metrics_1["loss"])
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **STEP_TOL), params_8, params_1)


# -- pretrained LM and data ------------------------------------------------------------------


def test_merge_pretrained_grows_vocabulary_rows_and_rejects_other_mismatches():
  init = {"embed_tokens": {"embedding": np.zeros((6, 2), np.float32)},
          "norm": {"scale": np.zeros(2, np.float32)},
          "layers": {"layers_0": {"lora_a": np.full((2, 1), 5.0, np.float32)}}}
  table = np.array([[1.0, 2.0], [3.0, 6.0], [2.0, 1.0], [2.0, 3.0]])
  loaded = {"embed_tokens": {"embedding": table}, "norm": {"scale": np.ones(2)}}
  merged = vlm_family.merge_pretrained(init, loaded, where="ckpt")
  np.testing.assert_array_equal(merged["embed_tokens"]["embedding"][:4], table)
  np.testing.assert_array_equal(merged["embed_tokens"]["embedding"][4:], [[2.0, 3.0]] * 2)
  np.testing.assert_array_equal(merged["norm"]["scale"], 1.0)
  np.testing.assert_array_equal(merged["layers"]["layers_0"]["lora_a"], 5.0)  # kept
  with pytest.raises(ValueError, match=r"norm/scale has shape \(3,\)"):
    vlm_family.merge_pretrained(init, dict(loaded, norm={"scale": np.ones(3)}), where="ckpt")
  with pytest.raises(ValueError, match="missing from the checkpoint"):
    vlm_family.merge_pretrained(init, {"norm": {"scale": np.ones(2)}}, where="ckpt")
  llm = dict(vocab_size=8, width=4, depth=1, mlp_dim=8, num_heads=2)
  hf = dict(llm, vocab_size=6, num_kv_heads=2, head_dim=2, activation="silu",
            scan_layers=True)
  vlm_family.check_architecture(llm, hf, where="ckpt")  # defaults fill the rest
  with pytest.raises(config_lib.ConfigError,
                     match=r"activation='silu' \(checkpoint: 'gelu_tanh'\)"):
    vlm_family.check_architecture(llm, dict(hf, activation="gelu_tanh"), where="ckpt")
  with pytest.raises(config_lib.ConfigError, match="vocab_size=8"):
    vlm_family.check_architecture(llm, dict(hf, vocab_size=9), where="ckpt")


def test_shapes_prefix_lm_task_examples_match_the_caption_task():
  import data_mixtures  # pylint: disable=g-import-not-at-top,unused-import  (registers tasks)
  from vlpjax.data import vocab  # pylint: disable=g-import-not-at-top
  plm = seqio.get_mixture_or_task("shapes_captions_prefix_lm").get_dataset(
      split="validation", shuffle=False)
  ref = seqio.get_mixture_or_task("shapes_captions").get_dataset(
      split="validation", shuffle=False)
  image_id = vocab.multimodal_vocabulary().special_ids.image_id(0)
  for ex, want in zip(plm.take(5).as_numpy_iterator(), ref.take(5).as_numpy_iterator()):
    assert ex["id"] == want["id"]
    np.testing.assert_array_equal(ex["inputs"], [image_id])
    np.testing.assert_array_equal(ex["targets"], list(want["texts"]) + [1])
    assert ex["images"].shape == (1, 64, 64, 3) and ex["images"].dtype == np.uint8
    np.testing.assert_array_equal(ex["images"][0], want["image"])
    assert ex["problem"] == b""


def test_pretrained_hook_puts_a_hugging_face_lm_inside_the_vlm(tmp_path):
  """A text-only row through the VLM after `pretrained` gives transformers' logits."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from tests import test_hf_lm  # pylint: disable=g-import-not-at-top
  hf_model = test_hf_lm.tiny_llama(str(tmp_path))  # 64 ids, width 32, 2 layers, GQA 4/2
  config = tiny_config()
  config.model.scan_layers = True
  config.model.llm.update(vocab_size=72, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=2,
                          norm_eps=1e-5, rope_theta=500., tie_embeddings=False)
  config.pretrained = {"llm_hf_path": str(tmp_path)}
  family = vlm_family.VLMFamily(config)
  params = family.pretrained(init_params(family), config)
  text = np.array([5, 17, 3, 33, 41, 2], np.int32)
  row = packing.batch_rows(packing.pack([dict(inputs=np.zeros(0, np.int32), targets=text)],
                                        **_pack_args()))
  logits = np.asarray(jax.jit(family.model.apply)({"params": params}, model_inputs(row)))
  with torch.no_grad():
    want = hf_model(torch.tensor(row["decoder_input_tokens"][:, :text.size])).logits.numpy()
  np.testing.assert_allclose(logits[:, :text.size, :64], want, atol=1e-4)
  config.model.llm.norm_eps = 1e-6
  with pytest.raises(config_lib.ConfigError, match="norm_eps=1e-06"):
    vlm_family.VLMFamily(config).pretrained(params, config)


def test_caption_tfrecords_with_prompt_and_bad_records(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vlpjax.data import records  # pylint: disable=g-import-not-at-top
  from vlpjax.data import shapes  # pylint: disable=g-import-not-at-top
  from vlpjax.data import vocab  # pylint: disable=g-import-not-at-top
  from vlpjax.data.kinds import image_caption  # pylint: disable=g-import-not-at-top
  good = shapes.generate_example("validation", 0)
  path = str(tmp_path / "captions.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for rid, image, captions in (("good", good["image"], [b"a red cross", b"red cross"]),
                                 ("empty", good["image"], [b"  "]),
                                 ("corrupt", b"not an image", [b"a circle"])):
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          "id": records.bytes_feature([rid.encode()]), "image": records.bytes_feature([image]),
          "caption": records.bytes_feature(captions)})).SerializeToString())
  task = image_caption.register_tfrecord_task("vlm_test_captions", {"train": path},
                                              image_size=32, prompt="caption en")
  examples = list(task.get_dataset(split="train", shuffle=False).as_numpy_iterator())
  voc = vocab.multimodal_vocabulary()
  ok = examples[0]
  np.testing.assert_array_equal(ok["inputs"], [voc.special_ids.image_id(0)] +
                                voc.encode("caption en"))
  assert voc.decode(ok["targets"][:-1].tolist()) in ("a red cross", "red cross")
  assert ok["targets"][-1] == 1 and ok["images"].shape == (1, 32, 32, 3)
  assert [e["problem"].decode().split(":")[0] for e in examples] == [
      "", "empty caption", "corrupt image"]
