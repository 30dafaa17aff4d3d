"""blendedmvs source (being written)."""
