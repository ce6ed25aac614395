"""SigLIP So400m/14 at 224 px with 64 text tokens and batch 32k: the shape-optimised towers.

  python -m vlpjax.train --config experiments/siglip_so400m.py \\
      --workdir gs://BUCKET/siglip_so400m \\
      --config.input.files.train='gs://BUCKET/image_text/train-*.tfrecord'
  python -m tools.aot_compile --config experiments/siglip_so400m.py --topology v5p-256

Both towers have the So400m shape of "Getting ViT in Shape" (width 1152, depth 27, MLP 4304,
16 heads): the image tower on 14 px patches (256 of them at 224 px), the text tower on 64
tokens of a 32k vocabulary, about 0.9B params together. Same family, data and trainer as
`siglip_b16.py`; only the numbers differ.

Memory (`python -m tools.aot_compile`, table in docs/scaling.md): the batch is split over
every chip (FSDP) and each block rematerialised keeping its matmul outputs
(`dots_with_no_batch_dims_saveable`): 256 examples per chip on v5p-256 take 51 of 95 GiB.
Chips with 16-32 GiB need `remat=full` (v4-128: 19 GiB). On 256-chip slices the width 1152
does not divide by a 256-way FSDP axis, so every param would stay whole on every chip (9.8
GiB of params and Adam state): add `--config.mesh.data=2` (FSDP over 128 chips); with it
v6e-256 fits at the default remat policy (27 of 32 GiB) and v5e-256 with `remat=full` (5 GiB).

Arguments: `batch=N`, `steps=N`, `remat=POLICY` (`vlpjax.models.layers.remat_block`),
`rules=fsdp|fsdp_tensor|multislice|data_parallel` (layouts of `sharding.parallelism`),
`slices=N` (multislice), `tensor=N`.
"""
import ml_collections

from vlpjax import config as config_lib
from vlpjax import sharding


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=32_768, steps=100_000, rules="fsdp", tensor=1, slices=1,
                             remat="dots_with_no_batch_dims_saveable",
                             files="gs://YOUR_BUCKET/image_text/train-*.tfrecord")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.global_batch_size = arg.batch

  c.input = dict(
      task="image_text_tfrecord", split="train", files={"train": arg.files},
      pp="random_resized_crop(224, scale=(0.9, 1.0))|value_range(-1, 1)",
      image_size=224, text_length=64, shuffle_buffer=250_000)

  c.family = "two_tower"
  c.model_name = "two_tower"
  c.model = dict(
      image=dict(variant="So400m/14", pool_type="map", posemb="learn"),
      # The text variant reads the ViT table: So400m's width, depth, MLP and heads.
      text=dict(variant="So400m", max_len=64, vocab_size=32_000, pool_type="last"),
      embed_dim=1152,
      temperature_init=2.3,   # log(10), SigLIP paper
      bias_init=-10.0,
  )
  c.loss = "sigmoid"
  c.compute_dtype = "bfloat16"
  c.remat_policy = arg.remat

  c.optim = dict(lr=1e-3, b2=0.95, weight_decay=1e-4, grad_clip_norm=1.0)
  c.schedule = dict(type="rsqrt", warmup_steps=5_000, timescale=10_000)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules, tensor=arg.tensor,
                                                   slices=arg.slices)

  # Zero-shot and retrieval evals go here, pointing at your own held-out tasks, e.g.
  # c.evals.retrieval = dict(type="retrieval", task=..., split="validation", every_steps=...)
  c.evals = {}
  c.log_every_steps = 50
  c.checkpoint = dict(every_steps=2_000, max_to_keep=3, async_save=True)
  return c
