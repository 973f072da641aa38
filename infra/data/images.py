"""Image classification data: sources, a fixed held-out split, normalisation and augmentation.

Sources (`data.source`):

* `"digits"` — scikit-learn's bundled handwritten digits (1,797 real 8x8 grey images, 10 classes;
  no download);
* a `.npz` file with arrays `images` (N, H, W[, C]) and `labels` (N,) (and optionally
  `test_images` / `test_labels`, used as the held-out set instead of a split);
* a folder whose subfolders are the classes (`cats/001.png`, `dogs/x.jpg`, ...), read with Pillow
  (a dependency of matplotlib).

Every source is brought to float32 (N, size, size, channels) in [0, 1] (integer pixels / 255,
digits / 16), resized and converted to the model's size and channel count, then standardised per
channel with the training split's statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from infra.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_FIX = dict(key="data.source", value="digits", verb="pass",
                            note=", a .npz file or a folder of class subfolders")
Item = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageSplits:
    """Standardised train / held-out images (N, H, W, C) float32 and labels (N,) int32."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: np.ndarray  # (C,) per-channel statistics of the training split, before standardising
    std: np.ndarray
    class_names: tuple[str, ...]

    @property
    def fill(self) -> np.ndarray:
        """The standardised value of a black (0) pixel: what shifted-in borders are filled with."""
        return (-self.mean / self.std).astype(np.float32)


# --------------------------------------------------------------------------- sources


def load_digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """scikit-learn's digits: images (1797, 8, 8, 1) in [0, 1], labels (1797,) int32."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = (d.images / 16.0).astype(np.float32)[..., None]
    return images, d.target.astype(np.int32), tuple(str(i) for i in range(10))


def _scale(images: np.ndarray, what: str) -> np.ndarray:
    """Pixels as float32 in [0, 1] with a channel axis: integers / 255, floats as they are."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"{what} must have shape (N, H, W) or (N, H, W, C), got {images.shape}")
    if np.issubdtype(images.dtype, np.integer) or images.dtype == bool:
        return images.astype(np.float32) / (1.0 if images.dtype == bool else 255.0)
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{what} has dtype {images.dtype}; store pixels as uint8 or float")
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise DataError(f"{what} contains NaN or Inf pixels")
    return images


