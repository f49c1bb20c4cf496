"""`TeacherColumnsCollator`: the user's collator, plus the teacher's per-token cache columns padded with the batch."""

import numpy as np
import torch


class TeacherColumnsCollator:
    """Wraps `data_collator`: takes the per-token teacher columns out of the features, lets the wrapped collator
    build the batch, then pads each teacher column to the batch's `length_key` width on the tokenizer's side.

    Args:
        data_collator: the collator the trainer would use.
        widths: `{column: values per position}`; a stored row is `(length * width,)`, a batch column
            `(batch, padded_length, width)`, or `(batch, padded_length)` when width is `None`.
        length_key: the batch field whose width is the padded length (`input_ids`, or `labels` for seq2seq).
        padding_side: `"right"` or `"left"`, as the tokenizer pads.
    """

    def __init__(self, data_collator, widths: dict[str, int | None], length_key: str, padding_side: str = "right"):
        self.data_collator = data_collator
        self.widths = widths
        self.length_key = length_key
        self.padding_side = padding_side

    def __call__(self, features: list[dict]) -> dict:
        teacher_values = {
            column: [feature.pop(column) for feature in features]
            for column in self.widths
            if column in features[0]
        }
        batch = self.data_collator(features)
        if not teacher_values:
            return batch
        padded_length = batch[self.length_key].shape[1]
        for column, rows in teacher_values.items():
            width = self.widths[column]
            arrays = [np.asarray(row).reshape(-1, width) if width else np.asarray(row) for row in rows]
            shape = (len(arrays), padded_length) + ((width,) if width else ())
            dtype = np.float32 if np.issubdtype(arrays[0].dtype, np.floating) else np.int64
            padded = np.zeros(shape, dtype=dtype)
            for index, array in enumerate(arrays):
                length = min(len(array), padded_length)
                if self.padding_side == "left":
                    padded[index, padded_length - length :] = array[:length]
                else:
                    padded[index, :length] = array[:length]
            batch[column] = torch.from_numpy(padded)
        return batch
