r"""Trains the small SentencePiece model shipped for the embedded data.

  python -m tools.train_spm [--out vlpjax/data/assets/shapes_spm.model]

The corpus is the shapes captions, the class prompts and a list of common English
words (so that text outside the shapes world still splits into pieces, not only
bytes). The ids follow seqio's conventions: pad 0, eos 1, unk 2, no bos, and byte
fallback so nothing is ever out of vocabulary. BPE keeps every caption word one
piece. Normalization is a two-rule table (odd spaces -> " ") rather than NFKC,
whose tables alone would add ~240 KB to the asset; an empty table would make
every model load log a line. Training is single-threaded on the whole fixed corpus, so
re-running it writes a byte-identical model.
"""
import argparse
import io
import os
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from vlpjax.data import shapes

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "vlpjax", "data", "assets", "shapes_spm.model")
VOCAB_SIZE = 512
NUM_CAPTIONS = 20_000

# Everyday words that later demos (stories, documents, videos) are likely to use.
_COMMON_WORDS = """
the of and to in is it you that he was for on are with as his they be at one have
this from or had by word but what some we can out other were all there when up use
your how said an each she which do their time if will way about many then them
write would like so these her long make thing see him two has look more day could
go come did number sound no most people my over know water than call first who may
down side been now find any new work part take get place made live where after back
little only round man year came show every good me give our under name very through
just form sentence great think say help low line differ turn cause much mean before
move right boy old too same tell does set three want air well also play small end
put home read hand port large spell add even land here must big high such follow act
why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found
answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw
left late run while press close night real life few north open seem together next
white children begin got walk example ease paper group always music those both mark
often letter until mile river car feet care second book carry took science eat room
friend began idea fish mountain stop once base hear horse cut sure watch colour color
face wood main enough plain girl usual young ready above ever red list though feel talk
bird soon body dog family direct pose leave song measure door product black short
numeral class wind question happen complete ship area half rock order fire south
problem piece told knew pass since top whole king space heard best hour better true
during hundred five remember step early hold west ground interest reach fast verb sing
listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold
notice voice unit power town fine certain fly fall lead cry dark machine note wait plan
figure star box noun field rest correct able pound done beauty drive stood contain front
teach week final gave green quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full
force blue object decide surface deep moon island foot system busy test record boat
common gold possible plane stead dry wonder laugh thousand ago ran check game shape
equate hot miss brought heat snow tire bring yes distant fill east paint language among
photo image shows showing circle square triangle yellow purple orange brown gray grey
pink background video frame document text box cat person holding sitting standing
"""


def build_corpus() -> list:
  lines = shapes.generate_captions("train", NUM_CAPTIONS)
  for template in shapes.CLASS_PROMPT_TEMPLATES:
    lines += [template.format(name) for name in shapes.CLASS_NAMES]
  words = _COMMON_WORDS.split()
  # Short pseudo-sentences keep word-boundary statistics realistic.
  lines += [" ".join(words[i:i + 8]) for i in range(0, len(words), 8)]
  lines += [w.capitalize() for w in words]
  lines += [" ".join(str(n) for n in range(i, i + 10)) for i in range(0, 100, 10)]
  # Punctuation as pieces, not bytes, so ordinary sentences stay short.
  lines += ["Yes, a dog. No! A cat? (one) 'two' \"three\": four; five-six & 7/8 = 100%."] * 20
  return lines


# Hex code points -> replacement: no-break space and ideographic space -> space.
_NORMALIZATION_RULES = "A0\t20\n3000\t20\n"


def train(out_path: str = DEFAULT_OUT, vocab_size: int = VOCAB_SIZE) -> str:
  lines = build_corpus()
  model = io.BytesIO()
  with tempfile.TemporaryDirectory() as tmp:
    rules = os.path.join(tmp, "rules.tsv")
    with open(rules, "w") as f:
      f.write(_NORMALIZATION_RULES)
    _train(lines, model, rules, vocab_size)
  proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
  # The model records the rules' temporary path; drop it to stay byte-identical.
  proto.normalizer_spec.ClearField("normalization_rule_tsv")
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  with open(out_path, "wb") as f:
    f.write(proto.SerializeToString())
  return out_path


def _train(lines, model, rules_path, vocab_size):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      model_type="bpe",
      normalization_rule_tsv=rules_path,
      vocab_size=vocab_size,
      character_coverage=1.0,
      byte_fallback=True,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      input_sentence_size=len(lines),
      shuffle_input_sentence=False,
      num_threads=1,
      minloglevel=2,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
  args = parser.parse_args()
  print("wrote", train(args.out, args.vocab_size))


if __name__ == "__main__":
  main()
