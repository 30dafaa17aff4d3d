"""arkitscenes source (being written)."""
