"""`python -m minimobile.predict --workdir W IMAGE...`: the five most likely classes of each image.

    python -m minimobile.predict --workdir runs/default photo.jpg cat.png

Each image is resized to the training resolution (32x32 for CIFAR), normalised with the training
set's mean and std saved in the workdir, and classified by the latest (or `--checkpoint best`) model.
"""

from __future__ import annotations

import pathlib
import warnings

import jax
import numpy as np

from minimobile import augment as augment_lib
from minimobile import steps
from minimobile.checkpoint import Checkpoints
from minimobile.errors import ArgumentParser, UserError, exit_on_user_error
from minimobile.evaluate import abstract_state, load_run_config, restore


def read_image(path: str | pathlib.Path, size: tuple[int, int]) -> np.ndarray:
    """An image file as [H, W, 3] uint8 RGB at `size` (bilinear, like the usual downsampling to CIFAR).

    Turned upright first, as a phone photo is shown (its EXIF orientation); 16-bit samples are scaled
    to 8 bits (PIL's own conversion would clip them at 255: a white picture).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Above 89 M pixels PIL warns of a "decompression bomb": a concern for servers, not for
            # someone classifying their own photo. Above twice that it refuses, which we say below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened)  # a new image, read in full: the file can close
            if image.mode == "F":
                raise UserError(f"{path} has floating-point pixels, whose range is not known; save it as an 8- "
                                "or 16-bit PNG, or a JPEG.")
            if image.mode.startswith("I"):  # I;16, I;16B, I: 16-bit samples, 0 .. 65535
                image = Image.fromarray(np.clip(np.round(np.asarray(image, np.float64) / 257), 0, 255).astype(np.uint8))
            return np.asarray(image.convert("RGB").resize(size[::-1], Image.BILINEAR), np.uint8)
    except FileNotFoundError:
        raise UserError(f"no image at {path}; check the path.") from None
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image PIL can read (try PNG or JPEG).") from None
    except Image.DecompressionBombError:
        raise UserError(f"{path} has more than the {2 * Image.MAX_IMAGE_PIXELS:,} pixels PIL opens safely; "
                        "downscale it first.") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; name its images instead (e.g. {path}/*.png).") from None
    except OSError as e:  # no permission, a truncated file
        raise UserError(f"cannot read {path} ({e.strerror or e}).") from None


def predict(workdir: str | pathlib.Path, images: np.ndarray, which: str = "latest") -> tuple[np.ndarray, list[str]]:
    """Class probabilities [N, K] for images [N, H, W, 3] uint8, and the class names."""
    config, info = load_run_config(workdir)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        state, _ = restore(checkpoints, abstract_state(config, info, one_device), which)
    finally:
        checkpoints.close()

    mean, std = steps.input_normalization(config, info["mean"], info["std"])  # exactly as in training

    @jax.jit
    def probabilities(state, images):
        x = augment_lib.normalize(images.astype(np.float32), mean, std)
        logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
        return jax.nn.softmax(logits)

    return np.asarray(probabilities(state, images)), list(info["class_names"])


@exit_on_user_error
def main(argv=None) -> None:
    p = ArgumentParser(prog="python -m minimobile.predict", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the training run's directory")
    p.add_argument("--checkpoint", default="latest", help="'latest', 'best', or a step number")
    p.add_argument("images", nargs="+", help="image files (any size; resized to the training resolution)")
    args = p.parse_args(argv)
    _, info = load_run_config(args.workdir)
    size = tuple(info["image_shape"][:2])
    batch = np.stack([read_image(path, size) for path in args.images])
    probs, names = predict(args.workdir, batch, args.checkpoint)
    for path, p_image in zip(args.images, probs):
        top5 = np.argsort(-p_image)[:5]
        print(f"{path}: " + ", ".join(f"{names[k]} {100 * p_image[k]:.1f} %" for k in top5))


if __name__ == "__main__":
    main()
