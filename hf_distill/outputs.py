"""A recipe's output folder: refused when it holds another run, claimed with a record of this run's settings."""

import json
import os
import shutil

RUN_RECORD = "hf_distill_run.json"


def claim_output_dir(output_dir: str, run_record: dict, overwrite: bool, is_main: bool) -> None:
    """Refuse an `output_dir` that holds another run (or other files) unless `overwrite`; on the main process,
    (re)create it and write `run_record` to `hf_distill_run.json` in it. Call it after every input check."""
    record_path = os.path.join(output_dir, RUN_RECORD)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        previous = None
        if os.path.exists(record_path):
            with open(record_path) as file:
                previous = json.load(file)
        if previous != run_record:
            what = "another hf_distill run" if previous else "files of something else"
            raise ValueError(
                f"--output_dir {output_dir} already holds {what}. Choose a new --output_dir, or pass "
                "--overwrite_output_dir to replace it."
            )
    if is_main:
        if overwrite and os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        with open(record_path, "w") as file:
            json.dump(run_record, file, indent=2)
