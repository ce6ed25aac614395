"""Input data: embedded generators, vocabulary, seqio preprocessors, pipeline."""
