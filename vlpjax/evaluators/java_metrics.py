"""METEOR and SPICE: pycocoevalcap's own Java scorers, where Java is installed.

Why Java: METEOR 1.5 (Denkowski & Lavie 2014) aligns words through exact forms, stems,
WordNet synonyms and a paraphrase table that ship inside its jar, and SPICE (Anderson et al.
2016) compares scene graphs parsed by Stanford CoreNLP. Neither can be rewritten in Python
and still give the numbers papers report, so these functions run pycocoevalcap's scorers
(METEOR is dense video captioning's headline metric, and a COCO captioning column) and
feed them what COCO's pipeline feeds them: every caption tokenized by
`caption_metrics.tokenize` (the Python stand-in for COCO's PTB step) and joined with spaces.

Inputs are those of `caption_metrics`: `candidates` {id: caption} and `references`
{id: [caption, ...]} with the same ids, checked the same way.

Corpus scores. METEOR's is not the mean of its per-id scores: the jar adds up the match
statistics (matches, lengths, chunks) of all ids and scores the sums once, which is what
COCO reports; the per-id scores come with it. SPICE's is the mean of the per-id F-scores.

Availability. Both need `java` on PATH and pycocoevalcap (the `test` extra installs it);
`java_available()` says whether METEOR can run. SPICE also needs the Stanford CoreNLP 3.6.0
jars in pycocoevalcap's `spice/lib/` (`spice_jars()`), which pycocoevalcap would download from
nlp.stanford.edu on first use; nothing here downloads at run time, so SPICE runs only where
a user has put those jars there (`spice_available()`). Without them the functions raise a
RuntimeError that says what is missing. A METEOR call starts one Java process (a few seconds,
most of it loading the paraphrase table) and closes it before returning.
"""
import contextlib
import importlib.util
import os
import shutil
from typing import Dict, Hashable, Iterator, List, Sequence, Tuple

from vlpjax.evaluators import caption_metrics

Candidates = caption_metrics.Candidates
References = caption_metrics.References
Scores = Tuple[float, Dict[Hashable, float]]

JAVA_METRICS_CHOICES = ("auto", True, False)
_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


# -- availability ----------------------------------------------------------------------------

def _pycocoevalcap_dir() -> str:
  """pycocoevalcap's directory, or "" when it is not installed."""
  spec = importlib.util.find_spec("pycocoevalcap")
  locations = list(spec.submodule_search_locations or []) if spec else []
  return locations[0] if locations else ""


def missing_for_meteor() -> List[str]:
  """What METEOR lacks here, in words (empty when it can run)."""
  missing = []
  if shutil.which("java") is None:
    missing.append("Java (no `java` on PATH; install a JRE, e.g. apt-get install "
                   "default-jre-headless)")
  if not _pycocoevalcap_dir():
    missing.append("pycocoevalcap (pip install pycocoevalcap, or the vlpjax[test] extra)")
  return missing


def spice_jars() -> List[str]:
  """Where SPICE looks for the Stanford CoreNLP jars (inside pycocoevalcap's spice/lib)."""
  lib = os.path.join(_pycocoevalcap_dir() or "<pycocoevalcap>", "spice", "lib")
  return [os.path.join(lib, jar) for jar in _CORENLP_JARS]


def missing_for_spice() -> List[str]:
  """What SPICE lacks here, in words (empty when it can run)."""
  missing = missing_for_meteor()
  absent = [jar for jar in spice_jars() if not os.path.exists(jar)]
  if absent:
    missing.append(f"the Stanford CoreNLP 3.6.0 jars {absent} (from nlp.stanford.edu's "
                   "stanford-corenlp-full-2015-12-09.zip; they are never downloaded at run "
                   "time)")
  return missing


def java_available() -> bool:
  """Whether METEOR can run: `java` on PATH and pycocoevalcap installed."""
  return not missing_for_meteor()


def spice_available() -> bool:
  """Whether SPICE can run: as METEOR, plus the CoreNLP jars a user put in place."""
  return not missing_for_spice()


def _require(metric: str, missing: List[str]) -> None:
  if missing:
    raise RuntimeError(f"{metric} cannot run here, it lacks {'; '.join(missing)}.")


def require_meteor() -> None:
  """Raises RuntimeError naming what is missing unless METEOR can run."""
  _require("METEOR", missing_for_meteor())


