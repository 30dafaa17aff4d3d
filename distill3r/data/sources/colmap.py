"""colmap source (being written)."""
