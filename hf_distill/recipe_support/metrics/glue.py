"""
The GLUE metric as an `evaluate` module that works offline.

`evaluate.load("glue", task)` fetches its script from the Hugging Face Hub; this module is that metric shipped in
the package, so it loads from its path (`evaluate.load(GLUE_METRIC_PATH, "mrpc")`) or imports directly
(`GlueMetric("mrpc")`), with `compute`, `add_batch` and `evaluate.combine` as for any `evaluate` metric. The
definitions are the Hub metric's: accuracy; binary F1 with class 1 as the positive class (mrpc, qqp); Matthews
correlation (cola); Pearson and Spearman correlation (stsb), all as Python floats.

`evaluate.load` copies this file alone into its modules cache and imports it from there, so imports of this
package are absolute (a relative import would resolve inside that cache).
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from hf_distill.recipe_support.glue import GLUE_TASKS, get_task

_DESCRIPTION = "GLUE task metrics (Wang et al., 2019), computed with scikit-learn and scipy."

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_INPUTS_DESCRIPTION = """
Args:
    predictions: class ids `(num_examples,)` for classification, scores `(num_examples,)` for stsb.
    references: gold labels, same shape.
Returns:
    `{metric name: value}` with the task's metric names (`GlueTask.metric_names`): `accuracy` (all but cola and
    stsb), `f1` (mrpc, qqp), `matthews_correlation` (cola), `pearson` and `spearmanr` (stsb).
Examples:
    >>> GlueMetric("mrpc").compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'accuracy': 0.75, 'f1': 0.8}
"""

_METRIC_FUNCTIONS = {
    "accuracy": lambda predictions, references: accuracy_score(references, predictions),
    "f1": lambda predictions, references: f1_score(references, predictions, pos_label=1, average="binary"),
    "matthews_correlation": lambda predictions, references: matthews_corrcoef(references, predictions),
    "pearson": lambda predictions, references: pearsonr(predictions, references)[0],
    "spearmanr": lambda predictions, references: spearmanr(predictions, references)[0],
}


class GlueMetric(evaluate.Metric):
    """The GLUE metric of one task, named by `config_name` (`"sst2"`, `"mrpc"`, ..., as in `GLUE_TASKS`)."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "default":
            raise ValueError(
                "The GLUE metric needs the task name as its config name, e.g. GlueMetric('mrpc') or "
                f"evaluate.load(GLUE_METRIC_PATH, 'mrpc'). Choose one of: {', '.join(GLUE_TASKS)}."
            )
        # float32 scores as in the Hub's glue metric: a model's logits and the recipe's stsb labels are float32.
        value_type = "float32" if get_task(self.config_name).is_regression else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(value_type), "references": datasets.Value(value_type)}
            ),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        task = get_task(self.config_name)
        if len(predictions) == 0:
            raise ValueError(f"No examples to score for {task.name}: predictions and references are empty.")
        return {name: float(_METRIC_FUNCTIONS[name](predictions, references)) for name in task.metric_names}
