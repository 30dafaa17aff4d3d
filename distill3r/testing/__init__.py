"""Helpers for tests: real local services (an MLflow server, an sshd) on 127.0.0.1."""
