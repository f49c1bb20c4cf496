"""Which checkpoint to resume from: the newest complete one, past those that an interrupted save left behind.

Trainer writes `trainer_state.json` last in a checkpoint, and `DistillationTrainer` writes its projections before
Trainer saves anything, so a checkpoint holding both is complete. Trainer itself resumes from the newest
`checkpoint-*` folder, complete or not.
"""

import os
import re

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

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
