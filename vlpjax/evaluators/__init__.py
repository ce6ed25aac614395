"""Evaluators by name: `config.evals.<name> = dict(type=..., every_steps=..., ...)`.

An evaluator is built once with the family, mesh and rules, then `run(params)` returns a dict of
scalars. Evaluators run in the training loop and stand-alone.
"""
from vlpjax import config as config_lib
from vlpjax.registry import Registry

EVALUATORS = Registry("evaluator")


def build_evaluators(config, family, mesh):
  """All evaluators in `config.evals`, keyed by their config name."""
  # Importing registers the built-in evaluators.
  # pylint: disable=g-import-not-at-top,unused-import
  from vlpjax.evaluators import (captioning, document_evals, prefix_lm_loss, retrieval,
                                 video_evals, zeroshot)
  # Check every entry before building any: a typo in the last one fails before work starts.
  checked = {}
  for name, entry in config.evals.items():
    entry = dict(entry)
    if "type" not in entry:
      raise config_lib.ConfigError(f"config.evals.{name} needs a 'type' "
                                   f"(one of {EVALUATORS.names()}).")
    cls = EVALUATORS.get(entry.pop("type"))
    config_lib.check_kwargs(f"config.evals.{name}", entry, cls.config_keys())
    checked[name] = (cls, entry)
  return {name: cls(name, entry, config=config, family=family, mesh=mesh)
          for name, (cls, entry) in checked.items()}
