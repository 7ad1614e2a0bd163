"""Data augmentation on the device: jitted, batched, and with each example's own randomness.

Every function here works on ONE image [H, W, 3] and is turned into a batched one with `jax.vmap`, the
way you would write it on paper and let JAX do the batching. Randomness comes from one PRNG key per
example, which the caller derives from the step's key and the example's position in the global batch
(`example_keys`). So an example is augmented the same way whether its batch runs on one device or is
split across eight: sharding changes where the work happens, never the result.

Recipes (`augment_batch(keys, images, kind)`):
  "standard": pad 4 pixels of zeros, take a random 32x32 crop, flip left-right half the time. The usual
              CIFAR recipe (He et al. 2016, "Deep Residual Learning", section 4.2).
  "seed":     the recipe of the report this project starts from, torchvision's
              RandomHorizontalFlip(0.5), RandomRotation(15), RandomVerticalFlip(0.15), RandomRotation(15),
              with torchvision's defaults: angle uniform in [-15, 15] degrees, nearest-neighbour
              sampling, corners filled with 0 (black).
  "none":     the images as they are.
Evaluation never augments; normalisation (`normalize`) comes after augmentation, in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minimobile.errors import UserError

AUGMENTATIONS = ("standard", "seed", "none")


# ----------------------------------------------------------------------------------------------------
# Building blocks: one image [H, W, C] in, one image of the same shape and dtype out.
# ----------------------------------------------------------------------------------------------------


def flip_horizontal(image: jax.Array) -> jax.Array:
    """Mirrors left-right: [H, W, C] -> [H, W, C]."""
    return image[:, ::-1]


def flip_vertical(image: jax.Array) -> jax.Array:
    """Mirrors upside-down: [H, W, C] -> [H, W, C]."""
    return image[::-1]


def random_crop(key: jax.Array, image: jax.Array, pad: int) -> jax.Array:
    """Pads `pad` zeros on every side, then cuts a window of the original size at a random place.

    The window's corner is uniform over all (2 * pad + 1) ** 2 positions, so the image moves by up to
    `pad` pixels in each direction and the edge that moves in is black.
    """
    h, w, _ = image.shape
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))  # [H + 2p, W + 2p, C]
    top, left = jax.random.randint(key, (2,), 0, 2 * pad + 1)
    # `dynamic_slice` because the corner is a traced value; the window's size stays static.
    return jax.lax.dynamic_slice(padded, (top, left, 0), (h, w, image.shape[2]))


def rotate(image: jax.Array, degrees) -> jax.Array:
    """Rotates counter-clockwise about the image centre, nearest-neighbour, outside filled with 0.

    Like torchvision's `F.rotate` (and PIL's `Image.rotate`) with their defaults: same size out,
    positive angles turn the picture counter-clockwise as you look at it. Written as a gather: for
    each output pixel, rotate its position BACK by `degrees` to find which input pixel lands there.
    """
    h, w, _ = image.shape
    theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    cy, cx = (h - 1) / 2, (w - 1) / 2  # the centre between pixels, as PIL and torchvision use it
    y, x = jnp.meshgrid(jnp.arange(h) - cy, jnp.arange(w) - cx, indexing="ij")  # [H, W] each
    # Rows grow downwards, so a counter-clockwise turn on screen is a clockwise one in (x, y) math;
    # its inverse, applied here, is this matrix. At 0 degrees it is exactly the identity.
    src_x = jnp.round(cx + cos * x - sin * y).astype(jnp.int32)
    src_y = jnp.round(cy + sin * x + cos * y).astype(jnp.int32)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)  # [H, W]
    pixels = image[jnp.clip(src_y, 0, h - 1), jnp.clip(src_x, 0, w - 1)]  # [H, W, C]
    return jnp.where(inside[..., None], pixels, jnp.zeros_like(pixels))


# ----------------------------------------------------------------------------------------------------
# Recipes: one key and one image in; `augment_batch` vmaps them over the batch.
# ----------------------------------------------------------------------------------------------------


def _standard(key: jax.Array, image: jax.Array) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    image = random_crop(crop_key, image, pad=4)
    return jnp.where(jax.random.bernoulli(flip_key, 0.5), flip_horizontal(image), image)


def _seed(key: jax.Array, image: jax.Array) -> jax.Array:
    # In the order torchvision's Compose applies them; each step sees the previous one's output, so
    # the second rotation also turns the black corners of the first.
    hflip, angle1, vflip, angle2 = jax.random.split(key, 4)
    image = jnp.where(jax.random.bernoulli(hflip, 0.5), flip_horizontal(image), image)
    image = rotate(image, jax.random.uniform(angle1, minval=-15.0, maxval=15.0))
    image = jnp.where(jax.random.bernoulli(vflip, 0.15), flip_vertical(image), image)
    return rotate(image, jax.random.uniform(angle2, minval=-15.0, maxval=15.0))


def example_keys(key: jax.Array, positions: jax.Array) -> jax.Array:
    """One key per example, from the step's key and each example's position in the global batch.

    positions: [B] int, e.g. `jnp.arange(B)` for the whole batch or the shard's slice of it; the same
    position always gets the same key, whichever device it lands on.
    """
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, positions)


@functools.partial(jax.jit, static_argnames="kind")
def augment_batch(keys: jax.Array, images: jax.Array, kind: str) -> jax.Array:
    """Augments each example with its own key: [B] keys, [B, H, W, 3] uint8 -> [B, H, W, 3] float32.

    The result stays on the 0..255 scale; `normalize` comes next. `kind` is static: each recipe
    compiles to its own program, with no branching left at run time.
    """
    recipes = {"standard": _standard, "seed": _seed}
    if kind not in AUGMENTATIONS:
        raise UserError(f"Unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}.")
    if kind != "none":
        # Work on the uint8 pixels (4x less memory traffic than float32), convert once at the end.
        images = jax.vmap(recipes[kind])(keys, images)
    return images.astype(jnp.float32)


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """(x - mean) / std per channel: [..., 3] on the 0..255 scale -> float32, about zero mean, unit std."""
    mean = jnp.asarray(mean, jnp.float32)  # [3], broadcasts over the last (channel) axis
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std
