"""UDOP-style document model: layout embedding, VLM equivalence, attention reach, sharding, data."""
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax import trainer
from vlpjax.data import packing
from vlpjax.families import document as document_family  # registers "document"
from vlpjax.families import module_fields
from vlpjax.models import document as document_lib
from vlpjax.models import vlm as vlm_lib
from tests import test_vlm

IMAGE_ID, SIZE, ROW, SLOTS, T = (test_vlm.IMAGE_ID, test_vlm.SIZE, test_vlm.ROW,
                                 test_vlm.SLOTS, test_vlm.T)
BINS = 16
PACK_ARGS = test_vlm._pack_args()  # pylint: disable=protected-access


def tiny_config(overrides=()):
  config = test_vlm.tiny_config(overrides=["family=document", "model_name=document",
                                           *overrides])
  config.model.layout_bins = BINS
  return config


def box_examples(rng, n):
  """test_vlm's random examples with a random box on every text input token."""
  examples = test_vlm.random_examples(rng, n)
  for ex in examples:
    x0, y0 = rng.uniform(0, 0.5, (2, ex["inputs"].size))
    boxes = np.stack([x0, y0, x0 + 0.3, y0 + 0.2], -1).astype(np.float32)
    ex["input_boxes"] = np.where((ex["inputs"] == IMAGE_ID)[:, None], 0.0, boxes)
  return examples


def box_batch(rows, seed=0, n_examples=40):
  packed = packing.pack(box_examples(np.random.default_rng(seed), n_examples),
                        with_boxes=True, **PACK_ARGS)
  assert len(packed) >= rows
  return packing.batch_rows(packed[:rows])


def model_inputs(batch):
  return {k: batch[k] for k in document_family.DocumentFamily.batch_keys}


@pytest.fixture(scope="module")
def family_and_params():
  family = document_family.DocumentFamily(tiny_config())
  return family, test_vlm.init_params(family)


def test_layout_embedding_matches_table_sums_and_zero_box_is_zero():
  module = document_lib.LayoutEmbedding(features=8, num_bins=BINS)
  boxes = np.array([[0.0, 0.0, 0.0, 0.0],        # no layout
                    [0.1, 0.2, 0.5, 0.6],
                    [0.2, 0.1, 0.6, 0.5],        # the same box with x and y swapped
                    [0.0, 0.0, 0.5, 0.5],        # edges in bin 0 are still a box
                    [0.1, 0.2, 0.5, 0.68]], np.float32)   # another bin of y1 (10 vs 9)
  params = module.init(jax.random.key(0), boxes)["params"]
  out = np.asarray(module.apply({"params": params}, boxes))
  tables = [np.asarray(nn.unbox(params[c])) for c in document_lib.COORDINATES]
  bins = np.clip(np.round(boxes * (BINS - 1)), 0, BINS - 1).astype(int)
  want = sum(tables[i][bins[:, i]] for i in range(4))
  want[0] = 0.0
  np.testing.assert_allclose(out, want, rtol=1e-6)
  np.testing.assert_array_equal(out[0], np.zeros(8))
  for i in range(1, 5):
    assert np.abs(out[i]).max() > 1e-3
    for j in range(i + 1, 5):
      assert not np.allclose(out[i], out[j]), (i, j)
  with pytest.raises(ValueError, match="4 coordinates"):
    module.apply({"params": params}, boxes[:, :3])


def test_zero_boxes_give_the_plain_vlm(family_and_params):
  family, params = family_and_params
  assert set(params) == {"img", "projector", "llm", "layout"}
  batch = model_inputs(box_batch(4))
  assert np.abs(batch["decoder_boxes"]).sum() > 0
  fields = {f: getattr(family.model, f) for f in module_fields(vlm_lib.VLM)}
  vlm = vlm_lib.VLM(**fields)
  vlm_params = {k: v for k, v in params.items() if k != "layout"}
  want = np.asarray(jax.jit(vlm.apply)({"params": vlm_params}, batch))
  apply = jax.jit(family.model.apply)
  zero = dict(batch, decoder_boxes=np.zeros_like(batch["decoder_boxes"]))
  np.testing.assert_allclose(np.asarray(apply({"params": params}, zero)), want,
                             rtol=1e-6, atol=1e-6)
  # With the boxes, the logits of the OCR-token rows move.
  assert not np.allclose(np.asarray(apply({"params": params}, batch)), want, atol=1e-4)
  with pytest.raises(ValueError, match="decoder_boxes"):
    family.model.apply({"params": params}, {k: v for k, v in batch.items()
                                            if k != "decoder_boxes"})


