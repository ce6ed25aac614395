"""Generation evaluators on real tiny tasks: oracle round trips through decoding, real models.

The oracle family replays each prompt's targets through the real `decoding.decode` (one-hot
logits on the next target token), so time, loc and sentinel tokens go the whole way: prompt
batch -> jitted decode -> cut at EOS -> parsing -> metrics. Perfect replay must score
perfectly; corrupted replay must score exactly what the corruption predicts, computed here
from the references by hand.
"""
import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_mixtures import documents as document_tasks
from data_mixtures import videos as video_tasks
from vlpjax import config as config_lib
from vlpjax import decoding
from vlpjax import sharding
from vlpjax.data import bad_records
from vlpjax.data import prefix_lm_pipeline
from vlpjax.data import vocab as vocab_lib
from vlpjax.data.kinds import video_targets
from vlpjax.evaluators import build_evaluators
from vlpjax.evaluators import event_metrics
from vlpjax.evaluators import layout_metrics
from vlpjax.evaluators import qa_metrics
from vlpjax.evaluators import video_evals
from vlpjax.families import get_family

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "experiments", "vlm_shapes.py")
SIZE, T = 16, 4   # 16 px frames and pages, patch 8: 4 tokens per image
DENSE, GROUNDING = "evaltest_dense", "evaltest_grounding"
LAYOUT, QA = "evaltest_docs_layout_modeling", "evaltest_qa"
PP = 'value_range(-1, 1, key="images")'
VOCAB = vocab_lib.multimodal_vocabulary()
IDS = VOCAB.special_ids
BATCH = 8
LONG = dict(max_decode_len=96)  # the oracle replays whole targets

video_tasks.register_dense_captions_task(DENSE, num_frames=4, frame_size=SIZE,
                                         split_sizes={"train": 4, "validation": 5})
video_tasks.register_grounding_task(GROUNDING, num_frames=4, frame_size=SIZE,
                                    split_sizes={"train": 4, "validation": 3})
document_tasks.register_documents_udop("evaltest_docs", image_size=SIZE,
                                       split_sizes={"train": 4, "validation": 10})
document_tasks.register_documents_qa(QA, image_size=SIZE,
                                     split_sizes={"train": 40, "validation": 10})


def tiny_config(family="vlm", evals=None):
  config = config_lib.load(f"{DEMO}:steps=1,batch={BATCH},size={SIZE},eval_every=0")
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  config.model.llm.update(width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1)
  config.input.update(task=DENSE, image_size=SIZE, row_length=96, max_images_per_row=4)
  config.evals = evals or {}
  return config_lib.finalize(config, [f"family={family}", f"model_name={family}"])


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def references(task):
  """The validation examples' targets, read straight from the task (not the evaluator)."""
  data_config = tiny_config().input.copy_and_resolve_references()
  data_config.update(task=task, split="validation", pp="")
  return [ex["targets"] for ex in prefix_lm_pipeline.task_examples(
      data_config, task, 0, 0, 1, bad_records.SkipCounter(), shuffle=False, num_epochs=1)]


class Oracle:
  """A family whose `generate` replays the prompts' targets, `corrupt`ed, through decode."""

  input_format = "prefix_lm"
  tokens_per_image = T

  def __init__(self, corrupt=lambda targets: targets):
    self.corrupt = corrupt

  def input_specs(self, batch_size):
    del batch_size
    return {}

  def generate(self, params, prompts, *, decode, rng=None):
    del params
    targets = self.corrupt(prompts["targets"])
    # Room to look one token ahead at every step.
    targets = jnp.pad(targets, ((0, 0), (0, decode.max_decode_len)))

    def one_hot(tokens):
      return jnp.where(jax.nn.one_hot(tokens, VOCAB.vocab_size) > 0, 0.0, -1e9)

    def step_fn(tokens, cache, t):
      del tokens
      return one_hot(cache["targets"][:, t + 1]), cache

    out = decoding.decode(step_fn, one_hot(targets[:, 0]), {"targets": targets},
                          config=decode, rng=rng)
    return out["tokens"]

  def ground(self, params, prompts):
    """A grounding head that reads the answer off the targets (for mode='head')."""
    del params
    bins = self.corrupt(prompts["targets"])[:, :2] - IDS.time_start
    return bins.astype(jnp.float32) / (IDS.spec.num_time_bins - 1)


