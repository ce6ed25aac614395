"""Vocabularies: the shipped SentencePiece model, and its multimodal extension.

`default_vocabulary()` is the small model trained on the embedded shapes
captions by `tools/train_spm.py`; real runs point their tasks at their own
SentencePiece model instead.

`multimodal_vocabulary()` extends any base model with the structure tokens of
`special_tokens` (image placeholders, `<time_k>`, `<loc_k>`, `<extra_id_k>`).
They are appended to the model proto as USER_DEFINED pieces, which
SentencePiece matches atomically before its own segmentation, in the Python
processor and in the TF op seqio uses alike. So the result is a plain
`seqio.SentencePieceVocabulary` over a real model file: tasks encode
"<time_3><time_9>a dog runs" from text, and `decode` gives the tokens back.
Base pieces keep their ids (pad 0, eos 1, unk 2 included); the new tokens
follow in `TokenSpec.tokens()` order.

seqio loads vocabularies from a path only, so the extended model is written to
`$VLPJAX_CACHE_DIR/vocab/` (default `~/.cache/vlpjax/vocab/`), named by a hash
of its own bytes; the same base model and spec always give the same file.
"""
import functools
import hashlib
import os
import tempfile
from typing import Optional

import seqio
from sentencepiece import sentencepiece_model_pb2
import tensorflow as tf

from vlpjax.data import special_tokens
from vlpjax.data.special_tokens import SpecialIds, TokenSpec

DEFAULT_SPM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "assets", "shapes_spm.model")


@functools.lru_cache(maxsize=None)
def default_vocabulary() -> seqio.SentencePieceVocabulary:
  """The shipped vocabulary (pad 0, eos 1, unk 2, no bos, byte fallback)."""
  # One instance per process: seqio loads the model lazily and keeps it.
  return seqio.SentencePieceVocabulary(DEFAULT_SPM_PATH)


# --------------------------------------------------------------------------------
# The extended model file
# --------------------------------------------------------------------------------

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece


def cache_dir() -> str:
  """Where extended models are written: $VLPJAX_CACHE_DIR/vocab or ~/.cache/vlpjax/vocab."""
  root = os.environ.get("VLPJAX_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlpjax")
  return os.path.join(root, "vocab")


def extend_model_proto(base_model: bytes, spec: TokenSpec) -> bytes:
  """The serialized base model with `spec`'s tokens appended as USER_DEFINED pieces."""
  proto = sentencepiece_model_pb2.ModelProto.FromString(base_model)
  existing = {p.piece for p in proto.pieces}
  tokens = spec.tokens()
  clash = [t for t in tokens if t in existing]
  if clash:
    # SentencePiece would refuse to load the model, with a less helpful message.
    raise ValueError(f"the base model already has the pieces {clash[:5]} "
                     f"({len(clash)} in all); pass a spec without them")
  for token in tokens:
    # Score is unused: user-defined pieces are matched before segmentation.
    proto.pieces.add(piece=token, score=0.0, type=_Piece.USER_DEFINED)
  proto.trainer_spec.vocab_size = len(proto.pieces)
  return proto.SerializeToString(deterministic=True)


def _read(path: str) -> Optional[bytes]:
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except (OSError, tf.errors.NotFoundError):
    return None


def _write_atomically(path: str, data: bytes):
  """Temp file + rename: readers in other processes never see a partial file."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".model")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def extended_model_file(base_path: str = DEFAULT_SPM_PATH,
                        spec: TokenSpec = TokenSpec(),
                        directory: Optional[str] = None) -> str:
  """Path of the extended model for `base_path` + `spec`, written if missing.

  The name carries a hash of the extended bytes, so different bases or specs
  never share a file, and an existing file is reused only if its bytes are
  exactly right (a stale or damaged one is rewritten). Concurrent writers
  write identical bytes, and each rename is atomic.
  """
  base = _read(base_path)
  if base is None:
    raise FileNotFoundError(f"SentencePiece model {base_path!r} not found")
  data = extend_model_proto(base, spec)
  stem = os.path.splitext(os.path.basename(base_path))[0]
  name = (f"{stem}-i{spec.num_image_tokens}-t{spec.num_time_bins}-l{spec.num_loc_bins}"
          f"-s{spec.num_sentinels}-{hashlib.sha256(data).hexdigest()[:16]}.model")
  path = os.path.join(directory or cache_dir(), name)
  if _read(path) != data:
    _write_atomically(path, data)
  return path


# --------------------------------------------------------------------------------
# The vocabulary
# --------------------------------------------------------------------------------


class MultimodalVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary extended with structure tokens.

  A real `seqio.SentencePieceVocabulary` (usable as any seqio feature's
  vocabulary, in Python and TF graphs) plus `spec` and `special_ids`, the id
  layout of the extra tokens.
  """

  def __init__(self, base_path: str = DEFAULT_SPM_PATH, spec: TokenSpec = TokenSpec(),
               directory: Optional[str] = None):
    self._base_path = base_path
    self._spec = spec
    self._directory = directory
    path = extended_model_file(base_path, spec, directory)
    base = sentencepiece_model_pb2.ModelProto.FromString(_read(base_path))
    self._special_ids = SpecialIds(len(base.pieces), spec)
    super().__init__(path)

  def __setstate__(self, state):
    super().__setstate__(state)
    # A copy restored elsewhere (another host, a cleared cache) rebuilds its file.
    extended_model_file(self._base_path, self._spec, self._directory)

  @property
  def spec(self) -> TokenSpec:
    return self._spec

  @property
  def base_path(self) -> str:
    return self._base_path

  @property
  def special_ids(self) -> SpecialIds:
    return self._special_ids

  def parse(self, text: str, **kwargs):
    """`special_tokens.parse_special(text, self.spec, **kwargs)`."""
    return special_tokens.parse_special(text, self._spec, **kwargs)


@functools.lru_cache(maxsize=None)
def multimodal_vocabulary(base_path: str = DEFAULT_SPM_PATH, num_time_bins: int = 100,
                          num_loc_bins: int = 500, num_image_tokens: int = 1,
                          num_sentinels: int = 100) -> MultimodalVocabulary:
  """The base model extended with structure tokens; one instance per arguments."""
  spec = TokenSpec(num_image_tokens=num_image_tokens, num_time_bins=num_time_bins,
                   num_loc_bins=num_loc_bins, num_sentinels=num_sentinels)
  return MultimodalVocabulary(base_path, spec)
