"""CoCa with a ViT-B/16 at 224 px, a B-size text decoder and batch 32k: the real-scale config.

  python -m vlpjax.train --config experiments/coca_b16.py \\
      --workdir gs://BUCKET/coca_b16 \\
      --config.input.files.train='gs://BUCKET/image_text/train-*.tfrecord'

Reads image-caption tf.Examples (schema: docs/data.md) from the TFRecord files named in
`input.files`, as `siglip_b16.py` does. The text side is CoCa-Base's: 6 unimodal + 6
multimodal decoder layers of width 768; the captioning decoder cross-attends to 256 pooled
image queries; softmax contrastive loss + 2 x captioning loss (the paper's weights).
Same family and trainer as `coca_shapes.py`: only numbers differ. Arguments: `batch=N`,
`steps=N`, `rules=fsdp|fsdp_tensor|multislice|data_parallel` (layouts of
`sharding.parallelism`), `slices=N` (multislice), `tensor=N` (tensor-parallel size),
`files=GLOB`.
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

  text_length = 64
  c.input = dict(
      task="image_text_tfrecord", split="train", files={"train": arg.files},
      pp="random_resized_crop(224, scale=(0.9, 1.0))|value_range(-1, 1)",
      image_size=224, text_length=text_length, shuffle_buffer=250_000)

  c.family = "coca"
  c.model_name = "coca"
  c.model = dict(
      image=dict(variant="B/16", posemb="learn"),
      text=dict(vocab_size=32_000, width=768, unimodal_depth=6, multimodal_depth=6,
                mlp_dim=3072, num_heads=12, max_len=text_length),
      embed_dim=768,
      num_caption_queries=256,
      temperature_init=2.66,   # log(1 / 0.07), CLIP / CoCa
      bias_init=None,
  )
  c.loss = "softmax"
  c.loss_weights = dict(contrastive=1.0, caption=2.0)
  c.compute_dtype = "bfloat16"
  c.remat_policy = "dots_with_no_batch_dims_saveable"

  c.optim = dict(lr=8e-4, b2=0.95, weight_decay=0.01, grad_clip_norm=1.0)
  c.schedule = dict(type="rsqrt", warmup_steps=5_000, timescale=10_000)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules, tensor=arg.tensor,
                                                   slices=arg.slices)

  # Captioning, zero-shot and retrieval evals go here, pointing at your own held-out tasks:
  # c.evals.captioning = dict(type="captioning", task=..., split="validation",
  #                           decode=dict(method="beam", beam_size=4, max_decode_len=32),
  #                           every_steps=...)
  c.evals = {}
  c.log_every_steps = 50
  c.checkpoint = dict(every_steps=2_000, max_to_keep=3, async_save=True)
  return c
