"""The trainer on packed prefix-LM rows: resume, evaluators, and captioning a checkpoint."""
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from vlpjax import config as config_lib
from vlpjax import evaluate
from vlpjax import families
from vlpjax import predict
from vlpjax import trainer
from vlpjax.data import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLM_DEMO = os.path.join(REPO, "experiments", "vlm_shapes.py")


def tiny_vlm_config(steps: int, evals: bool = False):
  config = config_lib.load(f"{VLM_DEMO}:steps={steps},batch=8,size=16,eval_every=0")
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  config.model.llm.update(width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1)
  config.input.update(row_length=24, max_images_per_row=2, shuffle_buffer=64)
  config.checkpoint = dict(every_steps=2, max_to_keep=3, async_save=True)
  config.log_every_steps = 1
  config.evals = {}
  if evals:
    config.evals = dict(
        captioning=dict(type="captioning", task="shapes_captions", split="validation",
                        pp="resize(16)|value_range(-1, 1)", batch_size=8, java_metrics=False,
                        decode=dict(max_decode_len=6), max_examples=8,
                        baseline_caption="a red circle", num_shown=1),
        with_images=dict(type="prefix_lm_loss", task="stories_interleaved", split="validation",
                         pp='resize(16, key="images")|value_range(-1, 1, key="images")',
                         batch_size=8, max_examples=6),
        without_images=dict(type="prefix_lm_loss", task="stories_interleaved",
                            split="validation", batch_size=8, max_examples=6,
                            pp='resize(16, key="images")|value_range(-1, 1, key="images")',
                            drop_images=True))
    # Stories need more room than one caption: up to 5 images of 4 tokens plus text.
    config.input.update(row_length=64, max_images_per_row=5)
  return config_lib.finalize(config)


def _params(result):
  return jax.device_get(result["state"]["params"])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("vlm_straight"))
  return workdir, trainer.Loop(tiny_vlm_config(4, evals=True), workdir).run()


def test_prefix_lm_resume_equals_uninterrupted(straight_run, tmp_path):
  _, straight = straight_run
  workdir = str(tmp_path)
  trainer.Loop(tiny_vlm_config(2, evals=True), workdir).run()
  resumed = trainer.Loop(tiny_vlm_config(4, evals=True), workdir).run()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               _params(resumed), _params(straight))


def test_prefix_lm_run_logs_task_counts_and_evals(straight_run):
  workdir, result = straight_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  counts = [r["data/examples/shapes_captions_prefix_lm"] for r in rows
            if "data/examples/shapes_captions_prefix_lm" in r]
  # Every row holds at least one example; packing reads a few rows ahead.
  assert len(counts) == 4 and all(b > a for a, b in zip(counts, counts[1:]))
  assert counts[-1] >= 4 * 8
  caption = result["captioning"]
  assert caption["num_examples"] == 8
  assert 0 <= caption["cider"] and 0 <= caption["baseline_cider"]
  with_images, without = result["with_images"], result["without_images"]
  # Same targets either way: only the prefix loses its images.
  assert with_images["num_tokens"] == without["num_tokens"] > 0
  assert np.isfinite(with_images["loss"]) and with_images["loss"] != without["loss"]


def test_eval_only_run_reproduces_generative_evals(straight_run):
  """Captioning (greedy decoding) and prefix-LM perplexity, re-run from the checkpoint."""
  workdir, result = straight_run
  again = evaluate.evaluate(workdir, tiny_vlm_config(4, evals=True))[4]
  for name in ("captioning", "with_images", "without_images"):
    assert again[name] == pytest.approx(result[name], abs=1e-6), name


def test_predict_captions_image_files(straight_run, tmp_path):
  workdir, result = straight_run
  paths = []
  for i in range(3):
    example = shapes.generate_example("validation", i, image_size=16)
    path = str(tmp_path / f"shape{i}.jpg")
    with open(path, "wb") as f:
      f.write(example["image"])
    paths.append(path)
  captions = predict.caption_images(workdir, paths, decode="max_decode_len=6")
  assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
  beam = predict.caption_images(workdir, paths[:1], decode="method=beam,beam_size=2")
  assert len(beam) == 1


def test_predict_errors_name_the_problem(straight_run, tmp_path):
  workdir, _ = straight_run
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  with pytest.raises(ValueError, match="bad.png"):
    predict.caption_images(workdir, [str(bad)])
  with pytest.raises(ValueError, match="step 3"):
    predict.caption_images(workdir, [str(bad)], step=3)
  with pytest.raises(ValueError, match="config.json"):
    predict.caption_images(str(tmp_path), [str(bad)])
  Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
  with pytest.raises(ValueError, match="beam_siz"):
    predict.caption_images(workdir, [str(tmp_path / "ok.png")], decode="beam_siz=2")


def test_packed_row_settings_are_checked_against_the_model():
  config = tiny_vlm_config(1)
  assert trainer.input_config(config, families.get_family(config)).tokens_per_image == 4
  config.input.tokens_per_image = 7  # The ViT gives (16 px / 8) ** 2 = 4.
  with pytest.raises(config_lib.ConfigError, match="tokens_per_image=7.*gives 4"):
    families.get_family(config)
  config.input.tokens_per_image = 0
  config.input.max_images_per_row = 0
  with pytest.raises(config_lib.ConfigError, match="input.max_images_per_row must be > 0"):
    families.get_family(config)


def test_captioning_eval_needs_a_family_that_captions():
  from vlpjax.evaluators import build_evaluators  # pylint: disable=g-import-not-at-top
  siglip = config_lib.load(os.path.join(REPO, "experiments", "siglip_shapes.py"))
  siglip.evals = dict(caption=dict(type="captioning", task="shapes_captions"))
  siglip = config_lib.finalize(siglip)
  with pytest.raises(ValueError, match="evals.caption: family 'two_tower' cannot caption"):
    build_evaluators(siglip, families.get_family(siglip), mesh=None)
