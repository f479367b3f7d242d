"""The numerical core: the measure registry and its families, all layer pairs at once, streaming moments, losses.

Importing the package registers every family of :mod:`repsim.measures.families`.
"""

from repsim.measures import families  # noqa: F401  (registers the families)
