"""The one place that builds the device mesh and turns logical axis names into shardings.

Model code names its dimensions logically (`embed`, `mlp`, `heads`, `act_batch`, ...). The
config's `sharding_rules` table maps each logical name to mesh axes; changing parallelism
(data parallel, FSDP, FSDP + tensor, multi-slice) is a change of that table and of
`config.mesh`, never of model code. `parallelism(name)` gives both for the named layouts
(docs/scaling.md has the tables).

Multi-slice (several TPU slices joined by the data-centre network, DCN): `config.mesh.slices`
= S makes the `data` axis span the slices. DCN is an order of magnitude slower than the links
inside a slice, so only the data-parallel gradient all-reduce crosses it, once per step; the
per-layer FSDP all-gathers and tensor-parallel collectives stay inside a slice.
"""
import collections
import contextlib
import math
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

from vlpjax.registry import unknown_name_message

MESH_AXES = ("data", "fsdp", "tensor")
# config.mesh keys: the mesh axes' sizes within a slice, and the number of slices.
MESH_KEYS = ("slices",) + MESH_AXES
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


# Named layouts: (config.mesh, rules preset). Sizes of -1 take the remaining devices.
PARALLELISM = {
    # Small models: every device holds all params; only gradients are all-reduced.
    "data_parallel": (dict(slices=1, data=-1, fsdp=1, tensor=1), "data_parallel"),
    # Params and optimizer state split over all devices, gathered layer by layer.
    "fsdp": (dict(slices=1, data=1, fsdp=-1, tensor=1), "fsdp"),
    # FSDP plus `tensor`-way Megatron splits inside each block (wide models, small batches).
    "fsdp_tensor": (dict(slices=1, data=1, fsdp=-1, tensor=2), "fsdp_tensor"),
    # `slices` TPU slices: data parallel across slices (over DCN), FSDP within each.
    "multislice": (dict(slices=2, data=1, fsdp=-1, tensor=1), "fsdp"),
}


def parallelism(name: str, *, tensor: Optional[int] = None, slices: Optional[int] = None
                ) -> Tuple[Dict[str, int], list]:
  """(config.mesh, config.sharding_rules) of a named layout, for configs:

    c.mesh, c.sharding_rules = sharding.parallelism("multislice", slices=4)

  `tensor` > 1 adds tensor parallelism to any layout (and its rules become `fsdp_tensor`'s).
  """
  if name not in PARALLELISM:
    raise ValueError(unknown_name_message("parallelism preset", name, PARALLELISM))
  mesh, rules = PARALLELISM[name]
  mesh = dict(mesh)
  if slices is not None:
    if name != "multislice" and slices != 1:
      raise ValueError(f"parallelism {name!r} is one slice; use 'multislice' for slices={slices}.")
    mesh["slices"] = slices
  if tensor is not None:
    mesh["tensor"] = tensor
    if tensor > 1:
      if name == "data_parallel":
        raise ValueError("data_parallel replicates every param; use 'fsdp_tensor' for "
                         f"tensor={tensor}.")
      rules = "fsdp_tensor"
  return mesh, rules_preset(rules)


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
  """Sizes for (data, fsdp, tensor); one axis may be -1 and takes what the others leave.

  With `slices` = S > 1 the sizes in `mesh_config` are per slice (num_devices / S devices),
  and the returned `data` size is S times the per-slice one: data parallel across slices.
  """
  unknown = set(mesh_config) - set(MESH_KEYS)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; use {MESH_KEYS}.")
  slices = int(mesh_config.get("slices", 1))
  if slices < 1 or num_devices % slices:
    raise ValueError(f"config.mesh.slices={slices} does not divide the {num_devices} devices.")
  per_slice = num_devices // slices
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {fill}.")
  known = math.prod(s for s in sizes.values() if s != -1)
  where = f"{per_slice} devices per slice" if slices > 1 else f"{num_devices} devices"
  if fill:
    if per_slice % known:
      raise ValueError(f"config.mesh {dict(mesh_config)}: {where} are not "
                       f"divisible by the fixed axes' product {known}.")
    sizes[fill[0]] = per_slice // known
  if math.prod(sizes.values()) != per_slice:
    raise ValueError(f"config.mesh {dict(mesh_config)} needs {math.prod(sizes.values())} "
                     f"devices{' per slice' if slices > 1 else ''} but {where} are available.")
  sizes["data"] *= slices
  return sizes


