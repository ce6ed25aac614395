"""What a config builds before any data is read: mesh, family, optimizer, sharded state, step.

Kept apart from the loop (`vlpjax/trainer.py`) so that what needs only the step (the train
benchmark, ahead-of-time compiles for pod shapes) imports JAX, Flax, optax and Orbax and
nothing of the input stack: no TensorFlow, seqio or metric writers. A machine with an
accelerator and a bare JAX install can time or compile the step from a config file.
"""
import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpjax import checkpoint as checkpoint_lib
from vlpjax import config as config_lib
from vlpjax import optim
from vlpjax import sharding
from vlpjax import train_step as train_step_lib
from vlpjax.families import get_family


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the first step (no data read yet)."""
  config: Any
  mesh: Any
  family: Any
  state_shardings: Any
  abstract_state: Any
  init_state: Callable[[], Any]
  train_step: Callable[[Any, Any], Any]
  batch_shardings: Any
  jitted_step: Any
  jitted_steps: Callable[[int], Any]

  def train_steps(self, state, batches: Sequence[Any]):
    """`len(batches)` train steps in one call; (state, metrics stacked over the steps).

    The same steps as `train_step` on each batch in turn, as one program (`lax.scan`). Why:
    every call of a compiled program costs the host something that does not depend on the
    step's size, and on CPU that is large: XLA:CPU takes a fresh buffer for the step's
    temporaries at each call (9 GB for SigLIP B/16 at batch 32) and the kernel zeroes every
    page of it again. Within one call the scan reuses that buffer, so K steps per call pay it
    once (docs/benchmarks.md, "Steps per call").
    """
    with sharding.logical_context(self.mesh, self.config.sharding_rules):
      return self.jitted_steps(len(batches))(state, tuple(batches))

  def abstract_step_args(self):
    """(state, batch) of the train step as sharded ShapeDtypeStructs: nothing allocated."""
    state = checkpoint_lib.abstract_with_shardings(self.abstract_state, self.state_shardings)
    batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.batch_shardings[k])
             for k, s in self.family.input_specs(self.config.global_batch_size).items()}
    return state, batch

  def lower_train_step(self):
    """Lowers the train step from shapes alone (no data, no state allocated)."""
    with sharding.logical_context(self.mesh, self.config.sharding_rules):
      return self.jitted_step.lower(*self.abstract_step_args())


def _check_batch_divisibility(config, mesh) -> None:
  batch, accum = config.global_batch_size, config.grad_accum_steps
  micro = batch // accum
  split = sharding.batch_axis_size(mesh, config.sharding_rules)
  if micro % split:
    raise config_lib.ConfigError(
        f"global_batch_size={batch} / grad_accum_steps={accum} = {micro} examples per "
        f"micro-batch, not divisible by the {split}-way batch sharding of mesh "
        f"{dict(mesh.shape)}.")
  if batch % jax.process_count():
    raise config_lib.ConfigError(f"global_batch_size={batch} is not divisible by the "
                                 f"{jax.process_count()} processes.")


def build(config, devices=None) -> Setup:
  """Mesh, family, optimizer, state shardings and the jitted init and train step."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = config.sharding_rules
  _check_batch_divisibility(config, mesh)
  family = get_family(config)
  specs = family.input_specs(config.global_batch_size // config.grad_accum_steps)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)

  with sharding.logical_context(mesh, rules):
    boxed = jax.eval_shape(family.init, init_rng, specs)
  params_sharding = sharding.param_shardings(boxed, mesh, rules)
  params_abstract = nn.unbox(boxed)
  tx, schedule, frozen = optim.make_optimizer(config, params_abstract)
  opt_abstract = jax.eval_shape(tx.init, params_abstract)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_shardings = dict(
      step=replicated, params=params_sharding,
      opt_state=sharding.like_params_shardings(opt_abstract, params_abstract,
                                               params_sharding, mesh))
  abstract_state = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abstract,
                        opt_state=opt_abstract)

  def init_fn():
    params = nn.unbox(family.init(init_rng, {k: jnp.zeros(s.shape, s.dtype)
                                           for k, s in specs.items()}))
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  # Created directly sharded: no host ever holds the full state.
  jitted_init = jax.jit(init_fn, out_shardings=state_shardings)

  def init_state():
    with sharding.logical_context(mesh, rules):
      return jitted_init()

  batch_shardings = {k: sharding.batch_sharding(mesh, rules, len(s.shape))
                     for k, s in family.input_specs(config.global_batch_size).items()}
  step_fn = train_step_lib.make_train_step(family, tx, schedule, config.grad_accum_steps,
                                           step_rng, frozen)
  jitted_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                        out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def train_step(state, batch):
    with sharding.logical_context(mesh, rules):
      return jitted_step(state, batch)

  def steps_fn(state, batches):
    # Stacking copies the batches once ([K, B, ...], batch-sharded on axis 1); the scan then
    # feeds step_fn one at a time, exactly as K calls would.
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
    return jax.lax.scan(step_fn, state, stacked)

  @functools.lru_cache(maxsize=None)
  def jitted_steps(count: int):
    return jax.jit(steps_fn, in_shardings=(state_shardings, (batch_shardings,) * count),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  return Setup(config, mesh, family, state_shardings, abstract_state, init_state, train_step,
               batch_shardings, jitted_step, jitted_steps)

