"""Hidden states: data, embedded assets, model loading, pooling, layer grammar, extraction and the cache store."""
