"""Image classification data: the Hub (`cifar10`), an image folder, NumPy arrays, or scikit-learn's digits; image
processing with a model's image processor (PIL backend, no torchvision); optional random augmentation.

Splits come out with an `image` column (PIL images) and an integer `labels` column with `ClassLabel` names.
"""

import os

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset

from .columns import pick_column

DIGITS = "sklearn_digits"
"""`dataset_name` of scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn)."""
IMAGE_COLUMNS = ("image", "img", "pixel_values_raw")
LABEL_COLUMNS = ("label", "labels", "fine_label")


def load_digits_splits(test_size: float = 0.2, validation_size: float = 0.15, seed: int = 0) -> DatasetDict:
    """scikit-learn's digits as 8x8 grayscale images (16 grey levels scaled to 0-255), split into fixed
    stratified train / validation / test sets (`seed` fixes them, apart from any training seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    indices = np.arange(len(images))
    rest, test = train_test_split(indices, test_size=test_size, random_state=seed, stratify=digits.target)
    train, validation = train_test_split(
        rest, test_size=validation_size, random_state=seed, stratify=digits.target[rest]
    )
    names = [str(digit) for digit in range(10)]
    return DatasetDict({
        split: arrays_dataset(images[index], digits.target[index], names)
        for split, index in (("train", train), ("validation", validation), ("test", test))
    })


def arrays_dataset(images: np.ndarray, labels: np.ndarray, label_names=None) -> Dataset:
    """A dataset of `images` `(N, H, W)` or `(N, H, W, C)` uint8 and integer `labels` `(N,)`."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise ValueError(
            f"Image arrays must be uint8 of shape (N, height, width) or (N, height, width, channels), got "
            f"{images.dtype} {images.shape}. Scale them to 0-255 and cast to uint8."
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Labels must be integers of shape ({len(images)},), one per image; got {labels.shape}.")
    names = list(label_names) if label_names is not None else [str(i) for i in range(int(labels.max()) + 1)]
    features = Features({"image": Image(), "labels": ClassLabel(names=names)})
    return Dataset.from_dict({"image": list(images), "labels": labels.tolist()}, features=features)


def _read_arrays(path: str) -> Dataset:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No file at {path!r}: pass a .npz file with `images` and `labels` arrays.")
    arrays = np.load(path)
    missing = [key for key in ("images", "labels") if key not in arrays]
    if missing:
        raise ValueError(f"{path} has no {missing} array(s) (it has {list(arrays)}): save images= and labels=.")
    names = arrays["label_names"].tolist() if "label_names" in arrays else None
    return arrays_dataset(arrays["images"], arrays["labels"], names)


def load_image_classification_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    train_val_split: float = 0.15,
    seed: int = 0,
) -> tuple[DatasetDict, list[str]]:
    """
    Load image-classification splits from one source: `dataset_name` (a Hub dataset, or `"sklearn_digits"`),
    `train_dir` / `validation_dir` (image folders, one sub-folder per class), or `train_file` / `validation_file`
    (`.npz` with `images`, `labels` and optional `label_names`). Without a validation split, `train_val_split` of
    the train split is held out (as `run_image_classification.py` does).

    Returns:
        `(splits, label_names)`, each split with columns `image` and `labels`.
    """
    sources = [bool(dataset_name), bool(train_dir), bool(train_file)]
    if sum(sources) != 1:
        raise ValueError(
            "Give exactly one data source: --dataset_name (a Hub dataset such as cifar10, or sklearn_digits), "
            "--train_dir (an image folder), or --train_file (a .npz with images and labels)."
        )
    if dataset_name == DIGITS:
        raw = load_digits_splits(seed=seed)
    elif dataset_name:
        raw = load_dataset(dataset_name, dataset_config_name)
    elif train_dir:
        files = {"train": os.path.join(train_dir, "**")}
        if validation_dir:
            files["validation"] = os.path.join(validation_dir, "**")
        raw = load_dataset("imagefolder", data_files=files)
    else:
        raw = DatasetDict({"train": _read_arrays(train_file)})
        if validation_file:
            raw["validation"] = _read_arrays(validation_file)
    if "train" not in raw:
        raise ValueError(f"The data has no 'train' split (it has {list(raw)}).")
    columns = raw["train"].column_names
    image_column = pick_column(columns, image_column, IMAGE_COLUMNS, "image", "--image_column_name")
    label_column = pick_column(columns, label_column, LABEL_COLUMNS, "label", "--label_column_name")
    feature = raw["train"].features[label_column]
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"Column {label_column!r} holds {feature}, not class labels (datasets.ClassLabel).")
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "labels")) if old != new}
    raw = DatasetDict({
        split: dataset.select_columns([image_column, label_column]).rename_columns(renames)
        for split, dataset in raw.items()
    })
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=train_val_split, seed=seed, stratify_by_column="labels")
        raw["train"], raw["validation"] = held_out["train"], held_out["test"]
    for split, dataset in raw.items():
        if len(dataset) == 0:
            raise ValueError(f"The {split} split has no images.")
    return raw, list(feature.names)


