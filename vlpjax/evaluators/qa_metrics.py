"""Question-answering metrics: exact match, ANLS, VQA accuracy, the most-frequent-answer baseline.

Pure Python and numpy, deterministic. A question has one or more accepted answers (a str is
one answer); every metric scores one prediction against them, and `qa_scores` averages over
questions.

Exact match and ANLS follow DocVQA (Biten et al. 2019, Mathew et al. 2021): ANLS is the
average normalised Levenshtein similarity, max over the accepted answers and cut to 0 below
the threshold; exact match compares after `normalize_answer` (SQuAD-style, without article
removal: documents have no reason to drop "the" from "the total").

VQA accuracy (Antol et al. 2015, VQA v2's evaluation) credits an answer as fully right when
at least 3 of the 10 annotators gave it: min(1, #matches / 3), averaged over the 10 subsets of
9 annotators that leave one out, so that a model is measured the way a held-out human is.
Answers are compared after `normalize_vqa_answer`, the documented VQA processing (see there).
"""
import collections
import itertools
import re
import string
import unicodedata
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

Answers = Union[str, Sequence[str]]

# -- answers ---------------------------------------------------------------------------------


def _check_answers(answers: Answers) -> List[str]:
  """The accepted answers as a non-empty list of str (a str is one answer)."""
  if isinstance(answers, str):
    answers = [answers]
  answers = list(answers)
  if not answers:
    raise ValueError("need at least one accepted answer, got none.")
  for a in answers:
    if not isinstance(a, str):
      raise ValueError(f"an answer must be a str, got {type(a).__name__}: {a!r}.")
  return answers


def _check_prediction(pred: str) -> str:
  if not isinstance(pred, str):
    raise ValueError(f"a prediction must be a str, got {type(pred).__name__}: {pred!r}.")
  return pred


# -- exact match and ANLS (DocVQA) -----------------------------------------------------------

_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(answer: str) -> str:
  """Lower case, punctuation deleted, whitespace collapsed to single spaces and stripped.

  Punctuation is every ASCII `string.punctuation` character and every Unicode punctuation
  character (category P*); it is deleted, not replaced by a space, as in the SQuAD evaluator
  ("12/03/24" -> "120324", "U.S." -> "us"). Articles are kept (documents have no reason to
  drop "the" from "the total").
  """
  if not isinstance(answer, str):
    raise ValueError(f"an answer must be a str, got {type(answer).__name__}: {answer!r}.")
  kept = "".join(c for c in answer.lower()
                 if c not in _ASCII_PUNCTUATION and not unicodedata.category(c).startswith("P"))
  return " ".join(kept.split())


def exact_match(pred: str, answers: Answers) -> float:
  """1.0 if `normalize_answer(pred)` equals that of some accepted answer, else 0.0."""
  pred = normalize_answer(pred)
  return float(any(pred == normalize_answer(a) for a in _check_answers(answers)))


def levenshtein(a: str, b: str) -> int:
  """Edit distance: the fewest insertions, deletions and substitutions of characters."""
  if len(a) < len(b):
    a, b = b, a
  # row[j] = distance(a[:i], b[:j]) for the current i (dynamic programming, one row at a time).
  row = list(range(len(b) + 1))
  for i, x in enumerate(a, start=1):
    diagonal, row[0] = row[0], i
    for j, y in enumerate(b, start=1):
      diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
  return row[-1]


def anls(pred: str, answers: Answers, threshold: float = 0.5) -> float:
  """DocVQA's ANLS of one question: max over answers of the thresholded similarity.

  For prediction p and answer a, both lower-cased with whitespace collapsed and stripped
  (DocVQA's evaluation; punctuation counts), NL = levenshtein(p, a) / max(|p|, |a|) (0 when
  both are empty) and the similarity is 1 - NL when NL < threshold, else 0. The dataset
  score is the mean over questions (`qa_scores`).
  """
  if not 0 <= threshold <= 1:
    raise ValueError(f"threshold must be in [0, 1], got {threshold!r}.")

  def norm(s):
    return " ".join(s.lower().split())

  pred, best = norm(_check_prediction(pred)), 0.0
  for answer in map(norm, _check_answers(answers)):
    length = max(len(pred), len(answer))
    distance = levenshtein(pred, answer) / length if length else 0.0
    if distance < threshold:
      best = max(best, 1.0 - distance)
  return best


# -- VQA accuracy ----------------------------------------------------------------------------

# The marks VQA's processing treats as punctuation: apostrophes ("girl's") and colons ("2:50")
# are kept on purpose, periods have a rule of their own, and # $ % & * ^ ~ | are not in the
# official list (so "$5" stays "$5").
_VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # A period not followed by a digit: not a decimal point.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
                 "ten": "10"}
_ARTICLES = frozenset(["a", "an", "the"])
# English contractions whose apostrophe-less spelling is not itself a word: "well", "hell",
# "shell", "were", "wed", "shed", "ill", "id", "its", "lets" are left alone, since an
# annotator who wrote them most likely meant the word. The official table's "I" forms ("Im",
# "Ive") are capitalised and so never apply to lower-cased answers; none here either.
_CONTRACTIONS = (
    "ain't aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't mightn't "
    "mustn't needn't oughtn't shan't shouldn't wasn't weren't won't wouldn't "
    "could've might've must've should've would've they've we've you've who've what've "
    "where've not've "
    "he'd how'd it'd there'd they'd who'd you'd where'd someone'd something'd "
    "he'd've it'd've she'd've we'd've they'd've who'd've you'd've there'd've someone'd've "
    "somebody'd've something'd've couldn't've hadn't've mightn't've shouldn't've "
    "wouldn't've "
    "he's how's she's that's there's what's when's where's who's why's somebody's "
    "someone's "
    "it'll they'll you'll what'll who'll why'll how'll somebody'll someone'll something'll "
    "they're you're what're why're there're "
    "o'clock ma'am y'all y'all'll y'all'd've 'twas").split()


