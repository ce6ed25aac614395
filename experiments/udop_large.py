"""UDOP-Large-sized document model: ViT-L/16 page encoder + layout-aware 24-layer LM.

  python -m vlpjax.train --workdir gs://BUCKET/udop_large --config experiments/udop_large.py:\\
spm=/ckpt/t5/spiece.model,files=gs://BUCKET/docs/train-*.tfrecord,qa_files=gs://BUCKET/docvqa/train-*.tfrecord

Model: the 224 px page through ViT-L/16 (196 tokens), linearly projected into a decoder of
width 1024, 24 layers, 16 heads (T5-Large's size, as UDOP-Large); every OCR token's embedding
gets the embedding of its word's box, 500 bins per coordinate (UDOP's layout resolution, the
same as the `<loc_k>` tokens). About 0.66B params.

Data (registered here from file arguments, every host): document TFRecords (layout in
`vlpjax.data.kinds.document`) under UDOP's three self-supervised objectives -- joint
text-layout reconstruction, layout modeling, visual text recognition -- and, from `qa_files`,
document QA, mixed 1 : 1 : 1 : 1. Rows of 1024 tokens: one page, 196 image tokens and up to
~800 tokens of prompt, OCR text and targets.
"""
import ml_collections

from data_mixtures import documents as document_tasks
from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax.data import tasks
from vlpjax.data import vocab
from vlpjax.data.kinds import document_objectives

IMAGE_SIZE = 224
MIXTURE = "udop_large_mixture"


def register_tasks(arg) -> str:
  """One task per objective over the argument's files and their mixture; returns its name."""
  vocabulary = vocab.multimodal_vocabulary(arg.spm) if arg.spm else None
  names = []
  for objective in document_objectives.UDOP_OBJECTIVES:
    names.append(f"udop_large_{objective}")
    document_tasks.register_document_tfrecord_task(
        names[-1], {"train": arg.files}, objective=objective, image_size=IMAGE_SIZE,
        vocabulary=vocabulary)
  names.append("udop_large_qa")
  document_tasks.register_document_tfrecord_task(
      names[-1], {"train": arg.qa_files}, objective=document_objectives.QA,
      image_size=IMAGE_SIZE, vocabulary=vocabulary)
  tasks.add_mixture(MIXTURE, [(n, 1.0) for n in names])
  return MIXTURE


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, batch=512, steps=100_000, rules="fsdp", tensor=1, slices=1, spm="",
      files="gs://YOUR_BUCKET/docs/train-*.tfrecord",
      qa_files="gs://YOUR_BUCKET/docvqa/train-*.tfrecord")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.global_batch_size = arg.batch   # packed rows of 1024 tokens

  c.input = dict(
      task=register_tasks(arg), split="train",
      pp='value_range(-1, 1, key="images")',   # the tasks decode and resize to 224 px
      image_size=IMAGE_SIZE, shuffle_buffer=20_000,
      row_length=1024, max_images_per_row=1, tokens_per_image=0)

  c.family = "document"
  c.model_name = "document"
  c.model = dict(
      image=dict(variant="L/16", posemb="learn"),
      llm=dict(vocab_size=33_536,  # a 32k T5-style SentencePiece model + 701 structure ids
               width=1024, depth=24, mlp_dim=2816, num_heads=16, tie_embeddings=False),
      projector="linear",
      layout_bins=500,
      scan_layers=True,
  )
  c.compute_dtype = "bfloat16"
  c.remat_policy = "dots_with_no_batch_dims_saveable"

  c.optim = dict(lr=5e-5, b2=0.98, weight_decay=1e-2, grad_clip_norm=1.0)
  c.schedule = dict(type="cosine", warmup_steps=1_000)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules, tensor=arg.tensor,
                                                   slices=arg.slices)

  # Held-out evals on your own validation tasks, e.g.
  # c.evals.layout = dict(type="document_layout", task=..., split="validation", ...)
  # c.evals.qa = dict(type="document_qa", task=..., split="validation", ...)
  c.evals = {}
  c.log_every_steps = 100
  c.checkpoint = dict(every_steps=2_000, max_to_keep=3, async_save=True)
  return c
