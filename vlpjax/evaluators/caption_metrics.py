"""COCO captioning metrics (CIDEr-D, BLEU, ROUGE-L), written to agree with the COCO toolkit.

Why n-gram metrics: a caption has many right answers, so captioning papers (Show and Tell,
BLIP, CoCa, PaLI, ...) report agreement with several human references as scored by the
`coco-caption` toolkit (pycocoevalcap). CIDEr-D is the headline number: it weights n-grams
by how specific they are to an image, so "a man riding a wave" earns more than "a picture of".
Numbers are only comparable across papers when computed exactly as that toolkit does, so
every quirk below is reproduced on purpose (tests check agreement to 1e-6).

Inputs everywhere: `candidates` {id: caption} and `references` {id: [caption, ...]} with the
same ids. Captions are raw strings; each is run through `tokenize` first.

Tokenization. COCO runs Stanford's Java PTBTokenizer (lower-cased) and drops punctuation
tokens. `tokenize` is a small Python stand-in that gives the same tokens on plain text: words,
numbers ("1,000", "3.5", "10:30"), hyphenated words, sentence punctuation (. , ; : ! ? ...
-- - and quotes are dropped), possessives and contractions ("man's" -> man 's, "can't" -> ca
n't), abbreviations ("u.s.", "mr."), `$ # %` split off, and brackets turned into PTB's
"-lrb-"-style tokens (COCO keeps those: its punctuation list is upper case). Exotic input
(emoticons, "'tis", "?!") can differ; generated captions never get there.

CIDEr-D (Vedantam et al. 2015), per id with candidate c and references S_1..S_m:
  g_k(s)[w] = tf(w in s) * log(M / max(1, df(w)))  for each n-gram w of order k = 1..4,
where M is the number of ids evaluated and df(w) the number of ids whose references contain
w (so the idf comes from the evaluated set's own references, as in COCO), then
  CIDEr-D = 10 / m * sum_j mean_k [ sum_w min(g_k(c)[w], g_k(S_j)[w]) * g_k(S_j)[w]
                                    / (|g_k(c)| |g_k(S_j)|) ] * exp(-(l_c - l_j)^2 / (2 sigma^2))
with sigma = 6: the clipped (the `min`) cosine similarity of tf-idf vectors, times a gaussian
penalty on the difference of the word counts l, and the corpus score is the mean over ids.
(COCO's code counts bigrams for l: the same differences except when a caption is empty, where
the cosine is 0 anyway.) A single id scores 0: every idf is log(1/1) = 0.

BLEU (Papineni et al. 2002) as COCO's Bleu scorer: a corpus score, not a mean of per-id
scores. Clipped n-gram matches (each candidate n-gram counts at most as often as in its most
generous reference) and candidate n-gram counts are summed over all ids; BLEU-N is the
geometric mean of the precisions for orders 1..N times the brevity penalty exp(1 - r / c) when
the total candidate length c is below r, the sum over ids of the reference length closest to
the candidate's (ties to the shorter). Each precision is (matches + 1e-15) / (count + 1e-9),
COCO's guard against 0/0, so an order with no match gives a tiny positive number, not 0.

ROUGE-L (Lin 2004) as COCO's Rouge: per id, P = max_j LCS(c, S_j) / |c| and
R = max_j LCS(c, S_j) / |S_j| (each maximised on its own), F = (1 + b^2) P R / (R + b^2 P) with
b = 1.2, 0 when P or R is 0; the corpus score is the mean over ids.
"""
import collections
import math
import re
from typing import Dict, Hashable, List, Mapping, Sequence, Tuple

Candidates = Mapping[Hashable, str]
References = Mapping[Hashable, Sequence[str]]
NGramCounts = collections.Counter

# -- tokenization ----------------------------------------------------------------------------

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET_TOKENS = frozenset(_BRACKETS.values())
# Symbols PTB keeps as tokens of their own ("$5" -> $ 5).
_SYMBOLS = "$#%"
# Abbreviations whose final period PTB keeps (besides dotted ones such as "u.s.", "p.m.").
_ABBREVIATIONS = frozenset(["mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc"])
_DOTTED = re.compile(r"(?:[a-z]\.)+[a-z]")
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                "wanna": ["wan", "na"]}


def _strip_word(word: str) -> str:
  """Drops quotes, hyphens and a sentence period from the ends of a word."""
  while True:
    stripped = word.strip("'-")
    if stripped.endswith(".") and not (_DOTTED.fullmatch(stripped[:-1]) or
                                       stripped[:-1] in _ABBREVIATIONS):
      stripped = stripped[:-1]
    if stripped == word:
      return word
    word = stripped


