"""The one place that builds the device mesh and turns logical axis names into shardings.

Model code names its dimensions logically (`embed`, `mlp`, `heads`, `act_batch`, ...). The
config's `sharding_rules` table maps each logical name to mesh axes; changing parallelism
(data parallel, FSDP, FSDP + tensor) is a change of that table and of `config.mesh`, never of
model code.
"""
import contextlib
import math
from typing import Any, Dict, Iterator, Mapping, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

from vlpjax.registry import unknown_name_message

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of activations and inputs is split over every data-like axis.
BATCH_AXES = ("data", "fsdp")

# Logical names used by the models. Activation names carry an `act_` prefix so that a param
# dimension (`embed`, FSDP-sharded) and the same activation dimension (`act_embed`, usually
# replicated) can be mapped differently.
_ACTIVATIONS = [("act_batch", BATCH_AXES), ("act_length", None), ("act_embed", None)]
# Names of the decoder-LM families (decoder, CoCa, VLM):
#   kv_heads  key/value heads of grouped-query attention (fewer than `heads`; split over
#             `tensor` like `heads`, or replicated where they do not divide it: MQA's single
#             kv head is replicated, as in MaxText)
#   layers    the stacked-layer axis of scanned params (never sharded: scan slices it)
#   lora      the low-rank axis of LoRA adapters (tiny)
#   embed_in  the input width of a projector whose output is `embed` (a kernel cannot name
#             `embed` twice, and its input side is small enough to replicate)
_DECODER_NAMES = {
    "replicated": [("kv_heads", None), ("act_kv_heads", None), ("layers", None),
                   ("lora", None), ("embed_in", None)],
    "tensor": [("kv_heads", "tensor"), ("act_kv_heads", None), ("layers", None),
               ("lora", None), ("embed_in", None)],
}
RULES_PRESETS: Dict[str, list] = {
    # Every param replicated, batch split over all devices.
    "data_parallel": _ACTIVATIONS + [
        ("act_heads", None), ("act_kv", None), ("act_mlp", None),
        ("embed", None), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
        ("pos", None), ("proj", None), ("patch", None), ("channels", None),
    ] + _DECODER_NAMES["replicated"],
    # ZeRO-3 style: params sharded on their model-width dimension, gathered per layer.
    "fsdp": _ACTIVATIONS + [
        ("act_heads", None), ("act_kv", None), ("act_mlp", None),
        ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
        ("pos", None), ("proj", "fsdp"), ("patch", None), ("channels", None),
    ] + _DECODER_NAMES["replicated"],
    # FSDP plus Megatron-style tensor parallelism inside attention and MLP blocks.
    "fsdp_tensor": _ACTIVATIONS + [
        ("act_heads", "tensor"), ("act_kv", None), ("act_mlp", "tensor"),
        ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None),
        ("vocab", "tensor"), ("pos", None), ("proj", "fsdp"), ("patch", None),
        ("channels", None),
    ] + _DECODER_NAMES["tensor"],
}


def rules_preset(name: str) -> list:
  """A copy of a named rules table, for configs: `config.sharding_rules = rules_preset(...)`."""
  if name not in RULES_PRESETS:
    raise ValueError(unknown_name_message("sharding rules preset", name, RULES_PRESETS))
  return [tuple(r) for r in RULES_PRESETS[name]]


def as_rules(table: Sequence[Sequence[Any]]) -> Tuple[Tuple[str, Any], ...]:
  """Normalises a config table (lists after JSON round trips) to flax's rule tuples."""
  rules = []
  for entry in table:
    if len(entry) != 2:
      raise ValueError(f"sharding_rules entry {entry!r} must be (logical_name, mesh_axes).")
    name, axes = entry
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [axes] if axes is not None and axes not in MESH_AXES else []
    if bad:
      raise ValueError(f"sharding_rules maps {name!r} to unknown mesh axes {bad}; "
                       f"mesh axes are {MESH_AXES}.")
    rules.append((name, axes))
  return tuple(rules)


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> Dict[str, int]:
  """Sizes for (data, fsdp, tensor); one axis may be -1 and takes what the others leave."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}.")
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {fill}.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(mesh_config)}: {num_devices} devices are not "
                       f"divisible by the fixed axes' product {known}.")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"config.mesh {dict(mesh_config)} needs {math.prod(sizes.values())} "
                     f"devices but {num_devices} are available.")
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  # create_device_mesh orders devices so the innermost axes (tensor) get the fastest links.
  device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  # Auto axes: the compiler propagates shardings from the constraints we give it.
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def logical_context(mesh: Mesh, rules) -> Iterator[None]:
  """Context in which model code's `nn.with_logical_constraint` calls take effect."""
  with nn.logical_axis_rules(as_rules(rules)), jax.set_mesh(mesh):
    yield


