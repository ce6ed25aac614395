"""Evaluate a training run's checkpoints without training: eval-only runs.

  python -m vlpjax.evaluate --workdir DIR [--step N | --all_steps] [--evals a,b]
      [--config FILE.py[:ARG]] [--config.a.b=value ...]

Reads DIR/config.json (the run's effective config) unless `--config` names another experiment
file, e.g. one that adds evaluators the run did not have: its model must match the checkpoint.
`--config.a.b=value` overrides keys as in `vlpjax.train` (e.g. `--config.evals.zeroshot.split=
test`). Restores only the params (no optimizer state) of the latest checkpoint, `--step N`, or
every checkpoint with `--all_steps`, runs the evaluators in `config.evals` (or those named by
`--evals`) exactly as the training loop does, prints one line per evaluator and writes:

  DIR/checkpoints/<step>/eval_results.json   {"step": N, "<evaluator>": {"<metric>": value}}
                                             (merged with what is already there)
  DIR/tensorboard, DIR/metrics.jsonl         `<evaluator>/<metric>` at the checkpoint's step

Multi-host: started on every host like `vlpjax.train` (TPU pods, SLURM are detected); each host
reads its shard of the eval data and the results are gathered, with padding never counted.
"""
import argparse
import sys
from typing import Dict, List, Optional

from absl import logging

from vlpjax import config as config_lib
from vlpjax import host_memory


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m vlpjax.evaluate", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a vlpjax.train workdir")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  which.add_argument("--all_steps", action="store_true", help="evaluate every checkpoint")
  parser.add_argument("--evals", default="",
                      help="comma-separated names from config.evals (default: all)")
  parser.add_argument("--config", default=None, metavar="FILE.py[:ARG]",
                      help="experiment config to take the evaluators from (default: the "
                           "workdir's config.json)")
  args, rest = parser.parse_known_args(argv)
  return args, config_lib.split_overrides(parser, rest)


def load_config(workdir: str, spec: Optional[str], overrides) -> config_lib.ConfigDict:
  from vlpjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if spec:
    return config_lib.finalize(config_lib.load(spec), overrides)
  return workdir_lib.read_config(workdir, overrides)


def evaluate(workdir: str, config, steps: Optional[List[int]] = None, all_steps: bool = False,
             names: Optional[List[str]] = None) -> Dict[int, Dict[str, Dict[str, float]]]:
  """{step: {evaluator: {metric: value}}} for the chosen checkpoints of `workdir`."""
  # pylint: disable=g-import-not-at-top  (fast --help and config errors)
  import jax
  from vlpjax import metrics as metrics_lib
  from vlpjax import sharding
  from vlpjax import trainer
  from vlpjax import workdir as workdir_lib
  from vlpjax.evaluators import build_evaluators, run_evaluators

  sharding.maybe_initialize_distributed(config.distributed)
  is_lead = jax.process_index() == 0
  trainer.import_data_modules(config)
  setup = trainer.build(config)
  evaluators = build_evaluators(config, setup.family, setup.mesh, names)
  if not evaluators:
    raise config_lib.ConfigError("config.evals is empty: nothing to evaluate.")
  ckpt = workdir_lib.checkpointer(workdir)
  try:
    if all_steps:
      steps = sorted(ckpt.all_steps())
    steps = [workdir_lib.resolve_step(ckpt, s, workdir) for s in (steps or [None])]
  finally:
    ckpt.close()
  writer = metrics_lib.make_writer(workdir, is_lead)
  out = {}
  try:
    for step in steps:
      params, _ = workdir_lib.restore_params(workdir, setup, step)
      print(f"evaluating checkpoint step {step} of {workdir}", flush=True)
      out[step] = run_evaluators(evaluators, params, step, writer)
      if is_lead:
        path = workdir_lib.write_eval_results(workdir, step, out[step])
        print(f"eval results written to {path}", flush=True)
      del params
  finally:
    writer.close()
  return out


def main(argv=None) -> int:
  # Before JAX starts its CPU client (see vlpjax/host_memory.py); may re-execute the command.
  host_memory.configure(command_line=argv is None)
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    config = load_config(args.workdir, args.config, overrides)
  except (config_lib.ConfigError, ValueError) as e:
    print(f"Config error: {e}", file=sys.stderr)
    return 2
  logging.set_verbosity(logging.WARNING)
  names = [n.strip() for n in args.evals.split(",") if n.strip()]
  try:
    evaluate(args.workdir, config, None if args.step is None else [args.step], args.all_steps,
             names)
  except (config_lib.ConfigError, ValueError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