def tokenize(caption: str) -> List[str]:
  """Lower-cased words of `caption` without punctuation: COCO's PTB tokenization, in Python.

  Replaces the Java PTBTokenizer + punctuation filter of pycocoevalcap and gives its tokens on
  plain text (see the module docstring for what that covers).
  """
  if not isinstance(caption, str):
    raise ValueError(f"A caption must be a str, got {type(caption).__name__}: {caption!r}.")
  text = caption.lower()
  for bracket, token in _BRACKETS.items():
    text = text.replace(bracket, f" {token} ")
  for symbol in _SYMBOLS:
    text = text.replace(symbol, f" {symbol} ")
  text = re.sub(r"[\"`;!?]", " ", text)
  text = re.sub(r"(?<!\d)[,:]|[,:](?!\d)", " ", text)  # "1,000" and "10:30" stay whole.
  text = re.sub(r"\.{2,}|-{2,}", " ", text)              # Ellipses and dashes.
  tokens = []
  for word in text.split():
    if word in _BRACKET_TOKENS:
      tokens.append(word)
      continue
    word = _strip_word(word)
    if not word:
      continue
    if word in _SPLIT_WORDS:
      tokens.extend(_SPLIT_WORDS[word])
      continue
    clitic = _CLITIC.fullmatch(word)
    tokens.extend(clitic.groups() if clitic else [word])
  return tokens


# -- shared ----------------------------------------------------------------------------------

def check_ids(candidates: Candidates, references: References) -> List[Hashable]:
  """The ids to score, after checking both dicts describe the same non-empty set."""
  if not candidates:
    raise ValueError("No candidates to score.")
  missing = [k for k in candidates if k not in references]
  extra = [k for k in references if k not in candidates]
  if missing or extra:
    raise ValueError(f"candidates and references need the same ids: {len(missing)} ids have "
                     f"no references (e.g. {missing[:3]}), {len(extra)} references have no "
                     f"candidate (e.g. {extra[:3]}).")
  for k in candidates:
    refs = references[k]
    if isinstance(refs, str) or not refs:
      raise ValueError(f"references[{k!r}] must be a non-empty list of captions, got {refs!r}.")
  return list(candidates)


