"""tools.aot_compile: TPU topologies by name, FLOP counting, compiling configs for TPU pods.

Compiling needs libtpu (the `tpu` extra) but no TPU: those tests skip without it.
"""
import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tools import aot_compile
from vlpjax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")
DEMO = os.path.join(EXPERIMENTS, "siglip_shapes.py")
# The demo's towers shrunk to width 32, depth 1: compiles for a TPU in a few seconds.
TINY = ["--config.model.image.width=32", "--config.model.image.depth=1",
        "--config.model.image.mlp_dim=64", "--config.model.image.num_heads=2",
        "--config.model.text.width=32", "--config.model.text.depth=1",
        "--config.model.text.mlp_dim=64", "--config.model.text.num_heads=2",
        "--config.model.embed_dim=32"]
# tests/conftest.py shares a compilation cache across the run. An executable compiled for a
# TPU topology (no TPU client in this process) is written to it but cannot be read back: JAX
# warns and compiles again, which is what these tests would do without the cache.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning")


@pytest.fixture(name="libtpu")
def fixture_libtpu():
  return pytest.importorskip(
      "libtpu", reason="compiling for TPU topologies needs libtpu: pip install -e .[tpu]")


def tiny_config(arg="batch=64", extra=()):
  overrides = [o[len("--config."):] for o in TINY] + list(extra)
  return config_lib.finalize(config_lib.load(f"{DEMO}:{arg}"), overrides)


# ---------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name,grid,chips,host_bounds", [
    ("v5p-256", (4, 4, 8), 128, (2, 2, 1)),     # TensorCores: 2 per chip
    ("v5p-8", (2, 2, 1), 4, (2, 2, 1)),
    ("v5p-12288", (16, 16, 24), 6144, (2, 2, 1)),
    ("v5p-384", (4, 4, 12), 192, (2, 2, 1)),
    ("v4-128", (4, 4, 4), 64, (2, 2, 1)),
    ("v4-4096", (8, 16, 16), 2048, (2, 2, 1)),
    ("v5e-256", (16, 16), 256, (2, 2, 1)),      # chips
    ("v5e-1", (1, 1), 1, (1, 1, 1)),
    ("v6e-8", (2, 4), 8, (2, 4, 1)),            # one host of 8 chips
    ("v5p:4x4x12", (4, 4, 12), 192, (2, 2, 1)),  # a raw chip grid
])
def test_accelerator_names_map_to_chip_grids(name, grid, chips, host_bounds):
  topo = aot_compile.topology(name)
  assert (topo.shape, topo.chips, topo.chips_per_host_bounds) == (grid, chips, host_bounds)
  assert topo.hbm_gib == {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}[topo.generation]