def _labels(labels: np.ndarray, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise DataError(f"{what} must be {n} non-negative integers (one per image), got shape "
                        f"{labels.shape} dtype {labels.dtype}")
    return labels.astype(np.int32)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(images, labels, test_images, test_labels) from a `.npz`; the test arrays may be None."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"data.source '{path}' is not a readable .npz file ({e})", **_FIX) from None
    missing = [k for k in ("images", "labels") if k not in arrays]
    if missing:
        raise DataError(f"data.source '{path}' has no array '{missing[0]}' (it has "
                        f"{', '.join(arrays) or 'none'}); save it with np.savez(path, images=..., "
                        "labels=...)")
    images = _scale(arrays["images"], f"'{path}' images")
    labels = _labels(arrays["labels"], len(images), f"'{path}' labels")
    if ("test_images" in arrays) != ("test_labels" in arrays):
        raise DataError(f"data.source '{path}' has only one of test_images / test_labels; "
                        "save both or neither")
    if "test_images" not in arrays:
        return images, labels, None, None
    test = _scale(arrays["test_images"], f"'{path}' test_images")
    return images, labels, test, _labels(arrays["test_labels"], len(test), f"'{path}' test_labels")


def _read_image(path: Path, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            return np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image '{path}' ({e}); remove it or fix it") from None


def load_folder(root: str | Path, *, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """A folder of class subfolders -> images (N, size, size, channels) in [0, 1], labels, class
    names (sorted subfolder names; label i is class_names[i])."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data.source folder '{root}' has no class subfolders; put each class's "
                        "images in a subfolder named after it (e.g. cats/1.png, dogs/2.png)")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder '{root / name}' holds no images "
                            f"({', '.join(IMAGE_SUFFIXES)}); add some or remove the folder")
        for f in files:
            pixels = _scale(_read_image(f, channels)[None], f"image '{f}'")
            images.append(fit_images(pixels, size=size, channels=channels)[0])
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int32), tuple(classes)


def fit_images(images: np.ndarray, *, size: int, channels: int) -> np.ndarray:
    """(N, H, W, C) in [0, 1] -> (N, size, size, channels): bilinear resize (Pillow) when the size
    differs; grey -> colour repeats the channel, colour -> grey takes the luminance, alpha is dropped."""
    c = images.shape[-1]
    if c not in (1, 3, 4):
        raise DataError(f"images have {c} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if c == 4:
        images, c = images[..., :3], 3
    if c != channels:
        if channels == 1:
            images = (images @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        else:
            images = np.repeat(images, channels, axis=-1)
    if images.shape[1:3] != (size, size):
        from PIL import Image

        def resize(plane: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(plane, mode="F").resize((size, size), Image.BILINEAR))

        images = np.stack([np.stack([resize(img[..., k]) for k in range(channels)], -1)
                           for img in images])
    return np.ascontiguousarray(images, dtype=np.float32)


# --------------------------------------------------------------------------- split


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), sorted: `round(test_fraction * n_c)` random examples of each
    class c go to the test side. Depends only on the labels, the fraction and the seed."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = int(round(test_fraction * len(members)))
        test.append(rng.permutation(members)[:take])
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_splits(source: str, *, size: int, channels: int, test_fraction: float,
                split_seed: int) -> ImageSplits:
    """Read `source`, hold out a fixed stratified split (unless the source ships its own test
    arrays), fit images to (size, size, channels) and standardise with training statistics."""
    test_images = test_labels = None
    if source == "digits":
        images, labels, names = load_digits()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data.source '{source}' does not exist", **_FIX)
        if path.is_dir():
            images, labels, names = load_folder(path, size=size, channels=channels)
        elif path.suffix == ".npz":
            images, labels, test_images, test_labels = load_npz(path)
            top = max(labels.max(), -1 if test_labels is None else test_labels.max())
            names = tuple(str(i) for i in range(int(top) + 1))
        else:
            raise DataError(f"data.source '{source}' is neither a .npz file nor a folder", **_FIX)
    if test_images is None:
        train, test = stratified_split(labels, test_fraction, split_seed)
        if len(test) == 0:
            raise DataError(f"data.test_fraction={test_fraction} of {len(labels)} images holds "
                            "none out; raise data.test_fraction")
        images, labels, test_images, test_labels = images[train], labels[train], images[test], labels[test]
    if len(images) == 0:
        raise DataError(f"data.source '{source}' leaves no training images; add images or lower "
                        "data.test_fraction")
    images = fit_images(images, size=size, channels=channels)
    test_images = fit_images(test_images, size=size, channels=channels)
    mean = images.mean(axis=(0, 1, 2))
    std = np.maximum(images.std(axis=(0, 1, 2)), 1e-3)
    standard = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return ImageSplits(standard(images), labels, standard(test_images), test_labels,
                       mean.astype(np.float32), std.astype(np.float32), names)


# --------------------------------------------------------------------------- augmentation


def _shift_range(ink: np.ndarray, max_shift: int) -> tuple[int, int]:
    """Shifts in [-max_shift, max_shift] along axis 0 that keep every True row of `ink` inside."""
    rows = np.flatnonzero(ink)
    if not len(rows):
        return 0, 0
    return max(-max_shift, -int(rows[0])), min(max_shift, len(ink) - 1 - int(rows[-1]))


def shift_and_noise(max_shift: int, noise_std: float, fill: np.ndarray, *,
                    keep_content: bool = True) -> Callable[[Item, np.random.Generator], Item]:
    """`augment(item, rng)` for `shuffled_batches`: shift `item["image"]` by up to `max_shift`
    pixels along each axis (borders filled with `fill`) and add N(0, noise_std^2) noise.

    `keep_content=True` draws each shift only from those that move no non-background pixel (one
    that differs from `fill`) off the canvas: right for digits, whose strokes touch the top and
    bottom rows; `False` shifts freely and crops (photos, where every pixel is content).
    """
    if max_shift < 0 or noise_std < 0:
        raise ConfigError(f"data.max_shift and data.noise_std must be >= 0, got {max_shift} and "
                          f"{noise_std}; set them to 0 to turn augmentation off")

    def augment(item: Item, rng: np.random.Generator) -> Item:
        image = item["image"]
        if max_shift:
            h, w = image.shape[:2]
            if keep_content:
                ink = np.any(np.abs(image - fill) > 1e-5, axis=-1)
                (y0, y1), (x0, x1) = _shift_range(ink.any(1), max_shift), _shift_range(ink.any(0), max_shift)
            else:
                y0 = x0 = -max_shift
                y1 = x1 = max_shift
            dy, dx = int(rng.integers(y0, y1 + 1)), int(rng.integers(x0, x1 + 1))
            out = np.broadcast_to(fill, image.shape).copy()
            out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            image = out
        if noise_std:
            image = image + rng.normal(0.0, noise_std, image.shape).astype(np.float32)
        return {**item, "image": image.astype(np.float32)}

    return augment
