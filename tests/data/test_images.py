"""Image preprocessing against transformers' CLIP image processor (and LLaVA's expand2square for 'pad')."""
import io

import numpy as np
from PIL import Image
import pytest
import transformers
from transformers.image_transforms import convert_to_rgb

from llava_jax.data import images

SIZE = 336


def make_image(mode, width, height, seed):
  """A smooth random image of any PIL mode, with real alpha/transparency where the mode has one."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, size=(max(height // 8, 1), max(width // 8, 1), 4), dtype=np.uint8)
  rgba = Image.fromarray(small, "RGBA").resize((width, height), Image.Resampling.BILINEAR)
  noise = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
  if mode in ("RGBA", "LA", "PA"):
    alpha = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
    alpha[: height // 2] = 255  # half opaque, half random transparency
    rgba.putalpha(Image.fromarray(alpha))
    return rgba.convert(mode)
  if mode == "P_transparency":
    image = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    image.info["transparency"] = 3
    return image
  if mode == "I;16":
    return Image.fromarray((noise.astype(np.uint16) * 257))
  if mode == "I":
    return Image.fromarray(noise.astype(np.int32) * 3 - 100)
  if mode == "F":
    return Image.fromarray(noise.astype(np.float32) / 2 + 0.25)
  if mode == "1":
    return Image.fromarray(noise > 127)
  if mode == "CMYK":
    return Image.frombytes("CMYK", (width, height), rng.integers(0, 256, (height, width, 4), np.uint8).tobytes())
  return rgba.convert("RGB").convert(mode)  # RGB, L, P, YCbCr, LAB, HSV


# (mode, width, height): every mode, tiny, odd, square, very wide and very tall.
CASES = [
    ("RGB", 640, 480), ("RGB", 480, 640), ("RGB", 1, 1), ("RGB", 1, 2), ("RGB", 3, 1),
    ("RGB", SIZE, SIZE), ("RGB", 335, 337), ("RGB", 600, 5), ("RGB", 7, 700), ("RGB", 337, 336),
    ("RGBA", 500, 375), ("RGBA", 2, 2), ("LA", 300, 200), ("L", 211, 977), ("L", 1, 1), ("P", 400, 400),
    ("P_transparency", 123, 456), ("PA", 64, 40), ("CMYK", 256, 300), ("I;16", 100, 90), ("I", 77, 311),
    ("F", 50, 50), ("1", 333, 335), ("YCbCr", 720, 405), ("LAB", 90, 60), ("HSV", 45, 1000),
]


@pytest.fixture(scope="module")
def processor():
  transformers.logging.set_verbosity_error()  # the torchvision-missing notice
  return transformers.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size=SIZE, do_convert_rgb=True,
                                         image_mean=list(images.IMAGE_MEAN), image_std=list(images.IMAGE_STD))


def reference(processor, image):
  return processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def reference_expand2square(image, background):
  """LLaVA's expand2square (train.py), written from its description."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  result = Image.new(image.mode, (side, side), background)
  result.paste(image, ((side - width) // 2, 0) if height > width else (0, (side - height) // 2))
  return result


def test_defaults_are_clip_and_match_the_processor(processor):
  assert images.IMAGE_MEAN == tuple(transformers.image_utils.OPENAI_CLIP_MEAN)
  assert images.IMAGE_STD == tuple(transformers.image_utils.OPENAI_CLIP_STD)
  assert processor.resample == Image.Resampling.BICUBIC


@pytest.mark.parametrize("mode, width, height", CASES)
def test_square_equals_clip_image_processor(processor, mode, width, height):
  image = make_image(mode, width, height, seed=width * 7 + height)
  assert image.mode == mode.replace("P_transparency", "P")
  ours = images.preprocess_image(image, image_size=SIZE, aspect="square")
  assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, reference(processor, image), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode, width, height", CASES[::2])
def test_pad_equals_expand2square_then_processor(processor, mode, width, height):
  image = make_image(mode, width, height, seed=width + height)
  background = tuple(int(m * 255) for m in images.IMAGE_MEAN)
  assert background == (122, 116, 104)  # the spec's value
  expected = reference(processor, reference_expand2square(convert_to_rgb(image, return_numpy=False), background))
  ours = images.preprocess_image(image, image_size=SIZE, aspect="pad")
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_other_size_mean_and_std():
  mean, std = (0.5, 0.25, 0.75), (0.2, 0.3, 0.4)
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224, image_mean=list(mean),
                                              image_std=list(std))
  for mode, width, height in [("RGB", 640, 480), ("RGBA", 97, 300), ("L", 224, 224)]:
    image = make_image(mode, width, height, seed=1)
    ours = images.preprocess_image(image, image_size=224, mean=mean, std=std)
    np.testing.assert_allclose(ours, reference(processor, image), rtol=0, atol=1e-5)


def test_transparent_pixels_become_white():
  image = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
  assert images.to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
  assert images.to_rgb(Image.new("RGBA", (8, 8), (10, 200, 30, 255))).getpixel((0, 0)) == (10, 200, 30)


def test_bad_arguments():
  image = Image.new("RGB", (10, 10))
  with pytest.raises(ValueError, match="unknown image aspect 'crop'"):
    images.preprocess_image(image, aspect="crop")
  with pytest.raises(ValueError, match="3 values"):
    images.preprocess_image(image, mean=(0.5,), std=(0.5,))


# ----- load_image ------------------------------------------------------------------------------------------------


def test_load_image_decodes_files_and_bytes_as_rgb(tmp_path):
  rgba = make_image("RGBA", 40, 30, seed=0)
  rgba.save(tmp_path / "a.png")
  make_image("RGB", 40, 30, seed=1).save(tmp_path / "b.jpg", quality=90)
  make_image("CMYK", 20, 20, seed=2).save(tmp_path / "c.jpg")
  make_image("P_transparency", 16, 16, seed=3).save(tmp_path / "d.gif")
  make_image("L", 16, 16, seed=4).save(tmp_path / "e.webp")
  for name in ["a.png", "b.jpg", "c.jpg", "d.gif", "e.webp"]:
    path = tmp_path / name
    loaded = images.load_image(path)
    assert loaded.mode == "RGB"
    with Image.open(path) as original:
      expected = convert_to_rgb(original, return_numpy=True)
    np.testing.assert_array_equal(np.asarray(loaded), expected)
    np.testing.assert_array_equal(np.asarray(images.load_image(path.read_bytes())), expected)
    np.testing.assert_array_equal(np.asarray(images.load_image(str(path))), expected)


def test_load_image_errors_name_the_file(tmp_path):
  with pytest.raises(images.ImageError, match=r"missing\.jpg: image file not found") as err:
    images.load_image(tmp_path / "missing.jpg")
  assert err.value.path == str(tmp_path / "missing.jpg")
  assert isinstance(err.value, ValueError)

  (tmp_path / "text.jpg").write_text("not an image\n")
  with pytest.raises(images.ImageError, match=r"text\.jpg: cannot identify image file"):
    images.load_image(tmp_path / "text.jpg")

  buf = io.BytesIO()
  make_image("RGB", 200, 150, seed=5).save(buf, format="PNG")
  (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  with pytest.raises(images.ImageError, match=r"truncated\.png: cannot decode image"):
    images.load_image(tmp_path / "truncated.png")

  buf = io.BytesIO()
  make_image("RGB", 200, 150, seed=6).save(buf, format="JPEG")
  with pytest.raises(images.ImageError, match=r"<bytes>: cannot decode image"):
    images.load_image(buf.getvalue()[: len(buf.getvalue()) // 3])

  with pytest.raises(images.ImageError, match=r"<bytes>: cannot identify"):
    images.load_image(b"")