def _apostrophe_variants(word: str) -> List[str]:
  """`word` with each non-empty subset of its apostrophes dropped ("y'all'll" -> 3 forms)."""
  pieces = word.split("'")
  variants = []
  for keep in itertools.product(("'", ""), repeat=len(pieces) - 1):
    if "".join(keep) != "'" * (len(pieces) - 1):
      variants.append(pieces[0] + "".join(k + p for k, p in zip(keep, pieces[1:])))
  return variants


# "dont" -> "don't", "couldntve" / "couldn'tve" / "couldnt've" -> "couldn't've".
_CONTRACTION_FIXES = {variant: word for word in _CONTRACTIONS
                      for variant in _apostrophe_variants(word)}


def normalize_vqa_answer(answer: str) -> str:
  """An answer as VQA's evaluation compares it (the processing documented on visualqa.org).

  In order: tabs and newlines become spaces; punctuation (`_VQA_PUNCTUATION`) is deleted
  when the answer has that mark next to a space somewhere, or has a comma between two
  digits anywhere ("100,978" -> "100978"), and is replaced by a space otherwise
  ("black/white" -> "black white"); periods are deleted unless a digit follows (a decimal
  point: "3.5" stays, "dog." -> "dog"); then the answer is lower-cased and split into
  words, number words become digits ("Two" -> "2", and "none" -> "0" as in the official
  table), the articles a, an, the are dropped, and a contraction missing its apostrophe
  gets it back ("dont" -> "don't"); the words are joined by single spaces.
  """
  if not isinstance(answer, str):
    raise ValueError(f"an answer must be a str, got {type(answer).__name__}: {answer!r}.")
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for mark in _VQA_PUNCTUATION:
    # Decided on the original text, mark by mark, as the official evaluation does.
    deleted = delete_all or f"{mark} " in text or f" {mark}" in text
    out = out.replace(mark, "" if deleted else " ")
  out = _PERIOD.sub("", out)
  words = []
  for word in out.lower().split():
    word = _NUMBER_WORDS.get(word, word)
    if word not in _ARTICLES:
      words.append(_CONTRACTION_FIXES.get(word, word))
  return " ".join(words)


def vqa_accuracy(prediction: str, answers: Answers) -> float:
  """VQA v2 accuracy of one prediction against the annotators' answers.

  Each of the n answers is left out in turn and the prediction scores min(1, m / 3) against
  the other n - 1, where m is how many of them equal it after `normalize_vqa_answer`; the
  accuracy is the mean over the n subsets. With the usual 10 answers of which k match, that
  is 0, 0.3, 0.6, 0.9 for k = 0..3 and 1 from k = 4 on: (k min(1, (k - 1) / 3) +
  (10 - k) min(1, k / 3)) / 10. With fewer answers the same leave-one-out runs over those
  there are (so the 3-annotator bar is harder to clear); a single answer leaves no one to
  agree with, and then the score is the normalised exact match (1 or 0).

  Unlike the official script, which normalises answers only when the annotators disagree
  (its annotation files are normalised already), every answer and the prediction are always
  normalised here: there "Yes." against ten "yes" scores 0, here 1.
  """
  pred = normalize_vqa_answer(_check_prediction(prediction))
  matches = [normalize_vqa_answer(a) == pred for a in _check_answers(answers)]
  if len(matches) == 1:
    return float(matches[0])
  total = sum(matches)
  # Leaving out a matching answer leaves total - 1 matches, any other leaves total.
  return float(np.mean([min(1.0, (total - left_out) / 3) for left_out in matches]))


# -- over questions --------------------------------------------------------------------------


def qa_scores(preds: Sequence[str], answers: Sequence[Answers],
              threshold: float = 0.5) -> Dict[str, float]:
  """{"exact_match", "anls", "vqa_accuracy"}: means over questions; answers[i] for preds[i]."""
  if len(preds) != len(answers) or not preds:
    raise ValueError(f"need one prediction per question and at least one question, got "
                     f"{len(preds)} predictions for {len(answers)} questions.")
  pairs = list(zip(preds, answers))
  return {"exact_match": float(np.mean([exact_match(p, a) for p, a in pairs])),
          "anls": float(np.mean([anls(p, a, threshold) for p, a in pairs])),
          "vqa_accuracy": float(np.mean([vqa_accuracy(p, a) for p, a in pairs]))}


def most_frequent_answer_baseline(train_answers: Sequence[str],
                                  eval_answers: Sequence[Answers]) -> Tuple[str, float]:
  """(the most frequent normalised training answer, its mean exact match on `eval_answers`).

  The chance level of a QA model that ignores page and question. Answers are counted after
  `normalize_answer`; a tie goes to the alphabetically first.
  """
  counts = collections.Counter(normalize_answer(a) for a in _check_answers(train_answers))
  answer = min(counts, key=lambda a: (-counts[a], a))
  if not eval_answers:
    raise ValueError("eval_answers has no question.")
  return answer, float(np.mean([exact_match(answer, a) for a in eval_answers]))