def run_oracle(eval_type, task, mesh, corrupt=lambda t: t, **cfg):
  entry = dict(type=eval_type, task=task, batch_size=BATCH, decode=LONG,
               max_target_length=96, num_shown=1, **cfg)
  config = tiny_config(evals={"e": entry})
  evaluator = build_evaluators(config, Oracle(corrupt), mesh)["e"]
  return evaluator.run({})


def shift_times(targets, bins=30):
  is_time = IDS.is_time_id(targets)
  return jnp.where(is_time, jnp.minimum(targets + bins, IDS.time_id(99)), targets)


def drop_position(targets, position):
  return jnp.concatenate([targets[:, :position], targets[:, position + 1:],
                          jnp.zeros_like(targets[:, :1])], axis=1)


def even_rows(targets):
  return (jnp.arange(targets.shape[0]) % 2 == 0)[:, None]


# -- dense captioning ----------------------------------------------------------------------


def reference_events(targets):
  return [video_targets.parse_events(t, 1.0, VOCAB) for t in targets]


def test_dense_captioning_oracle_is_perfect_and_corruptions_cost_exactly(mesh):
  refs = reference_events(references(DENSE))
  assert all(refs) and sum(map(len, refs)) > len(refs)
  perfect = run_oracle("dense_captioning", DENSE, mesh)
  for t in event_metrics.THRESHOLDS:
    assert perfect[f"f1@{t}"] == perfect[f"precision@{t}"] == perfect[f"recall@{t}"] == 1.0
  assert perfect["f1"] == 1.0 and perfect["cider"] > 0
  assert perfect["num_events_pred"] == perfect["num_events_ref"] == np.mean(
      [len(r) for r in refs])
  assert perfect["baseline_f1@0.5"] < 1 and perfect["baseline_f1"] < 1
  k, baseline = event_metrics.best_fixed_segments_baseline(
      [[e[:2] for e in events] for events in refs])
  assert perfect["baseline_k"] == k and perfect["baseline_f1"] == baseline["f1"]
  assert perfect["num_examples"] == len(refs)

  # Every time 30 bins later (clipped to the last bin): the events a hand shift predicts.
  shifted = run_oracle("dense_captioning", DENSE, mesh, shift_times, java_metrics=False)
  shift = lambda x: min(round(x * 99) + 30, 99) / 99
  want = event_metrics.dense_caption_scores(
      [[(shift(s), shift(e), c) for s, e, c in events] for events in refs], refs)
  for key in ("f1@0.5", "precision@0.3", "recall@0.7", "f1", "cider"):
    assert shifted[key] == pytest.approx(want[key], abs=1e-12), key
  assert shifted["f1"] < 1

  # The first event loses its end time: it is no event any more, the others are intact.
  dropped = run_oracle("dense_captioning", DENSE, mesh, lambda t: drop_position(t, 1),
                       java_metrics=False)
  want = event_metrics.localisation_scores([[e[:2] for e in events[1:]] for events in refs],
                                           [[e[:2] for e in events] for events in refs])
  assert dropped["recall@0.5"] == pytest.approx(want["recall@0.5"], abs=1e-12)
  assert dropped["recall@0.5"] < 1
  assert dropped["f1"] == pytest.approx(want["f1"], abs=1e-12)
  assert dropped["num_events_pred"] == perfect["num_events_ref"] - 1


# -- temporal grounding ----------------------------------------------------------------------


def hand_iou(a, b):
  inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
  union = (a[1] - a[0]) + (b[1] - b[0]) - inter
  return inter / union if union > 0 else 0.0


