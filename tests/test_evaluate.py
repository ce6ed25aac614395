"""Eval-only runs (`vlpjax.evaluate`), eval results beside checkpoints, and `config.init_from`."""
import json
import os

import jax
import numpy as np
import pytest

from vlpjax import checkpoint as checkpoint_lib
from vlpjax import config as config_lib
from vlpjax import evaluate
from vlpjax import trainer
from vlpjax import workdir as workdir_lib
from tests.test_trainer import make_config


def _config(steps=4, overrides=()):
  return make_config(f"steps={steps},batch=16,size=16,eval_every=2", overrides=[
      "checkpoint.every_steps=2", "log_every_steps=1", *overrides], evals=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny SigLIP run with zero-shot, retrieval and binary-choice evals at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("siglip_evals"))
  result = trainer.Loop(_config(), workdir).run()
  return workdir, result


def _read(workdir, step):
  return workdir_lib.read_eval_results(workdir_lib.eval_results_path(workdir, step))


def test_training_writes_eval_json_beside_each_checkpoint(trained):
  workdir, result = trained
  for step in (2, 4):
    path = workdir_lib.eval_results_path(workdir, step)
    assert path == os.path.join(workdir, "checkpoints", str(step), "eval_results.json")
    saved = _read(workdir, step)
    assert saved["step"] == step
    assert set(saved) == {"step", "zeroshot", "retrieval", "binary_choice"}
  assert _read(workdir, 4)["zeroshot"] == result["zeroshot"]
  # The extra file does not disturb Orbax: the checkpoint still restores.
  config = workdir_lib.read_config(workdir)
  params, step = workdir_lib.restore_params(workdir, trainer.build(config))
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
               jax.device_get(result["state"]["params"]))


def test_eval_only_run_reproduces_training_evals(trained, capsys):
  workdir, _ = trained
  during_training = {step: _read(workdir, step) for step in (2, 4)}
  os.remove(workdir_lib.eval_results_path(workdir, 2))
  assert evaluate.main(["--workdir", workdir, "--all_steps"]) == 0
  assert "eval zeroshot @ step 2" in capsys.readouterr().out
  for step in (2, 4):
    again = _read(workdir, step)
    for name in ("zeroshot", "retrieval", "binary_choice"):
      assert again[name].keys() == during_training[step][name].keys()
      for metric, value in during_training[step][name].items():
        assert again[name][metric] == pytest.approx(value, abs=1e-6), (step, name, metric)
  # TensorBoard and metrics.jsonl got the eval-only numbers too.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert sum("zeroshot/top1" in r for r in rows if r["step"] == 2) == 2


def test_eval_only_subset_with_overrides_merges_results(trained):
  workdir, _ = trained
  before = _read(workdir, 4)
  # A different eval split through an override: only `retrieval` runs and changes.
  assert evaluate.main(["--workdir", workdir, "--step", "4", "--evals", "retrieval",
                        "--config.evals.retrieval.split=train",
                        "--config.evals.retrieval.batch_size=32"]) == 0
  after = _read(workdir, 4)
  assert after["zeroshot"] == before["zeroshot"]
  assert after["retrieval"] != before["retrieval"]


def test_eval_only_errors(trained, tmp_path, capsys):
  workdir, _ = trained
  assert evaluate.main(["--workdir", workdir, "--step", "3"]) == 1
  assert "no checkpoint at step 3" in capsys.readouterr().err
  assert evaluate.main(["--workdir", workdir, "--evals", "zeroshott"]) == 1
  assert "zeroshott" in capsys.readouterr().err
  assert evaluate.main(["--workdir", str(tmp_path)]) == 2
  assert "config.json" in capsys.readouterr().err
  assert evaluate.main(["--workdir", workdir, "--config.evals.zeroshot.top_k=3"]) != 0
  assert "top_k" in capsys.readouterr().err


