"""UDOP-style document family: the prefix-LM VLM family with layout boxes on OCR tokens.

Batches are the VLM's packed rows plus `decoder_boxes` float32 [B, row_length, 4]
(`vlpjax/data/packing.py`), which document tasks (`data_mixtures/documents.py`) yield.
Everything but the model is the VLM family's: the loss on target tokens, training stages
(`optim.freeze` regexes of `vlm.FREEZE_BY_STAGE`; `layout` trains in every stage that
trains the projector), `token_losses`, `caption` (which sees no layout, i.e. zero boxes)
and starting the LM from a Hugging Face checkpoint.

`config.model.layout_bins` (default 128) sets the resolution of the layout embedding; the
other `config.model` keys are the VLM's.

Model FLOPs (`forward_flops`) are the VLM's too: the layout embedding of the OCR tokens is
four table lookups per token, which are gathers, not matmuls.
"""
from typing import Dict

import jax
import jax.numpy as jnp

from vlpjax.families import FAMILIES
from vlpjax.families import vlm as vlm_family
from vlpjax.models import document as document_lib

BOX_KEY = "decoder_boxes"


@FAMILIES.register("document")
class DocumentFamily(vlm_family.VLMFamily):
  """Packed document rows (tokens, page images, layout boxes) -> next-token logits."""

  batch_keys = vlm_family.VLMFamily.batch_keys + (BOX_KEY,)
  model_class = document_lib.DocumentModel

  def input_specs(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
    specs = super().input_specs(batch_size)
    specs[BOX_KEY] = jax.ShapeDtypeStruct((batch_size, self.config.input.row_length, 4),
                                          jnp.float32)
    return specs
