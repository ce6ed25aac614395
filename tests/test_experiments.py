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
