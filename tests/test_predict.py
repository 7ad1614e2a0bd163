"""predict's image reader: any image file becomes the [H, W, 3] uint8 RGB picture the network was trained on.

(That predict's answers are the network's, and agree with evaluate, is checked in test_train.py.)
"""

import numpy as np
import pytest
from PIL import Image

from minimobile.errors import UserError
from minimobile.predict import read_image


def test_an_image_of_the_training_size_is_read_back_exactly(tmp_path, cifar_sample):
    picture = cifar_sample["image"][0]                                     # a real CIFAR image, 32x32
    Image.fromarray(picture).save(tmp_path / "apple.png")
    np.testing.assert_array_equal(read_image(tmp_path / "apple.png", (32, 32)), picture)


def test_downsampling_keeps_a_linear_ramp_linear(tmp_path):
    # Bilinear filtering reproduces a linear function: the value at each output pixel's centre.
    # Input pixel x holds 4x; output pixel j (half as many) is centred on input position 2j + 0.5.
    ramp = np.tile((4 * np.arange(64)).astype(np.uint8)[None, :, None], (48, 1, 3))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    got = read_image(tmp_path / "ramp.png", (24, 32))                     # (height, width)
    assert got.shape == (24, 32, 3) and got.dtype == np.uint8
    expected = 4 * (2 * np.arange(32) + 0.5)
    np.testing.assert_array_equal(got[:, 1:-1, :], np.broadcast_to(expected[None, 1:-1, None], (24, 30, 3)))
    assert np.all(np.abs(got[:, [0, -1], :] - expected[[0, -1], None]) <= 1)  # the edges: half a filter


def test_downsampling_is_bilinear_an_impulse_spreads_over_its_four_neighbours(tmp_path):
    # Halving a width, PIL's bilinear filter (its triangle stretched to the scale) weights input columns
    # 2j-1 .. 2j+2 by 1/8, 3/8, 3/8, 1/8. A linear ramp cannot tell that from bicubic; an impulse can.
    column = np.zeros(16)
    column[6] = 240
    Image.fromarray(np.broadcast_to(column.astype(np.uint8)[None, :, None], (8, 16, 3)).copy()).save(tmp_path / "i.png")
    weights = (1 / 8, 3 / 8, 3 / 8, 1 / 8)
    expected = [sum(wk * column[c] for wk, c in zip(weights, range(2 * j - 1, 2 * j + 3)) if 0 <= c < 16)
                for j in range(8)]                                          # [0, 0, 30, 90, 0, 0, 0, 0]
    np.testing.assert_array_equal(read_image(tmp_path / "i.png", (8, 8))[..., 0], np.tile(expected, (8, 1)))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grey_rgba_and_palette_images_become_the_rgb_they_show(tmp_path, cifar_sample, mode):
    picture = cifar_sample["image"][1]
    shown = {"L": np.repeat(np.asarray(Image.fromarray(picture).convert("L"))[..., None], 3, axis=-1),
             "RGBA": picture}
    image = Image.fromarray(picture).convert(mode)
    image.save(tmp_path / "picture.png")
    if mode == "P":  # a palette image shows each pixel's palette colour
        shown["P"] = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)[np.asarray(image)]
    np.testing.assert_array_equal(read_image(tmp_path / "picture.png", (32, 32)), shown[mode])


def test_a_16_bit_image_is_the_8_bit_picture_it_shows(tmp_path, cifar_sample):
    # PIL's own conversion clips 16-bit samples at 255: every pixel would come out white.
    grey = np.asarray(Image.fromarray(cifar_sample["image"][2]).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # 255 * 257 = 65535
    np.testing.assert_array_equal(read_image(tmp_path / "grey16.png", (32, 32)), np.repeat(grey[..., None], 3, -1))


def test_a_photo_is_turned_upright_as_its_exif_orientation_says(tmp_path, cifar_sample):
    # A phone stores a photo as its sensor saw it, and a tag saying how to turn it to show it upright.
    picture = cifar_sample["image"][3]
    stored = Image.fromarray(np.rot90(picture, k=1))       # turned a quarter anticlockwise on the sensor
    exif = stored.getexif()
    exif[0x0112] = 6                                       # "rotate 90 degrees clockwise to show"
    stored.save(tmp_path / "photo.png", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "photo.png", (32, 32)), picture)


def test_a_very_large_photo_is_read_without_a_decompression_bomb_warning(tmp_path, monkeypatch):
    # PIL warns above MAX_IMAGE_PIXELS (89 M pixels: a 13,000 x 7,000 panorama), to protect servers.
    import warnings

    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "panorama.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # so 64 pixels warn (and 80 would be refused)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(read_image(tmp_path / "panorama.png", (4, 4)) == 200)


def test_what_is_not_an_image_is_one_sentence(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("not a picture")
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "depth.tiff")  # 16 pixels: not too large
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # PIL refuses above twice this: 32 < 64 pixels
    for path, message in [(tmp_path / "missing.png", "no image at .*; check the path"),
                          (tmp_path / "notes.txt", "is not an image PIL can read"),
                          (tmp_path, r"is a folder; name its images instead \(e.g. .*/\*.png\)"),
                          (tmp_path / "depth.tiff", "floating-point pixels, whose range is not known"),
                          (tmp_path / "huge.png", "has more than the 32 pixels PIL opens safely; downscale it")]:
        with pytest.raises(UserError, match=message):
            read_image(path, (32, 32))


def test_the_command_prints_the_five_likeliest_classes_by_name_likeliest_first(tmp_path, monkeypatch, capsys):
    # No model: predict's probabilities are given (no two alike), so the printing alone is checked, by hand.
    from minimobile import predict as predict_cli

    names = [f"class{k}" for k in range(8)]
    probs = np.array([[0.06, 0.40, 0.01, 0.20, 0.02, 0.15, 0.12, 0.04]], np.float32)
    monkeypatch.setattr(predict_cli, "load_run_config",
                        lambda workdir: (None, {"image_shape": [32, 32, 3], "class_names": names}))
    asked = {}

    def given_probabilities(workdir, images, which):
        asked.update(shape=images.shape, which=which)
        return probs, names

    monkeypatch.setattr(predict_cli, "predict", given_probabilities)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    predict_cli.main(["--workdir", "w", "--checkpoint", "best", str(tmp_path / "a.png")])
    assert asked == {"shape": (1, 32, 32, 3), "which": "best"}
    assert capsys.readouterr().out == (f"{tmp_path / 'a.png'}: class1 40.0 %, class3 20.0 %, class5 15.0 %, "
                                       "class6 12.0 %, class0 6.0 %\n")