def resolve_java_metrics(value, where: str) -> bool:
  """Whether an evaluator computes METEOR, from its `java_metrics` config value.

  "auto": where Java is available; True: always, with a ValueError now (at construction,
  not after an hour of generation) naming what is missing when it cannot run; False: never.
  "true" / "false" (any case) are read as the bools: a command-line override of a field
  whose default is "auto" stays a str.
  """
  if isinstance(value, str):
    value = {"true": True, "false": False}.get(value.lower(), value)
  if isinstance(value, str) and value == "auto":
    return java_available()
  if value is True:
    missing = missing_for_meteor()
    if missing:
      raise ValueError(f"{where}=True, but METEOR cannot run here: {'; '.join(missing)}. "
                       "Use 'auto' to score METEOR only where it can run.")
    return True
  if value is False:
    return False
  raise ValueError(f"{where} must be one of {JAVA_METRICS_CHOICES}, got {value!r}.")


# -- METEOR ----------------------------------------------------------------------------------

def _scorer_text(caption: str) -> str:
  """A caption as COCO's scorers get it: PTB-style tokens joined by single spaces.

  "|||" separates fields in METEOR's line protocol, so it is removed (pycocoevalcap removes
  it from candidates only; a reference holding it would derail the protocol).
  """
  tokens = (token.replace("|||", "") for token in caption_metrics.tokenize(caption))
  return " ".join(token for token in tokens if token)


def _checked(corpus: Tuple[Candidates, References]):
  """(ids, {index: [reference texts]}, {index: [candidate text]}) for pycocoevalcap."""
  candidates, references = corpus
  ids = caption_metrics.check_ids(candidates, references)
  gts = {i: [_scorer_text(r) for r in references[k]] for i, k in enumerate(ids)}
  res = {i: [_scorer_text(candidates[k])] for i, k in enumerate(ids)}
  return ids, gts, res


@contextlib.contextmanager
def _meteor_scorer() -> Iterator:
  """pycocoevalcap's Meteor (one Java process), closed on the way out, error or not."""
  require_meteor()
  from pycocoevalcap.meteor import meteor as meteor_lib  # pylint: disable=g-import-not-at-top
  scorer = meteor_lib.Meteor()
  try:
    yield scorer
  finally:
    # pycocoevalcap ends its process only in __del__, whenever the garbage collector gets
    # there; end it now so no java process outlives the call. A failure half way through a
    # score leaves the scorer's lock held, and __del__ would then block on it for ever.
    if scorer.lock.locked():
      scorer.lock.release()
    process = scorer.meteor_p
    with contextlib.suppress(BrokenPipeError):  # Java may be gone already.
      process.stdin.close()
    process.kill()
    process.wait()
    process.stdout.close()
    process.stderr.close()


def meteor_corpora(corpora: Sequence[Tuple[Candidates, References]]) -> List[Scores]:
  """`meteor` of each (candidates, references) corpus, all through one Java process.

  For callers with many small corpora (dense captioning scores each video on its own):
  starting Java once per corpus would take seconds each. Every corpus is checked before
  Java starts.
  """
  prepared = [_checked(corpus) for corpus in corpora]
  if not prepared:
    return []
  results = []
  with _meteor_scorer() as scorer:
    for ids, gts, res in prepared:
      corpus_score, scores = scorer.compute_score(gts, res)
      results.append((float(corpus_score), {k: float(s) for k, s in zip(ids, scores)}))
  return results


def meteor(candidates: Candidates, references: References) -> Scores:
  """-> (corpus METEOR, {id: METEOR}) by pycocoevalcap's METEOR 1.5 (module docstring)."""
  return meteor_corpora([(candidates, references)])[0]


# -- SPICE -----------------------------------------------------------------------------------

def spice(candidates: Candidates, references: References) -> Scores:
  """-> (mean SPICE F-score, {id: SPICE F-score}) by pycocoevalcap's SPICE 1.0.

  Raises RuntimeError unless `spice_available()` (Java, pycocoevalcap, and the Stanford
  CoreNLP jars put in `spice_jars()` by hand: nothing is downloaded here). SPICE caches its
  parses in pycocoevalcap's spice/cache and asks Java for an 8 GB heap.
  """
  ids, gts, res = _checked((candidates, references))
  _require("SPICE", missing_for_spice())
  from pycocoevalcap.spice import spice as spice_lib  # pylint: disable=g-import-not-at-top
  corpus_score, per_id = spice_lib.Spice().compute_score(gts, res)
  # Its per-id list follows sorted(ids): the indices 0..n-1 in order.
  return float(corpus_score), {k: float(s["All"]["f"]) for k, s in zip(ids, per_id)}
