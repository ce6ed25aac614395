"""Config loading, overrides and validation: typos fail early and name the nearest keys."""
import json
import os
import subprocess
import sys

import pytest

from vlpjax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "experiments", "siglip_shapes.py")


def test_demo_config_loads_with_arg_and_overrides():
  config = config_lib.finalize(config_lib.load(DEMO + ":steps=7,batch=16"),
                               ["optim.lr=0.5", "checkpoint.every_steps=3"])
  assert config.total_steps == 7
  assert config.global_batch_size == 16
  assert config.optim.lr == 0.5
  assert config.checkpoint.every_steps == 3
  # Defaults the experiment file did not set are filled in.
  assert config.grad_accum_steps == 1


def test_override_typo_names_the_nearest_key():
  config = config_lib.load(DEMO)
  with pytest.raises(config_lib.ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
    config_lib.finalize(config, ["optim.lrr=0.1"])
  with pytest.raises(config_lib.ConfigError, match=r"totl_steps.*did you mean 'total_steps'"):
    config_lib.finalize(config, ["totl_steps=5"])


def test_typo_inside_a_config_file_fails():
  config = config_lib.load(DEMO)
  config.schedule.warmup_stpes = 5
  with pytest.raises(config_lib.ConfigError, match=r"schedule\.warmup_stpes.*warmup_steps"):
    config_lib.finalize(config)


def test_wrong_type_and_missing_required_keys():
  config = config_lib.load(DEMO)
  with pytest.raises(config_lib.ConfigError, match="expected a int"):
    config_lib.finalize(config, ["total_steps=many"])
  del config["total_steps"]
  with pytest.raises(config_lib.ConfigError, match="missing required keys: total_steps"):
    config_lib.finalize(config)


def test_config_arg_typo():
  with pytest.raises(config_lib.ConfigError, match=r"'stesp'.*did you mean 'steps'"):
    config_lib.load(DEMO + ":stesp=3")


def test_grad_accum_must_divide_batch():
  with pytest.raises(config_lib.ConfigError, match="not divisible by grad_accum_steps=3"):
    config_lib.finalize(config_lib.load(DEMO + ":batch=16"), ["grad_accum_steps=3"])


def test_cli_reports_typo_before_any_work(tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "vlpjax.train", "--config", DEMO, "--workdir", str(workdir),
       "--config.optim.weight_decy=0.1"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "optim.weight_decy" in proc.stderr and "optim.weight_decay" in proc.stderr
  assert not workdir.exists()  # nothing was started


def test_cli_help_explains_configs_workdir_resume_and_rules():
  proc = subprocess.run([sys.executable, "-m", "vlpjax.train", "--help"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0
  for needle in ("--config", "--workdir", "resume", "sharding_rules", "mesh"):
    assert needle in proc.stdout


def test_saved_config_json_round_trips(tmp_path):
  config = config_lib.finalize(config_lib.load(DEMO))
  path = str(tmp_path / "config.json")
  config_lib.save_json(config, path)
  with open(path) as f:
    saved = json.load(f)
  assert saved["total_steps"] == config.total_steps
  assert saved["model"]["image"]["patch_size"] == config.model.image.patch_size


def test_model_kwarg_typo_names_the_field():
  from vlpjax.families import get_family  # pylint: disable=g-import-not-at-top
  config = config_lib.finalize(config_lib.load(DEMO))
  config.model.image.patch_szie = 4
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.model\.image\.patch_szie.*did you mean 'patch_size'"):
    get_family(config)


def test_overrides_may_add_keys_the_model_section_checks_when_it_builds():
  from vlpjax.families import get_family  # pylint: disable=g-import-not-at-top
  # The demo file sets neither key; the model accepts both (README's speed switches).
  config = config_lib.finalize(config_lib.load(DEMO), [
      "model.image.scan_layers=true", "model.text.scan_layers=False", "model.new.width=4"])
  assert config.model.image.scan_layers is True and config.model.text.scan_layers is False
  assert config.model.new.width == 4
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.new is not a valid key"):
    get_family(config)
  config = config_lib.finalize(config_lib.load(DEMO), ["model.image.scan_layer=true"])
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.model\.image\.scan_layer .*did you mean 'scan_layers'"):
    get_family(config)
  # Outside the sections a consumer checks, a new key is still a typo.
  with pytest.raises(config_lib.ConfigError, match=r"optim\.scan_layers"):
    config_lib.finalize(config_lib.load(DEMO), ["optim.scan_layers=true"])


def test_evaluator_typo_names_the_type_and_key():
  from vlpjax.evaluators import build_evaluators  # pylint: disable=g-import-not-at-top
  config = config_lib.finalize(config_lib.load(DEMO))
  config.evals.zeroshot.type = "zeroshot_clasification"
  with pytest.raises(KeyError, match="Did you mean 'zeroshot_classification'"):
    build_evaluators(config, family=None, mesh=None)
  config.evals.zeroshot.type = "zeroshot_classification"
  config.evals.zeroshot.templtes = ["{}"]
  with pytest.raises(config_lib.ConfigError, match=r"templtes.*did you mean 'templates'"):
    build_evaluators(config, family=None, mesh=None)
