"""Saving and resuming a distillation run: the student alone is exported, checkpoints add the width projections,
and a resume starts from the newest complete checkpoint, past those an interrupted save left behind.

Trainer writes `trainer_state.json` last in a checkpoint, and `DistillationTrainer` writes its projections before
Trainer saves anything, so a checkpoint holding both is complete. Trainer itself resumes from the newest
`checkpoint-*` folder, complete or not.
"""

import os
import re
from contextlib import contextmanager

from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .wrapper import PROJECTIONS_FILE, DistillWrapper

logger = logging.get_logger(__name__)

_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def last_complete_checkpoint(output_dir: str, required_files: tuple[str, ...] = ()) -> str | None:
    """The newest `checkpoint-<step>` folder of `output_dir` holding `trainer_state.json` and `required_files`.

    Incomplete newer ones are skipped with a warning. Raises `ValueError` when checkpoints exist but none is
    complete; returns None when there is none at all (Trainer then raises its own error).
    """
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = {int(match[1]): name for name in names if (match := _CHECKPOINT_NAME.match(name))}
    incomplete = []
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, steps[step])
        missing = [
            name for name in (TRAINER_STATE_NAME, *required_files) if not os.path.isfile(os.path.join(folder, name))
        ]
        if not missing:
            if incomplete:
                logger.warning(f"{'; '.join(incomplete)}. Resuming from the previous complete checkpoint, {folder}.")
            return folder
        incomplete.append(f"{steps[step]} is incomplete (it has no {', '.join(missing)}: its save was interrupted)")
    if incomplete:
        raise ValueError(
            f"{'; '.join(incomplete)}, and there is no complete checkpoint in {output_dir} to resume from. Start "
            "the run afresh (resume_from_checkpoint=None, after removing those folders), or pass the path of a "
            "complete checkpoint as resume_from_checkpoint."
        )
    return None


class StudentCheckpoints:
    """`Trainer` hooks (a mixin before `Trainer`): `save_model` writes the student without the projections wrapper,
    checkpoints add the projections, and `resume_from_checkpoint=True` takes the newest complete checkpoint."""

    @contextmanager
    def _model_swapped(self, module: nn.Module):
        """Let a Trainer method see `module` as `self.model` (the student inside the wrapper)."""
        model = self.model
        self.model = module
        try:
            yield
        finally:
            self.model = model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        wrapper = self.accelerator.unwrap_model(self.model)
        if not isinstance(wrapper, DistillWrapper):
            return super()._save(output_dir, state_dict)
        if state_dict is not None:
            state_dict = {
                name.removeprefix("student."): value for name, value in state_dict.items()
                if name.startswith("student.")
            }
        with self._model_swapped(wrapper.student):
            super()._save(output_dir, state_dict)

    def _save_checkpoint(self, model, trial) -> None:
        # The projections go first: Trainer rotates old checkpoints out at the end of its save, and writes
        # trainer_state.json (what makes a checkpoint complete, see last_complete_checkpoint) just before.
        wrapper = self.accelerator.unwrap_model(self.model)
        if isinstance(wrapper, DistillWrapper) and self.args.should_save:
            wrapper.save_projections(os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            ))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        if resume_from_checkpoint is True:  # Trainer would take the newest folder, even one a kill left half-written
            needs_projections = isinstance(self.accelerator.unwrap_model(self.model), DistillWrapper)
            resume_from_checkpoint = last_complete_checkpoint(
                self.args.output_dir, (PROJECTIONS_FILE,) if needs_projections else ()
            ) or resume_from_checkpoint
        return super().train(resume_from_checkpoint, trial, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        wrapper = model if model is not None else self.model
        if not isinstance(wrapper, DistillWrapper):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        super()._load_from_checkpoint(resume_from_checkpoint, wrapper.student)
        wrapper.load_projections(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        wrapper = self.model
        if not isinstance(wrapper, DistillWrapper):
            return super()._load_best_model()
        with self._model_swapped(wrapper.student):
            super()._load_best_model()
        wrapper.load_projections(self.state.best_model_checkpoint)
