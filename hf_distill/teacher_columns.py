"""Which dataset columns hold which teacher's outputs: `teacher_logits` (or its top-k fields) for one teacher,
`teacher_logits_<name>` for each of several, so adding a teacher never recomputes the others' caches."""

import torch

from .cache import teacher_columns
from .heads import DENSE, TOPK


def teacher_column(column: str, teacher_name: str) -> str:
    """The cache column of a teacher: `column` for a single teacher (`""`), `column_<name>` for one of several."""
    return f"{column}_{teacher_name}" if teacher_name else column


class TeacherColumns:
    """The cache columns of every teacher of a run, by field (`"logits"`, or `"ids"` / `"log_probs"` / `"rest"`).

    Args:
        column: the base column (`args.teacher_logits_column`).
        teacher_names: the teachers' names (`[""]` for one).
        layout: the head's cache layout; None before the head is known (`present` accepts either layout).
    """

    def __init__(self, column: str, teacher_names: list[str], layout: str | None = None):
        self.column, self.teacher_names = column, teacher_names
        self.by_teacher = {name: teacher_columns(layout or DENSE, teacher_column(column, name))
                           for name in teacher_names}

    @property
    def all(self) -> list[str]:
        return [column for names in self.by_teacher.values() for column in names.values()]

    def present(self, dataset, name: str | None = None) -> bool:
        """Whether `dataset` holds the columns of teacher `name` (default: of every teacher), in any layout."""
        columns = getattr(dataset, "column_names", None) or []
        names = self.teacher_names if name is None else [name]
        return all(
            any(column in columns for layout in (DENSE, TOPK)
                for column in teacher_columns(layout, teacher_column(self.column, teacher)).values())
            for teacher in names
        )

    def pop(self, inputs: dict) -> dict[str, dict[str, torch.Tensor]]:
        """Take the teacher columns out of a batch: `{teacher name: {field: tensor}}` for the teachers it holds."""
        cached = {teacher: {key: inputs.pop(column) for key, column in names.items() if column in inputs}
                  for teacher, names in self.by_teacher.items()}
        return {teacher: columns for teacher, columns in cached.items() if columns}
