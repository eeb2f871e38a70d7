"""``tl-lightning advise``: pick the transfer strategy from measurements of the data and machine.

``describe`` (counts, sizes, broken files), ``distance`` (k-fold probe, k-NN, BatchNorm shift),
``ridge`` (the probe, in closed form), ``timing`` (seconds per epoch of each strategy), ``rule``
(the pure recommendation), ``config`` (advised.yaml), ``lr`` (optional LR range test), ``advise``
(all of it), ``command`` (the CLI).
"""

from tl_lightning.advisor.advise import Advice, advise
from tl_lightning.advisor.rule import Evidence, Recommendation, recommend, seeds_size_rule

__all__ = ["Advice", "Evidence", "Recommendation", "advise", "recommend", "seeds_size_rule"]
