"""Image classification (`*ForImageClassification`), and DeiT's distillation token."""

from .base import DistillationHead, Units


class ImageClassificationHead(DistillationHead):
    """Like sequence classification, on `pixel_values`. A cached logit belongs to one view of an image, so the
    cache refuses datasets that transform their rows on access (random augmentations)."""

    name = "image_classification"
    input_names = ("pixel_values",)
    length_column = None
    class_suffixes = ("ForImageClassification",)
    pipeline_tag = "image-classification"


class DeiTWithTeacherHead(ImageClassificationHead):
    """`DeiTForImageClassificationWithTeacher`: its distillation head (`distillation_logits`) learns the teacher,
    its class head (`cls_logits`) the labels; at inference `logits` averages the two, as in DeiT."""

    name = "deit_with_teacher"
    #: It caches the teacher's `logits`, as the image head does: one cache serves ViT and DeiT students.
    cache_name = "image_classification"
    class_suffixes = ("ForImageClassificationWithTeacher",)
    #: transformers ships the class for inference only: its forward declares no labels.
    default_label_names = ("labels",)

    def kd_logits(self, outputs, units: Units, inputs: dict):
        return [self._classes(outputs.distillation_logits[units.kd])]

    def teacher_kd_logits(self, teacher_outputs, units: Units, inputs: dict):
        # The teacher's prediction is its `logits` (a ViT's, or a DeiT teacher's averaged ones), as cached.
        return [self._classes(teacher_outputs.logits[units.kd])]

    def label_views(self, outputs, units: Units, inputs: dict):
        return [(self._classes(outputs.cls_logits[units.kd]), units.label_targets[units.kd])]
