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
    np.testing.assert_array_equal(augment.flip_vertical(image), image[::-1])        # up-down, not left-right


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
def test_every_recipe_keeps_the_shape_and_gives_float32_within_0_255(images, kind):
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


def test_standard_crops_reach_all_81_corners_evenly_and_mirror_half_the_time():
    # An image that says where each pixel came from: channel 0 is its row + 1, channel 1 its column
    # + 1 (0 is the padding). The output's pixels (16, 16) and (16, 17) then give the crop's corner
    # and whether it was mirrored; over 8,100 examples, each of the (2 * 4 + 1) ** 2 corners should
    # come up ~100 times (a chi-square test) and about half the examples should be mirrored.
    rows, cols = np.meshgrid(np.arange(32) + 1, np.arange(32) + 1, indexing="ij")
    where = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)    # [32, 32, 3]
    n = 8100
    out = np.asarray(augment.augment_batch(keys(n, seed=3), np.broadcast_to(where, (n, 32, 32, 3)), "standard"))
    mirrored = out[:, 16, 17, 1] < out[:, 16, 16, 1]
    top = out[:, 16, 16, 0] - 1 - 12                                  # output row 16 = input row 12 + top
    left = out[:, 16, 16, 1] - 1 - np.where(mirrored, 11, 12)         # mirrored: output column 16 = crop's 15
    counts = np.zeros((9, 9))
    np.add.at(counts, (top.astype(int), left.astype(int)), 1)
    assert counts.min() > 0 and counts.sum() == n                     # every corner, and only those
    chi2 = ((counts - n / 81) ** 2 / (n / 81)).sum()                  # 80 degrees of freedom: mean 80, sd 12.6
    assert chi2 < 150, chi2
    assert abs(mirrored.mean() - 0.5) < 0.03                          # sd of the rate: 0.0056


def test_seed_recipe_is_torchvisions_compose_step_by_step():
    # The report's transforms, as torchvision runs them on a PIL image: RandomHorizontalFlip(0.5),
    # RandomRotation(15), RandomVerticalFlip(0.15), RandomRotation(15); each rotation is PIL's
    # Image.rotate(angle, NEAREST) with black corners. Our random draws are taken from the same keys
    # the recipe splits (hflip, angle, vflip, angle), so a wrong probability, angle range or order shows.
    Image = pytest.importorskip("PIL.Image")
    from minimobile.assets import load_cifar100_sample
    images = load_cifar100_sample()["image"][:64]
    example_keys = keys(len(images), seed=4)
    out = np.asarray(augment.augment_batch(example_keys, images, "seed")).astype(np.uint8)
    vflips = 0
    for key, image, result in zip(example_keys, images, out):
        hflip, angle1, vflip, angle2 = jax.random.split(key, 4)
        picture = Image.fromarray(image)
        if jax.random.uniform(hflip) < 0.5:
            picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
        picture = picture.rotate(float(jax.random.uniform(angle1, minval=-15, maxval=15)), resample=Image.NEAREST)
        if jax.random.uniform(vflip) < 0.15:
            picture, vflips = picture.transpose(Image.FLIP_TOP_BOTTOM), vflips + 1
        picture = picture.rotate(float(jax.random.uniform(angle2, minval=-15, maxval=15)), resample=Image.NEAREST)
        # Pixels whose source falls exactly between two may round the other way (see the PIL test above).
        assert (np.asarray(picture) == result).all(-1).mean() > 0.97
    assert 0 < vflips < len(images) / 2  # some flipped upside down, far from half


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