@pytest.mark.parametrize("mode", ["generate", "head"])
def test_grounding_oracle_is_perfect_and_corruptions_cost_exactly(mesh, mode):
  bins = [tuple(int(b) - IDS.time_start for b in t[:2]) for t in references(GROUNDING)]
  assert len(bins) > BATCH and all(s < e for s, e in bins)
  # A head's windows are float32: equal to the bins' k / 99 within float32 rounding.
  tol = 1e-12 if mode == "generate" else 1e-6
  perfect = run_oracle("temporal_grounding", GROUNDING, mesh, mode=mode)
  assert perfect["r1@0.5"] == perfect["r1@0.7"] == 1.0
  assert perfect["miou"] == pytest.approx(1.0, abs=tol)
  assert perfect["num_invalid"] == 0 and perfect["num_examples"] == len(bins)
  assert 0 < perfect["random_r1@0.5"] < 1 and 0 < perfect["random_miou"] < 1

  shifted = run_oracle("temporal_grounding", GROUNDING, mesh, shift_times, mode=mode)
  ious = [hand_iou((min(s + 30, 99), min(e + 30, 99)), (s, e)) for s, e in bins]
  assert shifted["miou"] == pytest.approx(np.mean(ious), abs=tol) and shifted["miou"] < 1
  assert shifted["r1@0.5"] == np.mean(np.array(ious) >= 0.5)

  # Even rows (batches of 8, so even examples) answer end before start.
  swap = lambda t: jnp.where(even_rows(t), t[:, jnp.array([1, 0] + list(range(2, t.shape[1])))],
                             t)
  swapped = run_oracle("temporal_grounding", GROUNDING, mesh, swap, mode=mode)
  odd = len(bins) // 2
  assert swapped["r1@0.5"] == odd / len(bins)
  assert swapped["miou"] == pytest.approx(odd / len(bins), abs=tol)
  if mode == "generate":   # no window at all; a head's reversed window is just wrong
    assert swapped["num_invalid"] == len(bins) - odd


# -- documents -------------------------------------------------------------------------------


def test_document_layout_oracle_is_perfect_and_a_missing_box_is_wrong(mesh):
  boxes = [layout_metrics.parse_sentinel_boxes(t, VOCAB) for t in references(LAYOUT)]
  assert all(0 in b for b in boxes)
  num_boxes = sum(map(len, boxes))
  perfect = run_oracle("document_layout", LAYOUT, mesh)
  assert perfect["box_acc@0.5"] == perfect["miou"] == 1.0
  assert perfect["num_boxes"] == num_boxes
  assert perfect["baseline_box_acc@0.5"] < 1
  # Sentinel 0 loses its four loc tokens (positions 1-4): its box is missing, so wrong.
  drop_box = lambda t: jnp.concatenate([t[:, :1], t[:, 5:], jnp.zeros_like(t[:, :4])], 1)
  missing = run_oracle("document_layout", LAYOUT, mesh, drop_box)
  want = (num_boxes - len(boxes)) / num_boxes
  assert missing["box_acc@0.5"] == pytest.approx(want, abs=1e-12)
  assert missing["miou"] == pytest.approx(want, abs=1e-12)


def test_document_qa_oracle_is_perfect_and_blank_answers_score_zero(mesh):
  answers = [VOCAB.decode(t[:-1].tolist()) for t in references(QA)]
  perfect = run_oracle("document_qa", QA, mesh)
  assert perfect["exact_match"] == perfect["anls"] == 1.0
  _, want = qa_metrics.most_frequent_answer_baseline(
      [VOCAB.decode(t[:-1].tolist()) for t in _train_targets(QA)], answers)
  assert perfect["baseline_exact_match"] == want < 1
  assert 0 <= perfect["baseline_anls"] < 1
  # Even rows answer nothing (EOS at once).
  blank = lambda t: jnp.where(even_rows(t), jnp.where(jnp.arange(t.shape[1]) == 0, 1, 0), t)
  blanked = run_oracle("document_qa", QA, mesh, blank)
  odd = len(answers) // 2
  assert blanked["exact_match"] == blanked["anls"] == odd / len(answers)


