"""The student model: named configs, DUNE encoder loading, checkpoints.

Public API: :func:`build_student`, :class:`Student`, :class:`StudentConfig`, ``MODEL_CONFIGS``,
:func:`get_config`, :func:`count_parameters`, :func:`save_student`, :func:`load_student`,
:func:`load_dune_encoder` (the input conversion is :func:`distill3r.inputs.images_to_input`).
"""

from distill3r.models.checkpoint import (checkpoint_fingerprint, load_student, save_student,
                                         weights_fingerprint)
from distill3r.models.configs import MODEL_CONFIGS, StudentConfig, get_config
from distill3r.models.dune import load_dune_encoder
from distill3r.models.student import Student, build_student, count_parameters

__all__ = [
    "MODEL_CONFIGS", "Student", "StudentConfig", "build_student", "checkpoint_fingerprint",
    "count_parameters", "get_config", "load_dune_encoder", "load_student", "save_student",
    "weights_fingerprint",
]
