"""Every experiment config loads, validates, and its train step lowers on CPU."""
import glob
import os

import jax
import pytest

from vlpjax import config as config_lib
from vlpjax import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_finalizes(path):
  config = config_lib.finalize(config_lib.load(path))
  assert config.total_steps > 0


def test_siglip_b16_builds_and_lowers_with_a_shrunk_batch():
  # The real-scale config: B/16 towers, 224 px, 64 tokens, FSDP over the 8 CPU devices.
  config = config_lib.finalize(config_lib.load(
      os.path.join(REPO, "experiments", "siglip_b16.py:batch=16")))
  setup = trainer.build(config)
  lowered = setup.lower_train_step()
  text = lowered.as_text()
  assert "sharding" in text
  params = setup.abstract_state["params"]
  assert params["img"]["patch_embedding"]["kernel"].shape == (16, 16, 3, 768)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  assert 150e6 < n_params < 250e6  # two B towers (ViT-B/16 + text B with a 32k vocab)


@pytest.mark.parametrize("spec,low,high", [
    # ViT-B/16 + 6 unimodal and 6 cross-attending text layers of width 768 (CoCa-Base shape).
    ("coca_b16.py:batch=16", 200e6, 300e6),
    # So400m/14 (0.4B) + a Gemma-2B-shaped decoder (2.5B with its 257k-row embedding).
    ("vlm_3b.py:batch=16", 2.7e9, 3.1e9),
    # ViT-B/16 (86M) + 12 temporal layers (85M) + a 12-layer decoder with cross-attention
    # (~140M with its untied 32k vocabulary): Vid2Seq's scale.
    ("vid2seq_b16.py:batch=16", 250e6, 400e6),
    ("vid2seq_b16.py:batch=16,features=768,arch=prefix_lm", 150e6, 300e6),
    # ViT-L/16 (0.3B) + a 24-layer width-1024 decoder with a 33.5k vocabulary (0.37B).
    ("udop_large.py:batch=16", 0.6e9, 0.75e9),
])
def test_generative_pod_configs_build_and_lower(spec, low, high):
  config = config_lib.finalize(config_lib.load(os.path.join(REPO, "experiments", spec)))
  setup = trainer.build(config)
  assert "sharding" in setup.lower_train_step().as_text()
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state["params"]))
  assert low < n_params < high
