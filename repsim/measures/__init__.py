"""The numerical core: the measure registry and its families, all layer pairs at once, streaming moments, losses."""
