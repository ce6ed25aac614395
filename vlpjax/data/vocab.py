"""The default text vocabulary: the small SentencePiece model shipped with vlpjax.

It is trained on the embedded shapes captions by `tools/train_spm.py`; real runs
point their tasks at their own SentencePiece model instead.
"""
import functools
import os

import seqio

DEFAULT_SPM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "assets", "shapes_spm.model")


@functools.lru_cache(maxsize=None)
def default_vocabulary() -> seqio.SentencePieceVocabulary:
  """The shipped vocabulary (pad 0, eos 1, unk 2, no bos, byte fallback)."""
  # One instance per process: seqio loads the model lazily and keeps it.
  return seqio.SentencePieceVocabulary(DEFAULT_SPM_PATH)
