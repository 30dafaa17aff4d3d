"""habitat source (being written)."""
