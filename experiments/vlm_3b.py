"""PaliGemma-sized prefix-LM VLM: ViT So400m/14 at 224 px + a Gemma-2B-shaped decoder.

  python -m vlpjax.train --workdir gs://BUCKET/vlm_3b_stage1 --config \\
      experiments/vlm_3b.py:stage=projector,llm_hf_path=/ckpt/gemma-2b,\\
spm=/ckpt/gemma-2b/tokenizer.model,caption_files=gs://BUCKET/captions/train-*.tfrecord,...
  python -m vlpjax.train --config experiments/vlm_3b.py:stage=full,... --workdir ...

Model: So400m/14 at 224 px gives 256 image tokens, linearly projected (PaliGemma) into a
decoder of Gemma-2B's shape (width 2048, 18 layers, MLP 16384 with tanh-gelu gating, 8 query
heads sharing 1 key/value head of dim 256, RMSNorm offset 1, sqrt(width) embedding scale,
tied embeddings): about 2.9B params. `llm_hf_path` (a Hugging Face Gemma-2B directory) starts
the decoder from those weights (`VLMFamily.pretrained`).

Vocabulary: the tasks' `vocab.multimodal_vocabulary(spm)`, the SentencePiece model `spm`
extended with 701 structure tokens (<image>, time, location, sentinels). `vocab_size` is
257152, PaliGemma's table size: room for Gemma's 256000 pieces plus those 701 (pass
spm=.../gemma/tokenizer.model for real runs; the default, the shipped 512-piece demo model,
only keeps the config loadable offline). Rows past a pretrained LM's 256000 start at the mean
of its embeddings.

Data: a mixture (rates in `MIXTURE`) of three TFRecord tasks, registered here because their
files are arguments (every host loads this config, so every host registers them):
  caption_files      image-caption tf.Examples (docs/data.md) -> `vlm_3b_captions`
  interleaved_files  interleaved documents (data_interleaved.md) -> `vlm_3b_interleaved`
  text_files         the same interleaved layout read as text only -> `vlm_3b_text`
Packed rows of 1024 tokens hold up to 3 images (768 image tokens) or several short examples.

Stages (`stage`, `optim.freeze` from `vlpjax.families.vlm.FREEZE_BY_STAGE`, learning rates as
LLaVA-1.5 uses them): projector (ViT and LM frozen, lr 1e-3), full (everything, 2e-5), lora
(`lora_rank` adapters on the LM + the projector, 2e-4). Arguments: batch, steps, rules
(fsdp|fsdp_tensor|multislice|data_parallel: layouts of `sharding.parallelism`), slices
(multislice), tensor, stage, lora_rank, llm_hf_path, spm, caption_files, interleaved_files,
text_files, caption_prompt.

Memory (`python -m tools.aot_compile`, docs/scaling.md): the default 512 rows per step fit
v5p-256 (22 of 95 GiB per chip), v5e-256 and v6e-256 (14 GiB); v4-128 (8 rows per chip)
needs `--config.remat_policy=full`. On 256 chips the So400m tower's width 1152 does not
divide by a 256-way FSDP axis, so its params stay replicated; `--config.mesh.data=2` shards
them 128 ways.
"""
import ml_collections

from data_mixtures import interleaved as interleaved_tasks
from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax.data import tasks
from vlpjax.data import vocab
from vlpjax.data.kinds import image_caption
from vlpjax.families import vlm as vlm_family

IMAGE_SIZE = 224
MIXTURE = "vlm_3b_mixture"
# Captions teach grounding, interleaved documents in-context reading, text keeps the LM (VILA).
RATES = {"vlm_3b_captions": 0.5, "vlm_3b_interleaved": 0.35, "vlm_3b_text": 0.15}
LR_BY_STAGE = {"projector": 1e-3, "full": 2e-5, "lora": 2e-4}


def register_tasks(arg) -> str:
  """The three tasks over the argument's files and their mixture; returns the mixture name."""
  vocabulary = vocab.multimodal_vocabulary(arg.spm) if arg.spm else None
  image_caption.register_tfrecord_task(
      "vlm_3b_captions", {"train": arg.caption_files}, image_size=IMAGE_SIZE,
      prompt=arg.caption_prompt, max_tokens=128, vocabulary=vocabulary)
  interleaved_tasks.register_interleaved_tfrecord_task(
      "vlm_3b_interleaved", {"train": arg.interleaved_files}, image_size=IMAGE_SIZE,
      max_images=3, max_tokens=1024, vocabulary=vocabulary)
  interleaved_tasks.register_interleaved_tfrecord_task(
      "vlm_3b_text", {"train": arg.text_files}, image_size=IMAGE_SIZE, max_tokens=1024,
      text_only=True, vocabulary=vocabulary)
  tasks.add_mixture(MIXTURE, list(RATES.items()))
  return MIXTURE


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, batch=512, steps=50_000, rules="fsdp", tensor=1, slices=1, stage="full", lora_rank=0,
      llm_hf_path="", spm="", caption_prompt="",
      caption_files="gs://YOUR_BUCKET/captions/train-*.tfrecord",
      interleaved_files="gs://YOUR_BUCKET/interleaved/train-*.tfrecord",
      text_files="gs://YOUR_BUCKET/text/train-*.tfrecord")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.global_batch_size = arg.batch   # packed rows of 1024 tokens

  c.input = dict(
      task=register_tasks(arg), split="train",
      pp='value_range(-1, 1, key="images")',   # the tasks decode and resize to 224 px
      image_size=IMAGE_SIZE, shuffle_buffer=50_000,
      row_length=1024, max_images_per_row=3, tokens_per_image=0)

  c.family = "vlm"
  c.model_name = "vlm"
  c.model = dict(
      image=dict(variant="So400m/14", posemb="learn"),
      llm=dict(vocab_size=257_152, width=2048, depth=18, mlp_dim=16_384, num_heads=8,
               num_kv_heads=1, head_dim=256, activation="gelu_tanh", norm_offset=1.0,
               norm_eps=1e-6, rope_theta=10_000., embed_scale=True, tie_embeddings=True,
               lora_rank=arg.lora_rank),
      projector="linear",
      scan_layers=True,
  )
  c.compute_dtype = "bfloat16"
  c.remat_policy = "dots_with_no_batch_dims_saveable"
  c.pretrained = dict(llm_hf_path=arg.llm_hf_path)

  freeze = vlm_family.freeze_regex(arg.stage, arg.lora_rank)  # checks the stage name
  c.optim = dict(lr=LR_BY_STAGE[arg.stage], b2=0.95, weight_decay=0.0, grad_clip_norm=1.0,
                 freeze=freeze)
  c.schedule = dict(type="cosine", warmup_steps=1_000)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules, tensor=arg.tensor,
                                                   slices=arg.slices)

  # Held-out evals go here, pointing at your own tasks, e.g.
  # c.evals.captioning = dict(type="captioning", task=..., split="validation",
  #                           pp="resize(224)|value_range(-1, 1)", batch_size=512,
  #                           decode=dict(method="greedy", max_decode_len=32), every_steps=...)
  # c.evals.interleaved_loss = dict(type="prefix_lm_loss", task=..., split="validation",
  #                                 pp='value_range(-1, 1, key="images")', batch_size=512)
  c.evals = {}
  c.log_every_steps = 50
  c.checkpoint = dict(every_steps=1_000, max_to_keep=3, async_save=True)
  return c
