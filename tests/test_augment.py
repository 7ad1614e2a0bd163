"""Tests for minimobile.augment, mostly on real CIFAR-100 pictures, each against an independent oracle
(numpy's rot90, PIL's rotate as torchvision uses it, an exhaustive search over crops)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimobile import augment, data
from minimobile.errors import UserError


@pytest.fixture(scope="module")
def images(cifar_sample):
    return cifar_sample["image"][:16]  # [16, 32, 32, 3] uint8, real pictures


def keys(n: int, seed: int = 0) -> jax.Array:
    return augment.example_keys(jax.random.key(seed), jnp.arange(n))


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


def test_flipping_twice_is_the_identity(images):
    image = images[0]
    np.testing.assert_array_equal(augment.flip_horizontal(augment.flip_horizontal(image)), image)
    np.testing.assert_array_equal(augment.flip_vertical(augment.flip_vertical(image)), image)
    np.testing.assert_array_equal(augment.flip_horizontal(image), image[:, ::-1])  # left-right, not up-down


def test_rotation_by_zero_is_the_identity(images):
    np.testing.assert_array_equal(augment.rotate(images[0], 0.0), images[0])


def test_rotation_by_90_degrees_is_numpys_counter_clockwise_rot90(images):
    np.testing.assert_array_equal(augment.rotate(images[0], 90.0), np.rot90(images[0]))
    np.testing.assert_array_equal(augment.rotate(images[0], -90.0), np.rot90(images[0], k=-1))


def test_rotation_matches_pil_as_torchvision_uses_it(images):
    # torchvision's RandomRotation on a PIL image calls Image.rotate(angle, NEAREST, fillcolor=0).
    # Only pixels whose source position falls exactly halfway between two pixels may round the other way.
    Image = pytest.importorskip("PIL.Image")
    angles = np.random.default_rng(0).uniform(-15, 15, len(images))
    for image, angle in zip(images, angles):
        ours = np.asarray(augment.rotate(image, angle))
        theirs = np.asarray(Image.fromarray(image).rotate(angle, resample=Image.NEAREST))
        assert (ours == theirs).all(-1).mean() > 0.99, angle


def test_rotation_fills_the_corners_with_black(images):
    rotated = np.asarray(augment.rotate(np.full((32, 32, 3), 200, np.uint8), 15.0))
    assert (rotated[0, 0] == 0).all() and (rotated[16, 16] == 200).all()


def test_random_crop_is_a_window_of_the_zero_padded_image(images):
    padded = np.pad(images[0], ((4, 4), (4, 4), (0, 0)))
    corners = set()
    for i in range(40):
        crop = np.asarray(augment.random_crop(jax.random.key(i), images[0], pad=4))
        matches = [(t, l) for t in range(9) for l in range(9)
                   if np.array_equal(padded[t:t + 32, l:l + 32], crop)]
        assert matches, "the crop is not any window of the padded image"
        corners.add(matches[0])
    assert len(corners) > 10  # the window really moves
    np.testing.assert_array_equal(augment.random_crop(jax.random.key(0), images[0], pad=0), images[0])


# ----------------------------------------------------------------------------------------------------
# Recipes on batches
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", augment.AUGMENTATIONS)
def test_shape_dtype_and_scale(images, kind):
    out = augment.augment_batch(keys(len(images)), images, kind)
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 255


def test_none_is_the_identity(images):
    np.testing.assert_array_equal(augment.augment_batch(keys(len(images)), images, "none"), images)


def test_standard_is_a_crop_of_the_padded_image_maybe_mirrored(images):
    out = np.asarray(augment.augment_batch(keys(len(images)), images, "standard")).astype(np.uint8)
    flipped = 0
    for image, result in zip(images, out):
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        windows = [padded[t:t + 32, l:l + 32] for t in range(9) for l in range(9)]
        plain = any(np.array_equal(w, result) for w in windows)
        mirrored = any(np.array_equal(w[:, ::-1], result) for w in windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < len(images)  # about half are mirrored


def test_seed_recipe_only_moves_pixels_and_adds_black(images):
    # Flips and nearest-neighbour rotations copy pixels; they never invent a colour, except the
    # black (0) filled in at the corners.
    out = np.asarray(augment.augment_batch(keys(len(images)), images, "seed")).astype(np.uint8)
    for image, result in zip(images, out):
        colours = {tuple(p) for p in image.reshape(-1, 3)} | {(0, 0, 0)}
        assert {tuple(p) for p in result.reshape(-1, 3)} <= colours
    assert not np.array_equal(out, images)


@pytest.mark.parametrize("kind", ["standard", "seed"])
def test_each_example_gets_its_own_randomness(images, kind):
    same = np.repeat(images[:1], 8, axis=0)  # one picture, eight times
    out = np.asarray(augment.augment_batch(keys(8), same, kind))
    assert len({o.tobytes() for o in out}) > 1


@pytest.mark.parametrize("kind", ["standard", "seed"])
def test_same_keys_same_result_other_keys_other_result(images, kind):
    a = augment.augment_batch(keys(len(images), seed=1), images, kind)
    np.testing.assert_array_equal(a, augment.augment_batch(keys(len(images), seed=1), images, kind))
    assert not np.array_equal(a, augment.augment_batch(keys(len(images), seed=2), images, kind))


@pytest.mark.parametrize("kind", ["standard", "seed"])
def test_sharding_the_batch_does_not_change_the_result(images, kind):
    # Keys come from global positions, so augmenting 4 shards separately equals augmenting the whole.
    step_key = jax.random.key(5)
    whole = augment.augment_batch(augment.example_keys(step_key, jnp.arange(16)), images, kind)
    parts = [augment.augment_batch(augment.example_keys(step_key, 4 * s + jnp.arange(4)),
                                   images[4 * s:4 * s + 4], kind) for s in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_labels_are_untouched(images, cifar_sample):
    labels = cifar_sample["label"][:16].astype(np.int32)
    batch = data.gather_batch(images, labels, jnp.arange(16))
    batch = {**batch, "image": augment.augment_batch(keys(16), batch["image"], "seed")}
    np.testing.assert_array_equal(batch["label"], labels)


def test_unknown_kind_lists_the_choices(images):
    with pytest.raises(UserError, match="standard, seed, none"):
        augment.augment_batch(keys(2), images[:2], "autoaugment")


def test_normalize_gives_zero_mean_unit_std_per_channel(images):
    x = images.astype(np.float64)
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    out = np.asarray(augment.normalize(jnp.asarray(images), tuple(mean), tuple(std)))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (x - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(out.reshape(-1, 3).std(0), 1, atol=1e-4)