def random_shift_flip(pixel_values: np.ndarray, rng: np.random.Generator, max_shift: int, flip: bool) -> np.ndarray:
    """A random view of one processed image `(channels, height, width)`: shifted by up to `max_shift` pixels
    (zero-padded, as a padded random crop) and, with `flip`, mirrored half of the time."""
    channels, height, width = pixel_values.shape
    if max_shift:
        padded = np.pad(pixel_values, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
        top, left = rng.integers(0, 2 * max_shift + 1, size=2)
        pixel_values = padded[:, top : top + height, left : left + width]
    if flip and rng.random() < 0.5:
        pixel_values = pixel_values[:, :, ::-1]
    return np.ascontiguousarray(pixel_values)


def process_images(
    splits: DatasetDict, image_processor, num_channels: int, augment_train: dict | None = None, seed: int = 0,
    on_the_fly: bool = False,
) -> DatasetDict:
    """`pixel_values` `(channels, height, width)` float32 from the `image` column, by `image_processor`.

    Stored with `map` by default, so teacher logits can be cached. With `augment_train` (`{"max_shift": int,
    "flip": bool}`) the train split is processed and augmented on access (`set_transform`), a new view each
    epoch: its teacher logits must come from the teacher online (the cache refuses such a dataset). `on_the_fly`
    processes every split on access (large images that would not fit on disk as float arrays).
    """
    mode = "L" if num_channels == 1 else "RGB"

    def pixels(images):
        return image_processor([image.convert(mode) for image in images], return_tensors="np")["pixel_values"]

    def stored(batch):
        return {"pixel_values": list(pixels(batch["image"]).astype(np.float32)), "labels": batch["labels"]}

    rng = np.random.default_rng(seed)

    def augmented(batch):
        values = pixels(batch["image"]).astype(np.float32)
        if augment_train:
            values = np.stack([random_shift_flip(value, rng, **augment_train) for value in values])
        return {"pixel_values": list(values), "labels": batch["labels"]}

    processed = {}
    for split, dataset in splits.items():
        if on_the_fly or (augment_train and split == "train"):
            transform = augmented if split == "train" else stored
            processed[split] = dataset.with_transform(transform)
        else:
            processed[split] = dataset.map(stored, batched=True, remove_columns=["image"], desc=f"Processing {split}")
    return DatasetDict(processed)


def mixup_copies(train: Dataset, copies: int, alpha: float = 1.0, seed: int = 0) -> Dataset:
    """`copies` x `len(train)` unlabelled images for the teacher to label: each `lam * x_i + (1 - lam) * x_j`, two
    stored train images (partners from a permutation per copy, `lam ~ Beta(alpha, alpha)`), label -1 (missing).

    Mixup's inputs (Zhang et al. 2018) as transfer data: between two digits the teacher's soft labels say how much
    each is there, which the one-hot labels of its own (memorised) train images cannot.
    """
    if train.format["type"] == "custom":
        raise ValueError("Mixup copies mix stored images: drop --augment / --process_on_the_fly to use them.")
    pixels = np.stack(train.with_format("numpy")["pixel_values"]).astype(np.float32)
    rng = np.random.default_rng(seed)
    mixed = []
    for _ in range(copies):
        partners = rng.permutation(len(pixels))
        weights = rng.beta(alpha, alpha, size=len(pixels)).astype(np.float32)[:, None, None, None]
        mixed.append(weights * pixels + (1 - weights) * pixels[partners])
    values = np.concatenate(mixed)
    return Dataset.from_dict({"pixel_values": list(values), "labels": [-1] * len(values)},
                             features=train.features)
