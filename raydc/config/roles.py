"""Which model plays which part: the fallbacks between config fields, in one place.

A field left empty borrows another's value (``train.student`` empty: training starts from
``score.student``); every stage reads its models through ``roles(cfg)`` rather than
restating the chain. After ``raydc.pipeline.resolve`` the values are real paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raydc.config.sections import RaydcConfig


@dataclass(frozen=True)
class Roles:
    student: str | None  # training starts from it: train.student, else score.student
    scored_student: str | None  # the store was scored under it: train.scored_student, else student
    tokenizer: str | None  # prepare tokenizes with it: data.tokenizer, else score.student
    teacher: str | None  # scores the traces' tokens when they carry none: score.teacher
    generate_teacher: str | None  # writes traces: generate.teacher, else score.teacher
    mixed_student: str | None  # writes mixed-policy prefixes: mixed_policy.student, else student
    mixed_teacher: str | None  # continues them: mixed_policy.teacher, else generate_teacher


def roles(cfg: RaydcConfig) -> Roles:
    student = cfg.train.student or cfg.score.student
    generate_teacher = cfg.generate.teacher or cfg.score.teacher
    return Roles(
        student=student,
        scored_student=cfg.train.scored_student or student,
        tokenizer=cfg.data.tokenizer or cfg.score.student,
        teacher=cfg.score.teacher,
        generate_teacher=generate_teacher,
        mixed_student=cfg.mixed_policy.student or student,
        mixed_teacher=cfg.mixed_policy.teacher or generate_teacher,
    )