def _fresh_state(config, tmp_path):
  """The state a new run starts from (init plus config.init_from), without training."""
  setup = trainer.build(config)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ck"), every_steps=0, max_to_keep=1)
  try:
    state, _ = trainer.Loop(config, str(tmp_path))._restore_or_init(setup, ckpt)
  finally:
    ckpt.close()
  return jax.device_get(state["params"])


def test_init_from_workdir_takes_the_image_tower_and_resamples_posemb(trained, tmp_path,
                                                                       capsys):
  workdir, result = trained
  source = jax.device_get(result["state"]["params"])
  # 24 px images: a 3x3 patch grid where the source had 2x2.
  config = _config(overrides=["input.image_size=24", f"init_from.path={workdir}",
                              "init_from.include=img/.*"])
  config.input.pp = "resize(24)|value_range(-1, 1)"
  params = _fresh_state(config, tmp_path)
  out = capsys.readouterr().out
  assert "position embedding resampled: img/position_embedding/embedding 4 -> 9" in out
  np.testing.assert_array_equal(params["img"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"],
                                source["img"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"])
  assert params["img"]["position_embedding"]["embedding"].shape == (9, 32)
  # The text tower was not included: it keeps its fresh initialisation.
  fresh = _fresh_state(_config(), tmp_path / "plain")
  np.testing.assert_array_equal(params["txt"]["head"]["kernel"], fresh["txt"]["head"]["kernel"])
  assert not np.array_equal(params["txt"]["head"]["kernel"], source["txt"]["head"]["kernel"])


def test_init_from_params_dir_and_its_errors(trained, tmp_path):
  workdir, result = trained
  source = jax.device_get(result["state"]["params"])
  params_dir = str(tmp_path / "params")
  checkpoint_lib.save_params(params_dir, source)
  params = _fresh_state(_config(overrides=[f"init_from.path={params_dir}"]), tmp_path / "a")
  jax.tree.map(np.testing.assert_array_equal, params, source)

  wider = ["model.text.mlp_dim=96", f"init_from.path={params_dir}"]
  with pytest.raises(config_lib.ConfigError, match=r"txt/encoder/layers_0/mlp/fc1/bias .*"
                     r"\(64,\).*\(96,\)"):
    _fresh_state(_config(overrides=wider), tmp_path / "b")
  with pytest.raises(config_lib.ConfigError, match="matches no|no param"):
    _fresh_state(_config(overrides=[f"init_from.path={params_dir}",
                                    "init_from.include=vision/.*"]), tmp_path / "c")
  with pytest.raises(config_lib.ConfigError, match="init_from.path"):
    _fresh_state(_config(overrides=[f"init_from.path={tmp_path / 'nothing'}"]),
                 tmp_path / "d")


def test_two_process_eval_equals_one_process(trained, tmp_path):
  """2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) give the 1 x 8 numbers."""
  import shutil  # pylint: disable=g-import-not-at-top
  from tests import processes  # pylint: disable=g-import-not-at-top
  workdir, result = trained
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  os.remove(workdir_lib.eval_results_path(copy, 4))
  processes.run_processes(["vlpjax.evaluate", "--workdir", copy, "--step", "4"], timeout=300)
  saved = _read(copy, 4)
  for name in ("zeroshot", "retrieval", "binary_choice"):
    assert saved[name] == pytest.approx(result[name], abs=1e-6), name
  assert saved["zeroshot"]["num_examples"] == result["zeroshot"]["num_examples"]


def test_eval_only_leaves_a_running_trainers_inflight_save_alone(trained):
  """Evaluating a workdir whose run is still training must not clean up its temporary save."""
  workdir, _ = trained
  inflight = os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(inflight, "state"))
  try:
    assert evaluate.main(["--workdir", workdir, "--step", "4", "--evals", "zeroshot"]) == 0
    assert os.path.isdir(os.path.join(inflight, "state"))
  finally:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(inflight)