def _slice_groups(devices, slices: int):
  """Devices grouped by slice: TPU devices know their slice; elsewhere (GPU hosts, CPU
  tests) a slice is a run of consecutive processes, or of consecutive devices on one."""
  if all(getattr(d, "slice_index", None) is not None for d in devices):
    key = lambda d: d.slice_index  # pylint: disable=unnecessary-lambda-assignment
  elif len({d.process_index for d in devices}) % slices == 0 and jax.process_count() > 1:
    per = len({d.process_index for d in devices}) // slices
    key = lambda d: d.process_index // per  # pylint: disable=unnecessary-lambda-assignment
  else:
    per = len(devices) // slices
    order = {id(d): i for i, d in enumerate(devices)}
    key = lambda d: order[id(d)] // per  # pylint: disable=unnecessary-lambda-assignment
  groups = collections.defaultdict(list)
  for d in devices:
    groups[key(d)].append(d)
  if len(groups) != slices or len({len(g) for g in groups.values()}) != 1:
    raise ValueError(f"config.mesh.slices={slices}, but the devices form "
                     f"{len(groups)} slices of sizes {sorted(len(g) for g in groups.values())}.")
  return [groups[k] for k in sorted(groups)]


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  slices = int(mesh_config.get("slices", 1))
  if slices == 1:
    # create_device_mesh orders devices so the innermost axes (tensor) get the fastest links.
    # allow_split_physical_axes: a 16x16 chip grid can then give e.g. data=2 x fsdp=128
    # (an FSDP size that divides a width such as So400m's 1152), not only whole grid axes.
    device_array = mesh_utils.create_device_mesh(
        tuple(sizes[a] for a in MESH_AXES), devices=devices, allow_split_physical_axes=True)
  else:
    # One mesh per slice laid out for its own links, stacked along `data`: consecutive data
    # indices stay inside a slice, so the slow DCN hop is the outermost level of the
    # gradient all-reduce.
    per_slice = (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"])
    device_array = np.concatenate(
        [mesh_utils.create_device_mesh(per_slice, devices=group,
                                       allow_split_physical_axes=True)
         for group in _slice_groups(devices, slices)], axis=0)
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

  In order of precedence:
  1. the config's `distributed.coordinator_address` / `num_processes` / `process_id`
     (e.g. `--config.distributed.coordinator_address=10.0.0.1:1234 ...` on every host);
  2. the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
     JAX_PROCESS_ID (a launcher script that exports them per host);
  3. with `distributed.auto` (the default), JAX's own cluster detection: TPU VM pods and
     GKE, SLURM (`srun`), Open MPI, Kubernetes. Where it finds no cluster (a laptop, one GPU
     host driving all its GPUs from one process) the run stays single-process.
  """
  cfg = dict(distributed_config or {})
  env = os.environ
  explicit = None
  if cfg.get("coordinator_address"):
    explicit = (cfg["coordinator_address"], cfg.get("num_processes"), cfg.get("process_id"),
                "config.distributed")
  elif env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
    explicit = (env.get("JAX_COORDINATOR_ADDRESS"), env["JAX_NUM_PROCESSES"],
                env["JAX_PROCESS_ID"], "JAX_* environment variables")
  if explicit is not None:
    address, num, index, where = explicit
    try:
      num, index = int(num), int(index)
    except (TypeError, ValueError):
      num = index = -1
    if not address or num < 1 or not 0 <= index < num:
      raise ValueError(f"{where}: a multi-process run needs a coordinator address, "
                       f"num_processes >= 1 and 0 <= process_id < num_processes; got "
                       f"{address!r}, {num}, {index}.")
    jax.distributed.initialize(coordinator_address=address, num_processes=num,
                               process_id=index)
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


def _identity(x):
  return x


def process_allgather(local: np.ndarray, tiled: bool = False) -> np.ndarray:
  """Every process's `local` array in process order: stacked on a new leading axis, or
  concatenated along axis 0 with `tiled`. The same on every process.

  Like `jax.experimental.multihost_utils.process_allgather`, except that it returns only when
  every local device has finished the all-gather. JAX's reads the first local device's copy
  and returns while the other local devices may still be inside the collective. If the
  process exits then, JAX shuts the coordination service down while such a device is still
  arranging its gloo connection through it, and the CPU client's destructor waits for that
  device: the process hangs (jax 0.10, about one exit in 40 on a loaded 2-core host).
  """
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local if tiled else local[None]
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  mesh = Mesh(np.array(devices).reshape(jax.process_count(), -1), ("processes", "local"))
  rows = jax.make_array_from_process_local_data(
      NamedSharding(mesh, PartitionSpec("processes")), local[None])
  gathered = jax.jit(_identity, out_shardings=NamedSharding(mesh, PartitionSpec()))(rows)
  gathered = np.asarray(jax.block_until_ready(gathered).addressable_data(0))
  return gathered.reshape((-1,) + local.shape[1:]) if tiled else gathered
