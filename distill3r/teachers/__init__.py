"""Teachers: one interface (views in, the four maps out at the cache resolution).

``get_teacher(params)`` builds the teacher named by ``params.name``: ``groundtruth``,
``fast3r`` (imported only when asked for, so nothing else ever needs the ``fast3r`` package) or
``checkpoint`` (a saved Distill3R model folder).
"""

from __future__ import annotations

import typing

from distill3r.config import TeacherName, TeacherParams
from distill3r.teachers.base import Teacher, TeacherInput, TeacherOutput

TEACHERS = typing.get_args(TeacherName)

__all__ = ["TEACHERS", "Teacher", "TeacherInput", "TeacherOutput", "get_teacher"]


def get_teacher(params: TeacherParams) -> Teacher:
    """The teacher named ``params.name`` (``ValueError`` for an unknown name or bad values)."""
    params.validate("teacher")
    if params.name == "groundtruth":
        from distill3r.teachers.groundtruth import GroundTruthTeacher

        return GroundTruthTeacher(params)
    if params.name == "fast3r":
        from distill3r.teachers.fast3r import Fast3RTeacher

        return Fast3RTeacher(params)
    if params.name == "checkpoint":
        from distill3r.teachers.checkpoint import CheckpointTeacher

        return CheckpointTeacher(params)
    raise AssertionError(f"TeacherParams.validate let {params.name!r} through")
