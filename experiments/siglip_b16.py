"""SigLIP B/16 at 224 px with 64 text tokens and batch 32k: the real-scale config.

  python -m vlpjax.train --config experiments/siglip_b16.py \\
      --workdir gs://BUCKET/siglip_b16 \\
      --config.input.files.train='gs://BUCKET/image_text/train-*.tfrecord'

Reads image-caption tf.Examples (schema: docs/data.md) from the TFRecord files named in
`input.files`; the records go through the same decode path as the demo's embedded data. Same
model family and trainer as `siglip_shapes.py`: only numbers differ. Arguments:
`batch=N`, `steps=N`, `rules=fsdp|fsdp_tensor|multislice|data_parallel` (layouts of
`sharding.parallelism`), `slices=N` (multislice), `tensor=N` (tensor-parallel size).
"""
import ml_collections

from vlpjax import config as config_lib
from vlpjax import sharding


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, batch=32_768, steps=100_000, rules="fsdp", tensor=1, slices=1,
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
      image=dict(variant="B/16", pool_type="map", posemb="learn"),
      text=dict(variant="B", max_len=64, vocab_size=32_000, pool_type="last"),
      embed_dim=768,
      temperature_init=2.3,   # log(10), SigLIP paper
      bias_init=-10.0,
  )
  c.loss = "sigmoid"
  c.compute_dtype = "bfloat16"
  c.remat_policy = "dots_with_no_batch_dims_saveable"

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
