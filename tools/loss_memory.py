r"""Per-device memory of the sigmoid loss's value and gradient: all-gather vs chunked ring.

  python -m tools.loss_memory [--batch 4096 16384 32768] [--dim 1152] [--mesh data=8]
                              [--json OUT]

Compiles (never runs) `jax.value_and_grad` of the plain "sigmoid" loss and of
"sigmoid_chunked" on [B, dim] embeddings sharded over the batch, and prints XLA's per-device
buffer sizes from `compiled.memory_analysis()` as a markdown table. For the plain loss XLA
all-gathers the texts, so each device holds [B/n, B] logits (and their gradient); the chunked
loss holds [B/n, B/n] at a time. Nothing is allocated, so batch 32768 compiles on a laptop:
without 8 accelerators the 8 devices are fake CPU ones.
"""
import argparse
import json
import os
import sys

NUM_DEVICES = 8
if "jax" not in sys.modules:
  # Before JAX starts: fake CPU devices for machines with fewer than 8 (only the host platform
  # reads this flag, so real accelerators are unaffected).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from vlpjax import chunked_loss  # noqa: E402
from vlpjax import losses  # noqa: E402
from vlpjax import sharding  # noqa: E402

RULES = "data_parallel"  # Only `act_batch` matters here; every preset splits it alike.
LOSS_NAMES = ("sigmoid", "sigmoid_chunked")


def loss_devices():
  """The default backend's devices if there are 8 or more, else 8 (fake) CPU devices."""
  devices = jax.devices()
  if len(devices) < NUM_DEVICES:
    devices = jax.devices("cpu")
  if len(devices) < NUM_DEVICES:
    raise ValueError(f"tools.loss_memory needs {NUM_DEVICES} devices, found {len(devices)}: "
                     "import it before anything imports JAX (it sets XLA_FLAGS).")
  return devices[:NUM_DEVICES]


def compiled_memory(loss_name: str, batch: int, dim: int, mesh, rules,
                    dtype=jnp.float32) -> dict:
  """Per-device bytes of the compiled value_and_grad of one loss (temp, argument, output)."""
  loss_fn = losses.LOSSES.get(loss_name)
  embeddings = sharding.batch_sharding(mesh, rules, 2)
  replicated = NamedSharding(mesh, PartitionSpec())
  # Gradients leave sharded like the embeddings, as they do in the trainer's backward pass.
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True),
                 out_shardings=(replicated, (embeddings, embeddings, replicated, replicated)))
  emb = jax.ShapeDtypeStruct((batch, dim), dtype, sharding=embeddings)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
  with sharding.logical_context(mesh, rules):
    stats = step.lower(emb, emb, scalar, scalar).compile().memory_analysis()
  return {"temp": stats.temp_size_in_bytes, "argument": stats.argument_size_in_bytes,
          "output": stats.output_size_in_bytes}


def memory_table(batches, dim: int, mesh_config) -> list:
  mesh = sharding.make_mesh(mesh_config, loss_devices())
  rules = sharding.rules_preset(RULES)
  rows = []
  for batch in batches:
    row = {"batch": batch, "dim": dim, "devices": mesh.size, "mesh": dict(mesh.shape)}
    for name in LOSS_NAMES:
      row[name] = compiled_memory(name, batch, dim, mesh, rules)
    row["temp_ratio"] = row["sigmoid_chunked"]["temp"] / max(row["sigmoid"]["temp"], 1)
    rows.append(row)
  return rows


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f}"


def markdown(rows) -> str:
  lines = ["| global batch | per device | dim | all-gather temp MiB | chunked temp MiB | "
           "temp ratio | argument MiB |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['batch']} | {r['batch'] // r['devices']} | {r['dim']} | "
        f"{_mib(r['sigmoid']['temp'])} | {_mib(r['sigmoid_chunked']['temp'])} | "
        f"{r['temp_ratio']:.3f} | {_mib(r['sigmoid_chunked']['argument'])} |")
  return "\n".join(lines)


def parse_mesh(text: str) -> dict:
  try:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
  except ValueError as e:
    raise ValueError(f"--mesh {text!r}: expected axis=size pairs such as data=2,fsdp=4") from e


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[4096, 16384, 32768],
                      help="global batch sizes (each divisible by the 8-way batch split)")
  parser.add_argument("--dim", type=int, default=1152, help="embedding width")
  parser.add_argument("--mesh", default=f"data={NUM_DEVICES}",
                      help="mesh axes over the 8 devices, e.g. data=2,fsdp=4")
  parser.add_argument("--json", default=None, help="also write the rows as JSON here")
  args = parser.parse_args(argv)
  rows = memory_table(args.batch, args.dim, parse_mesh(args.mesh))
  print(f"Per-device memory of value_and_grad(loss) on {rows[0]['devices']} "
        f"{loss_devices()[0].platform} devices, mesh {rows[0]['mesh']}, f32 embeddings "
        f"(XLA memory_analysis of the compiled program):\n")
  print(markdown(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