def _train_targets(task):
  data_config = tiny_config().input.copy_and_resolve_references()
  data_config.update(task=task, split="train", pp="")
  return [ex["targets"] for ex in prefix_lm_pipeline.task_examples(
      data_config, task, 0, 0, 1, bad_records.SkipCounter(), shuffle=False, num_epochs=1)]


# -- real tiny models under jit on 8 devices -------------------------------------------------


def init_params(family):
  specs = family.input_specs(1)
  init = jax.jit(lambda rng: nn.unbox(family.init(rng, {k: jnp.zeros(s.shape, s.dtype)
                                                        for k, s in specs.items()})))
  return jax.device_get(init(jax.random.key(0)))


EXPECTED_KEYS = {
    "dense_captioning": {"f1@0.5", "f1", "cider", "baseline_f1@0.5", "baseline_f1",
                         "baseline_k", "num_events_pred", "num_events_ref"},
    "temporal_grounding": {"r1@0.5", "r1@0.7", "miou", "random_r1@0.5", "random_miou",
                           "num_invalid"},
    "document_layout": {"box_acc@0.5", "miou", "baseline_box_acc@0.5", "num_boxes"},
    "document_qa": {"exact_match", "anls", "baseline_exact_match", "baseline_anls"},
}


@pytest.mark.parametrize("family_name,evals", [
    ("vlm", {"dense": ("dense_captioning", DENSE), "ground": ("temporal_grounding",
                                                                GROUNDING)}),
    ("document", {"layout": ("document_layout", LAYOUT), "qa": ("document_qa", QA)}),
])
def test_real_tiny_family_runs_every_evaluator(mesh, family_name, evals):
  entries = {name: dict(type=kind, task=task, pp=PP, batch_size=BATCH, max_examples=5,
                        prompt_length=64, decode=dict(max_decode_len=4), num_shown=1)
             for name, (kind, task) in evals.items()}
  config = tiny_config(family_name, entries)
  family = get_family(config)
  params = init_params(family)
  for name, evaluator in build_evaluators(config, family, mesh).items():
    metrics = evaluator.run(params)
    kind = evals[name][0]
    assert EXPECTED_KEYS[kind] <= set(metrics), (kind, sorted(metrics))
    assert metrics["num_examples"] == 5  # every split has at least 5
    assert all(np.isfinite(v) for v in metrics.values()), metrics


class NoGenerate:
  input_format = "prefix_lm"
  tokens_per_image = T

  def input_specs(self, batch_size):
    del batch_size
    return {}


def test_errors_name_the_problem(mesh):
  def build(family, **entry):
    entry = dict(dict(type="temporal_grounding", task=GROUNDING, batch_size=BATCH), **entry)
    return build_evaluators(tiny_config(evals={"e": entry}), family, mesh)["e"]

  with pytest.raises(ValueError, match="family 'vlm' cannot generate"):
    build(NoGenerate())
  with pytest.raises(ValueError, match="mode 'head' needs a family with a grounding head"):
    build(NoGenerate(), mode="head")
  with pytest.raises(ValueError, match="mode must be one of"):
    build(Oracle(), mode="heads")
  with pytest.raises(ValueError, match="batch_size=4 must be a positive multiple of 8"):
    build(Oracle(), batch_size=4)
  with pytest.raises(config_lib.ConfigError, match="num_bin"):
    build(Oracle(), num_bin=10)
  with pytest.raises(ValueError, match="'documents/validation/0' are not a <time_s><time_e>"):
    build(Oracle(), task=LAYOUT, max_examples=2, decode=dict(max_decode_len=2)).run({})
  with pytest.raises(ValueError, match="no target of task 'evaltest_qa' has a sentinel box"):
    build(Oracle(), type="document_layout", task=QA, max_examples=2,
          decode=dict(max_decode_len=2)).run({})
