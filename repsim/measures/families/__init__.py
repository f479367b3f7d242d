"""The registered measure families, one module each (see :mod:`repsim.measures.registry`).

Importing this package registers them in the order below (the order of ``metric_names()``); a new family is one
module here plus one import line below.
"""

# isort: off
from repsim.measures.families import procrustes  # noqa: F401
from repsim.measures.families import gram_frobenius  # noqa: F401
from repsim.measures.families import cka  # noqa: F401
from repsim.measures.families import projection_residual  # noqa: F401
from repsim.measures.families import cca  # noqa: F401
from repsim.measures.families import shape  # noqa: F401
from repsim.measures.families import svcca  # noqa: F401
from repsim.measures.families import pwcca  # noqa: F401
from repsim.measures.families import rsa  # noqa: F401
from repsim.measures.families import neighbours  # noqa: F401
# isort: on
