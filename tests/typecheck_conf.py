"""Runtime type checker for the test suite (jaxtyping import hook + beartype).

Used as ``pytest --jaxtyping-packages=contrans_tl,typecheck_conf.typechecker``.
PEP 484's numeric tower is on, so an ``int`` is accepted where a ``float`` is annotated
(``alpha=2``), as type checkers accept it.
"""

from beartype import BeartypeConf, beartype

typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))
