"""seqio Task and Mixture registrations, one module per data kind.

`import data_mixtures` registers every task below; a user's own tasks live in
their own module, named in the config's `data_modules`.
"""
from data_mixtures import documents  # noqa: F401  (registers on import)
from data_mixtures import interleaved  # noqa: F401
from data_mixtures import shapes  # noqa: F401
from data_mixtures import videos  # noqa: F401