def _ngrams(tokens: Sequence[str], n: int) -> NGramCounts:
  """Counts of every n-gram of orders 1..n (tuples of words)."""
  return collections.Counter(
      tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


# -- CIDEr-D ---------------------------------------------------------------------------------

def _tfidf(counts: NGramCounts, doc_freq: Mapping[tuple, int], log_num_ids: float, n: int
           ) -> Tuple[List[Dict[tuple, float]], List[float]]:
  """Per order k: {n-gram: tf * idf} and its L2 norm."""
  vecs = [{} for _ in range(n)]
  for gram, tf in counts.items():
    vecs[len(gram) - 1][gram] = tf * (log_num_ids - math.log(max(1.0, doc_freq.get(gram, 0))))
  norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
  return vecs, norms


def cider_d(candidates: Candidates, references: References, *, n: int = 4,
            sigma: float = 6.0) -> Tuple[float, Dict[Hashable, float]]:
  """-> (corpus CIDEr-D, {id: CIDEr-D}); the corpus score is the mean over ids."""
  ids = check_ids(candidates, references)
  cand_tokens = {k: tokenize(candidates[k]) for k in ids}
  ref_tokens = {k: [tokenize(r) for r in references[k]] for k in ids}
  ref_counts = {k: [_ngrams(r, n) for r in ref_tokens[k]] for k in ids}
  doc_freq = collections.Counter()
  for k in ids:
    doc_freq.update(set().union(*ref_counts[k]))
  log_num_ids = math.log(len(ids))

  per_id = {}
  for k in ids:
    vec, norm = _tfidf(_ngrams(cand_tokens[k], n), doc_freq, log_num_ids, n)
    total = [0.0] * n
    for ref, ref_len in zip(ref_counts[k], map(len, ref_tokens[k])):
      ref_vec, ref_norm = _tfidf(ref, doc_freq, log_num_ids, n)
      penalty = math.exp(-(len(cand_tokens[k]) - ref_len) ** 2 / (2 * sigma ** 2))
      for order in range(n):
        dot = sum(min(v, ref_vec[order].get(g, 0.0)) * ref_vec[order].get(g, 0.0)
                  for g, v in vec[order].items())
        if norm[order] and ref_norm[order]:
          dot /= norm[order] * ref_norm[order]
        total[order] += dot * penalty
    per_id[k] = 10.0 * (sum(total) / n) / len(ref_counts[k])
  return sum(per_id.values()) / len(ids), per_id


# -- BLEU ------------------------------------------------------------------------------------

_TINY, _SMALL = 1e-15, 1e-9  # COCO's guards: (matches + tiny) / (count + small).


def _bleu_from_stats(matches: Sequence[float], counts: Sequence[float], cand_len: float,
                     ref_len: float) -> List[float]:
  """BLEU-1..BLEU-n from summed statistics (cumulative geometric means, brevity penalty)."""
  scores, product = [], 1.0
  for k, (match, count) in enumerate(zip(matches, counts)):
    product *= (match + _TINY) / (count + _SMALL)
    scores.append(product ** (1.0 / (k + 1)))
  ratio = (cand_len + _TINY) / (ref_len + _SMALL)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


def bleu_scores(candidates: Candidates, references: References, n: int = 4
                ) -> Tuple[List[float], Dict[Hashable, List[float]]]:
  """-> ([corpus BLEU-1, ..., BLEU-n], {id: [BLEU-1, ..., BLEU-n] of that id alone})."""
  if n < 1:
    raise ValueError(f"BLEU order n must be >= 1, got {n}.")
  ids = check_ids(candidates, references)
  total_matches, total_counts = [0] * n, [0] * n
  total_cand_len = total_ref_len = 0
  per_id = {}
  for k in ids:
    cand = tokenize(candidates[k])
    cand_counts = _ngrams(cand, n)
    max_ref_counts = collections.Counter()
    ref_lens = []
    for ref in references[k]:
      ref_tokens = tokenize(ref)
      ref_lens.append(len(ref_tokens))
      max_ref_counts |= _ngrams(ref_tokens, n)  # `|` keeps the larger count.
    ref_len = min(ref_lens, key=lambda l: (abs(l - len(cand)), l))
    matches, counts = [0] * n, [max(0, len(cand) - k) for k in range(n)]
    for gram, count in cand_counts.items():
      matches[len(gram) - 1] += min(count, max_ref_counts[gram])
    per_id[k] = _bleu_from_stats(matches, counts, len(cand), ref_len)
    total_matches = [a + b for a, b in zip(total_matches, matches)]
    total_counts = [a + b for a, b in zip(total_counts, counts)]
    total_cand_len += len(cand)
    total_ref_len += ref_len
  return _bleu_from_stats(total_matches, total_counts, total_cand_len, total_ref_len), per_id


def bleu(candidates: Candidates, references: References, n: int = 4) -> float:
  """Corpus BLEU-n (default BLEU-4, the number captioning papers quote)."""
  return bleu_scores(candidates, references, n)[0][n - 1]


# -- ROUGE-L ---------------------------------------------------------------------------------

def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence (dynamic programming, one row at a time)."""
  # row[j] = LCS(a[:i], b[:j]) for the current i; `above_left` is LCS(a[:i-1], b[:j-1]).
  row = [0] * (len(b) + 1)
  for x in a:
    above_left = 0
    for j, y in enumerate(b, start=1):
      above = row[j]
      row[j] = above_left + 1 if x == y else max(above, row[j - 1])
      above_left = above
  return row[-1]


def rouge_l_sentence(candidate: Sequence[str], references: Sequence[Sequence[str]],
                     beta: float = 1.2) -> float:
  """ROUGE-L F-score of one tokenized candidate against its tokenized references."""
  lcs = [_lcs_length(candidate, ref) for ref in references]
  precision = max(l / len(candidate) if candidate else 0.0 for l in lcs)
  recall = max(l / len(ref) if ref else 0.0 for l, ref in zip(lcs, references))
  if precision == 0 or recall == 0:
    return 0.0
  return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def rouge_l_scores(candidates: Candidates, references: References, beta: float = 1.2
                   ) -> Dict[Hashable, float]:
  """{id: ROUGE-L} of every candidate."""
  return {k: rouge_l_sentence(tokenize(candidates[k]), [tokenize(r) for r in references[k]],
                              beta)
          for k in check_ids(candidates, references)}


def rouge_l(candidates: Candidates, references: References, beta: float = 1.2) -> float:
  """Mean ROUGE-L over ids."""
  scores = rouge_l_scores(candidates, references, beta)
  return sum(scores.values()) / len(scores)
