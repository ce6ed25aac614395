"""Evaluators by name: `config.evals.<name> = dict(type=..., every_steps=..., ...)`.

An evaluator is built once with the family, mesh and rules, then `run(params)` returns a dict of
scalars. Evaluators run in the training loop and stand-alone.
"""
import time
from typing import Dict, Optional, Sequence

from vlpjax import config as config_lib
from vlpjax.registry import Registry

EVALUATORS = Registry("evaluator")


def build_evaluators(config, family, mesh, names: Optional[Sequence[str]] = None):
  """The evaluators in `config.evals` (all, or those in `names`), keyed by their config name."""
  # Importing registers the built-in evaluators.
  # pylint: disable=g-import-not-at-top,unused-import
  from vlpjax.evaluators import (binary_choice, captioning, document_evals, prefix_lm_loss,
                                 retrieval, video_evals, zeroshot)
  # Check every entry before building any: a typo in the last one fails before work starts.
  unknown = sorted(set(names or ()) - set(config.evals))
  if unknown:
    raise config_lib.ConfigError(f"no evaluator named {unknown} in config.evals (have "
                                 f"{sorted(config.evals)}).")
  checked = {}
  for name, entry in config.evals.items():
    if names and name not in names:
      continue
    entry = dict(entry)
    if "type" not in entry:
      raise config_lib.ConfigError(f"config.evals.{name} needs a 'type' "
                                   f"(one of {EVALUATORS.names()}).")
    cls = EVALUATORS.get(entry.pop("type"))
    config_lib.check_kwargs(f"config.evals.{name}", entry, cls.config_keys())
    checked[name] = (cls, entry)
  return {name: cls(name, entry, config=config, family=family, mesh=mesh)
          for name, (cls, entry) in checked.items()}


def run_evaluators(evaluators, params, step: int, writer) -> Dict[str, Dict[str, float]]:
  """Runs each evaluator on `params`, prints a line per evaluator and logs `<name>/<metric>`.

  The one place both the training loop and `vlpjax.evaluate` run evaluators through, so an
  eval-only run reports exactly what training would have.
  """
  results = {}
  for name, evaluator in evaluators.items():
    t0 = time.perf_counter()
    values = {k: float(v) for k, v in evaluator.run(params).items()}
    writer.write_scalars(step, {f"{name}/{k}": v for k, v in values.items()})
    shown = ", ".join(f"{k} {v:g}" if k.startswith("num_") else f"{k} {v:.4f}"
                      for k, v in values.items())
    print(f"eval {name} @ step {step}: {shown} ({time.perf_counter() - t0:.1f}s)", flush=True)
    results[name] = values
  writer.flush()
  return results