def test_v5p_names_cover_every_whole_cube_count_that_fits_the_largest_slice():
  names = [n for n in aot_compile.accelerator_names() if n.startswith("v5p-")]
  cube_counts = [int(n[4:]) // 128 for n in names if int(n[4:]) >= 128]
  # Whole 4x4x4 cubes whose count factors into sides of at most 16, 16 and 24 cubes' edges.
  assert cube_counts[:8] == [1, 2, 3, 4, 5, 6, 8, 9]
  assert cube_counts[-1] == 96 and 7 not in cube_counts  # 4x4x28 is longer than 24
  for name in names:
    shape = aot_compile.topology(name).shape
    assert sorted(shape)[-1] <= 24 and sorted(shape)[-2] <= 16


@pytest.mark.parametrize("name,hint", [
    ("v5p-250", "Did you mean 'v5p-128' or 'v5p-256'?"),   # the neighbouring sizes
    ("v4-100", "Did you mean 'v4-64' or 'v4-128'?"),
    ("v5p-9", "Did you mean 'v5p-8' or 'v5p-16'?"),        # not a whole number of chips
    ("v7-8", "Known names: v4: v4-8, v4-16"), ("tpu", "v5p-8")])
def test_unknown_topology_names_list_the_known_ones(name, hint):
  with pytest.raises(ValueError, match="Unknown TPU topology") as error:
    aot_compile.topology(name)
  assert hint in str(error.value)
  assert "v6e-256" in str(error.value)


def test_unknown_topology_on_the_command_line_exits_2(capsys):
  assert aot_compile.main(["--config", DEMO, "--topology", "v5p-250"]) == 2
  assert "Error: Unknown TPU topology 'v5p-250'" in capsys.readouterr().err


def test_without_libtpu_the_command_says_what_to_install(monkeypatch, capsys):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  assert aot_compile.main(["--config", DEMO, "--topology", "v5e-8"]) == 2
  assert "needs libtpu (no TPU needed): pip install -e .[tpu]" in capsys.readouterr().err


@pytest.mark.usefixtures("libtpu")
def test_every_known_name_is_a_topology_libtpu_accepts():
  # The table against libtpu itself: each name gives one compile-only device per chip of the
  # expected TPU kind (megacore on v4 and v5p).
  kinds = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
  for name in aot_compile.accelerator_names():
    topo = aot_compile.topology(name)
    devices = aot_compile.compile_only_devices(topo)
    assert len(devices) == topo.chips, name
    assert devices[0].device_kind == kinds[topo.generation], name


@pytest.mark.usefixtures("libtpu")
def test_slices_give_devices_of_each_slice():
  devices = aot_compile.compile_only_devices(aot_compile.topology("v5p-8"), num_slices=2)
  assert sorted(d.slice_index for d in devices) == [0] * 4 + [1] * 4


# ---------------------------------------------------------------------------------- FLOPs


def test_matmul_flops_counts_scan_iterations_cond_branches_and_convolutions():
  x = jnp.ones((4, 8))
  weights = jnp.ones((5, 8, 8))

  def scanned(x, weights):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, weights)[0]

  one_matmul = 2 * 4 * 8 * 8
  assert aot_compile.matmul_flops(jax.make_jaxpr(scanned)(x, weights)) == 5 * one_matmul

  def branches(p, x):
    return jax.lax.cond(p, lambda x: x @ weights[0] @ weights[1], lambda x: x @ weights[0], x)

  assert aot_compile.matmul_flops(jax.make_jaxpr(branches)(True, x)) == 2 * one_matmul

  images = jnp.ones((2, 16, 16, 3))
  kernel = jnp.ones((4, 4, 3, 6))   # 4x4 patches, stride 4: a ViT patch embedding

  def patchify(images):
    return jax.lax.conv_general_dilated(images, kernel, (4, 4), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  # 2 images x 4x4 output positions x 6 features, each a 4*4*3 dot product.
  assert aot_compile.matmul_flops(jax.make_jaxpr(patchify)(images)) == 2 * (2 * 16 * 6) * 48


def test_matmul_flops_of_a_gradient_counts_the_rematerialised_forward():
  w = jnp.ones((8, 8))

  def loss(w, x):
    block = jax.checkpoint(lambda x: jnp.sin(x @ w))
    return block(x).sum()

  x = jnp.ones((4, 8))
  forward = 2 * 4 * 8 * 8
  # Forward, then the remat'd forward again plus the two backward matmuls (dx and dw); the
  # reference is the same count read off by hand from the printed jaxpr.
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(w, x)
  assert aot_compile.matmul_flops(jaxpr) == 4 * forward


def test_compiler_out_of_memory_messages_are_read():
  gib = 2**30
  assert aot_compile.compiler_oom_bytes(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (21.04G) exceeds available HBM (15.75G).") == (int(21.04 * gib),
                                                                   int(15.75 * gib))
  assert aot_compile.compiler_oom_bytes(
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
      "space hbm. Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G.") == (
          int(20.5 * gib), int(15.48 * gib))
  assert aot_compile.compiler_oom_bytes("INTERNAL: something else") == (None, None)


# ---------------------------------------------------------------------------------- compile


@pytest.mark.usefixtures("libtpu")
def test_one_layer_demo_compiles_for_v5e_8_and_its_figures_add_up():
  # The demo's own width (128: TPUs pad narrower dims to 128 lanes), one layer per tower.
  config = tiny_config(extra=[f"model.{tower}.{key}={value}" for tower in ("image", "text")
                              for key, value in (("width", 128), ("mlp_dim", 256))] +
                       ["model.embed_dim=128"])
  params = aot_compile.build_for_topology(config.copy_and_resolve_references(),
                                          aot_compile.topology("v5e-8")).abstract_state["params"]
  report = aot_compile.compile_train_step(config, aot_compile.topology("v5e-8"))
  assert report.fits and report.device_kind == "TPU v5 lite"
  assert report.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
  assert report.total_bytes == (report.argument_bytes + report.output_bytes +
                                report.temp_bytes + report.code_bytes)
  # Data parallel: every chip holds all params and both Adam moments (f32), plus its slice
  # of the batch (8 of the 64 images of 32 px and token rows of 16). The rest is padding.
  state_and_batch = 3 * 4 * sum(x.size for x in jax.tree.leaves(params)) + 8 * (
      32 * 32 * 3 * 4 + 16 * 4)
  assert state_and_batch <= report.argument_bytes < 1.1 * state_and_batch
  # The donated state comes back in the same buffers: only the metrics are new outputs.
  assert report.output_bytes < 64 * 1024
  # Two ways to the same FLOPs: XLA's count per chip (no scan in this model, so complete,
  # plus element-wise work) against the traced matmuls split over the 8 chips.
  ratio = report.xla_flops_per_chip / report.matmul_flops_per_chip
  assert 1.0 <= ratio < 1.3, ratio


@pytest.mark.usefixtures("libtpu")
def test_params_fsdp_cannot_split_are_counted_and_a_mesh_that_splits_them_is_named():
  # Width 36 over an 8-chip FSDP axis: every kernel's `embed` dimension stays whole.
  width_36 = [f"model.{tower}.width=36" for tower in ("image", "text")] + ["model.embed_dim=36"]
  v5e_8 = aot_compile.topology("v5e-8")
  setup = aot_compile.build_for_topology(tiny_config("batch=64,rules=fsdp", width_36), v5e_8)
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state["params"]))
  held, replicated = aot_compile.state_bytes_per_chip(setup)
  assert held == replicated   # all of it
  assert 12 * n_params <= held < 12 * n_params + 64   # params and Adam's moments, + counts
  assert aot_compile.fsdp_divisor_tip(setup) is None   # by default only from 256 MiB up
  tip = aot_compile.fsdp_divisor_tip(setup, min_bytes=0)   # a tiny model: any bytes count
  assert tip.startswith("--config.mesh.data=2 --config.mesh.fsdp=-1 (FSDP over 4 chips")

  # Taking the tip: 2-way data parallel x 4-way FSDP splits every kernel 4 ways.
  overrides = [o[len("--config."):] for o in tip.split(" (")[0].split()]
  setup = aot_compile.build_for_topology(
      tiny_config("batch=64,rules=fsdp", width_36 + overrides), v5e_8)
  held_after, replicated_after = aot_compile.state_bytes_per_chip(setup)
  assert dict(setup.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert replicated_after < 0.1 * held_after and held_after < 0.3 * held
  assert aot_compile.fsdp_divisor_tip(setup, min_bytes=0) is None


@pytest.mark.usefixtures("libtpu")
def test_two_slices_split_the_data_axis_across_slices():
  config = tiny_config("batch=64,rules=fsdp")
  report = aot_compile.compile_train_step(config, aot_compile.topology("v5e-4"), slices=2)
  assert report.fits and report.slices == 2
  # data spans the slices, FSDP the 4 chips inside each.
  assert report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.usefixtures("libtpu")
def test_command_line_exits_1_when_the_step_needs_more_than_the_hbm(tmp_path, capsys):
  out = tmp_path / "aot.json"
  argv = ["--config", f"{DEMO}:batch=64", "--topology", "v5e-8", "--hbm_gib", "0.001",
          "--json", str(out)] + TINY
  assert aot_compile.main(argv) == 1
  printed = capsys.readouterr().out
  figures = json.loads(out.read_text())
  assert not figures["fits"] and figures["topology_name"] == "v5e:2x4"
  assert figures["total_gib"] == pytest.approx(figures["total_bytes"] / 2**30)
  assert figures["overrides"][0] == "model.image.width=32"
  assert (f"does not fit: needs {figures['total_gib']:.2f} GiB of 0.001 GiB per chip on "
          "v5e-8; try --config.remat_policy=full (now 'none'; --remat_sweep finds the "
          "cheapest policy that fits)") in printed
  # 64 examples over 8 chips: 2 micro-batches of 32 still split 8 ways.
  assert "--config.grad_accum_steps=2" in printed and "--topology v5e-16" in printed


@pytest.mark.usefixtures("libtpu")
def test_remat_sweep_compiles_each_policy_in_order_until_one_fits(tmp_path, capsys):
  argv = ["--config", f"{DEMO}:batch=64", "--topology", "v5e-8", "--remat_sweep"] + TINY
  # Nothing fits 1 MiB: every policy is compiled, in order, and the verdict says so.
  out = tmp_path / "all.json"
  assert aot_compile.main(argv + ["--hbm_gib", "0.001", "--json", str(out)]) == 1
  printed = capsys.readouterr().out
  assert "does not fit with any remat policy: 0.001 GiB per chip on v5e-8; try " in printed
  assert "remat_policy=full (now" not in printed   # remat is what was just tried
  sweep = json.loads(out.read_text())
  assert [r["remat_policy"] for r in sweep["remat_sweep"]] == list(aot_compile.REMAT_SWEEP)
  assert sweep["cheapest_remat_policy_that_fits"] is None and not sweep["fits"]
  # The recomputed forward passes show in the traced matmul FLOPs.
  flops = [r["matmul_flops"] for r in sweep["remat_sweep"]]
  assert flops[0] == flops[1] < flops[2] < flops[3]   # dots_saveable recomputes no matmul
  # On the chip's own 16 GiB the first policy fits: one compile, and it is the verdict.
  out = tmp_path / "none.json"
  assert aot_compile.main(argv + ["--json", str(out)]) == 0
  assert ("cheapest that fits: --config.remat_policy=none (the least recomputation tried)"
          in capsys.readouterr().out)
  assert [r["remat_policy"] for r in json.loads(out.read_text())["remat_sweep"]] == ["none"]


@pytest.mark.usefixtures("libtpu")
def test_a_step_the_compiler_cannot_place_is_reported_as_not_fitting(capsys):
  # 2048 px images in 8 px patches: 65536 tokens, so each head's attention matrix alone is
  # 65536^2 floats (16 GiB): the TPU compiler itself refuses to place the temporaries.
  argv = ["--config", f"{DEMO}:batch=8,size=2048", "--topology", "v5e-8"] + TINY
  assert aot_compile.main(argv) == 1
  printed = capsys.readouterr().out
  assert "the compiler ran out of memory: RESOURCE_EXHAUSTED" in printed
  needs = re.search(r"does not fit: needs ([\d.]+) GiB of the 15.75 GiB the compiler may use "
                    r"per chip on v5e-8", printed)
  assert needs and float(needs.group(1)) > 2 * 16   # two heads' matrices at least


@pytest.mark.usefixtures("libtpu")
def test_a_batch_the_topology_cannot_split_fails_before_compiling(capsys):
  assert aot_compile.main(["--config", f"{DEMO}:batch=12", "--topology", "v5e-8"] + TINY) == 2
  captured = capsys.readouterr()
  assert "Config error: global_batch_size=12" in captured.err
  assert "not divisible by the 8-way batch sharding" in captured.err
  assert "compiled in" not in captured.out   # it stopped before the compiler ran


# ---------------------------------------------------------------------------------- pods


@pytest.mark.slow
@pytest.mark.usefixtures("libtpu")
@pytest.mark.parametrize("spec", ["siglip_so400m.py", "vlm_3b.py"])
def test_pod_configs_fit_v5p_256(spec):
  config = config_lib.finalize(config_lib.load(os.path.join(EXPERIMENTS, spec)))
  report = aot_compile.compile_train_step(config, aot_compile.topology("v5p-256"))
  assert report.fits, aot_compile.summary(report, config)
  assert report.mesh == {"data": 1, "fsdp": 128, "tensor": 1}
  assert np.isfinite(report.matmul_flops) and report.matmul_flops > 1e15


@pytest.mark.slow
@pytest.mark.usefixtures("libtpu")
def test_remat_sweep_stops_at_the_first_policy_a_smaller_chip_holds(tmp_path, capsys):
  # 256 px of 8 px patches (1024 tokens), 32 examples per chip, 2 blocks of width 128 per
  # tower: activations dominate, so no remat needs the most memory and full remat the least.
  # The two dots policies between them need not be ordered: XLA's schedule decides (with
  # libtpu 0.0.42.1, dots_saveable needs 0.10 GiB here, dots_with_no_batch_dims_saveable 0.11).
  tower = [f"--config.model.{t}.{k}={v}" for t in ("image", "text")
           for k, v in (("width", 128), ("depth", 2), ("mlp_dim", 256), ("num_heads", 2))]
  argv = ["--config", f"{DEMO}:batch=256,size=128", "--topology", "v5e-8", "--remat_sweep",
          "--config.model.embed_dim=128"] + tower
  out = tmp_path / "all.json"
  assert aot_compile.main(argv + ["--hbm_gib", "0.001", "--json", str(out)]) == 1
  reports = json.loads(out.read_text())["remat_sweep"]
  temps = [r["temp_bytes"] for r in reports]
  flops = [r["matmul_flops"] for r in reports]
  assert max(temps) == temps[0] and min(temps) == temps[-1] < 0.6 * temps[0], temps
  assert flops == sorted(flops) and flops[-1] > 1.1 * flops[0], flops
  # A chip just too small for `none`: the sweep stops at the first policy that fits it.
  hbm = (reports[0]["total_bytes"] - 1) / 2**30
  expected = next(r["remat_policy"] for r in reports if r["total_bytes"] <= hbm * 2**30)
  capsys.readouterr()
  out = tmp_path / "fits.json"
  assert aot_compile.main(argv + ["--hbm_gib", str(hbm), "--json", str(out)]) == 0
  assert (f"cheapest that fits: --config.remat_policy={expected} (+"
          in capsys.readouterr().out)
  chosen = json.loads(out.read_text())
  assert chosen["cheapest_remat_policy_that_fits"] == expected == chosen["remat_policy"]
  tried = [r["remat_policy"] for r in chosen["remat_sweep"]]
  assert tried == list(aot_compile.REMAT_SWEEP[:tried.index(expected) + 1])
  # Compiling is deterministic: the policy's figures are those of the first sweep.
  assert chosen["total_bytes"] == reports[tried.index(expected)]["total_bytes"]
