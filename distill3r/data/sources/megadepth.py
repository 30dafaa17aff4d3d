"""megadepth source (being written)."""