def _mesh_axes_for(names, rules) -> PartitionSpec:
  return nn.logical_to_mesh_axes(names, as_rules(rules))


def _fit_to_shape(spec: PartitionSpec, shape, mesh: Mesh, where: str) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (small dims such as biases)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes_tuple = axes if isinstance(axes, tuple) else (axes,)
    size = math.prod(mesh.shape[a] for a in axes_tuple)
    if dim % size:
      logging.info("Replicating dim of size %d of %s: not divisible by mesh axes %s (%d).",
                   dim, where, axes_tuple, size)
      fitted.append(None)
    else:
      fitted.append(axes)
  return PartitionSpec(*fitted)


def param_shardings(abstract_boxed_params, mesh: Mesh, rules):
  """NamedShardings for a tree of (boxed, abstract) params from `jax.eval_shape(model.init)`."""
  logical_specs = nn.get_partition_spec(abstract_boxed_params)
  shapes = nn.unbox(abstract_boxed_params)

  def to_sharding(path, spec, shape_struct):
    mesh_spec = _mesh_axes_for(tuple(spec), rules) if spec else PartitionSpec()
    fitted = _fit_to_shape(mesh_spec, shape_struct.shape, mesh, jax.tree_util.keystr(path))
    return NamedSharding(mesh, fitted)

  return jax.tree_util.tree_map_with_path(
      to_sharding, logical_specs, shapes,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


def like_params_shardings(abstract_tree, params_abstract, params_sharding, mesh: Mesh):
  """Shardings for a tree (e.g. optimizer state) whose leaves mirror params by key path.

  An optimizer-state leaf whose key path ends with a param's key path and has that param's
  shape gets the param's sharding (Adam's mu/nu); everything else (counts) is replicated.
  """
  by_path = {}
  for (path, leaf), sharding in zip(
      jax.tree_util.tree_flatten_with_path(params_abstract)[0],
      jax.tree_util.tree_leaves(params_sharding)):
    by_path[tuple(path)] = (leaf.shape, sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      hit = by_path.get(path[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  spec = _mesh_axes_for(("act_batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def batch_axis_size(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split (the global batch must divide by it)."""
  axes = _mesh_axes_for(("act_batch",), rules)[0]
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> Dict[str, jax.Array]:
  """This host's numpy batch -> global jax.Arrays sharded over the batch axes.

  Each process passes its own slice; together they form the global batch in process order.
  """
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), v)
      for k, v in local_batch.items()
  }


def maybe_initialize_distributed(distributed_config) -> None:
  """Joins a multi-process run when one is configured or detected; no-op on one process.

  With `coordinator_address` set, the config's explicit settings are used. Otherwise (`auto`)
  JAX's own cluster detection runs: TPU VM pods and GKE, SLURM, Open MPI, Kubernetes. Where it
  finds no cluster (a laptop, one GPU host) the run stays single-process.
  """
  cfg = dict(distributed_config or {})
  if cfg.get("coordinator_address"):
    jax.distributed.initialize(
        coordinator_address=cfg["coordinator_address"],
        num_processes=int(cfg["num_processes"]),
        process_id=int(cfg["process_id"]),
    )
  elif cfg.get("auto", True) and not jax.distributed.is_initialized():
    try:
      jax.distributed.initialize()
    except ValueError as e:
      # JAX's message when no cluster environment was detected.
      if "coordinator_address" not in str(e):
        raise
      logging.info("No multi-process cluster detected: running single-process.")
    except RuntimeError as e:
      # JAX already ran in this process (a notebook, a test): too late to join a cluster.
      if "must be called before" not in str(e):
        raise
      logging.warning("JAX was initialised before the trainer: not joining a multi-process "
                      "run. Start training before any other JAX call to use several hosts.")
  if jax.process_count() > 1:
    logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