def test_a_box_reaches_exactly_the_positions_that_attend_to_it(family_and_params):
  family, params = family_and_params
  rng = np.random.default_rng(2)
  ex = lambda inputs, targets: dict(
      inputs=np.array(inputs, np.int32), targets=np.array(targets, np.int32),
      images=rng.uniform(-1, 1, (list(inputs).count(IMAGE_ID), SIZE, SIZE, 3)),
      input_boxes=rng.uniform(0, 1, (len(inputs), 4)) * (np.array(inputs) != IMAGE_ID)[:, None])
  pack = lambda exs: packing.pack(exs, **PACK_ARGS)[0]
  # Row 0: an image example with 4 prompt tokens, a text example, padding; row 1: apart.
  batch = model_inputs(packing.batch_rows([
      pack([ex([IMAGE_ID, 5, 6, 7, 8], [9, 10, 1]), ex([11, 12], [13, 1])]),
      pack([ex([14, 15], [16, 1])])]))
  seg, causal = batch["decoder_segment_ids"][0], batch["decoder_causal_attention"][0]
  assert seg.max() >= 2 and (seg == 0).any()  # several segments and padding in row 0
  apply = jax.jit(lambda b: family.model.apply({"params": params}, b))
  base = np.asarray(apply(batch))
  first = seg == 1
  prefix = np.nonzero(first & (causal == 1))[0]
  after_prefix = np.nonzero(first & (causal == 0))[0]
  # A prefix position (mid-prefix, so both earlier and later prefix positions exist) and a
  # causal one: the model must not care that real rows have no boxes on targets.
  for j in (prefix[len(prefix) // 2], after_prefix[0]):
    boxes = batch["decoder_boxes"].copy()
    boxes[0, j] = [0.7, 0.05, 0.95, 0.3]
    changed = np.abs(np.asarray(apply(dict(batch, decoder_boxes=boxes))) - base).max(-1) > 1e-6
    i = np.arange(ROW)
    sees = (seg[i] == seg[j]) & (seg[j] != 0) & ((j <= i) | ((causal[i] == 1) & (causal[j] == 1)))
    # Padding rows' outputs are unspecified (the decoder masks them with a finite value,
    # so they average every key); only real tokens are checked.
    real = seg != 0
    np.testing.assert_array_equal(changed[0][real], sees[real], err_msg=f"box changed at {j}")
    assert not changed[1].any()
    if causal[j]:
      assert sees[prefix].all()  # the whole prefix reads a prefix box, earlier rows too


def test_fsdp_tensor_step_on_8_devices_equals_1_device():
  batch = model_inputs(box_batch(8))
  config = tiny_config(overrides=["optim.eps=1e-6"])
  init_1, params_1, metrics_1 = test_vlm.one_step(config, batch, jax.devices()[:1])
  config_8 = tiny_config(overrides=["optim.eps=1e-6", "mesh.data=2", "mesh.fsdp=2",
                                    "mesh.tensor=2"])
  config_8.sharding_rules = sharding.rules_preset("fsdp_tensor")
  _, params_8, metrics_8 = test_vlm.one_step(config_8, batch)
  assert np.isfinite(metrics_1["loss"])
  assert "layout/x0" in test_vlm.changed_paths(init_1, params_1)  # the tables train
  np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **test_vlm.STEP_TOL),
               params_8, params_1)


def test_one_train_step_on_packed_documents_udop_rows():
  import data_mixtures.documents  # pylint: disable=g-import-not-at-top,unused-import
  from vlpjax.data import prefix_lm_pipeline  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{test_vlm.DEMO}:steps=1,batch=2,eval_every=0")
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  config.model.llm.update(width=32, depth=1, mlp_dim=64, num_heads=4, num_kv_heads=2)
  config.input.update(task="documents_udop", image_size=16, row_length=160,
                      max_images_per_row=2, shuffle_buffer=8,
                      pp='resize(16, key="images")|value_range(-1, 1, key="images")')
  config.evals = {}
  config.schedule.warmup_steps = 0
  config = config_lib.finalize(config, ["family=document", "model_name=document"])
  setup = trainer.build(config, jax.devices()[:1])
  batches = prefix_lm_pipeline.PrefixLMBatches(
      trainer.input_config(config, setup.family), global_batch_size=2, seed=0)
  batch = next(batches)
  assert batch["decoder_boxes"].shape == (2, 160, 4)
  has_box = np.abs(batch["decoder_boxes"]).sum(-1) > 0
  # OCR words are prompt: boxes only ever sit on the bidirectional prefix's input tokens.
  assert has_box.any() and not has_box[batch["decoder_causal_attention"] == 0].any()
  inputs = model_inputs(batch)
  state = setup.init_state()
  _, metrics = setup.train_step(
      state, sharding.global_batch(inputs, setup.mesh, config.sharding_rules))
  assert np.isfinite(float(jax.device_get(metrics["loss"])))
