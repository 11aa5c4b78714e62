"""Image loading and CLIP preprocessing, channels last for JAX.

`preprocess_image` gives the output of `transformers.CLIPImageProcessor` (do_convert_rgb, bicubic resize of the
shortest edge, centre crop, rescale by 1/255, normalise) transposed to `[S, S, 3]`, and with `aspect='pad'` that
of LLaVA's `expand2square` (pad to a square with the mean colour) followed by the processor -- LLaVA-1.5's
stage-2 setting (`image_aspect_ratio pad`).

It is faster than the processor because it stays in PIL's uint8 until the end (no copies between PIL and
numpy, no float64 pass) and fuses rescale and normalise into one float32 multiply-add.

Modes other than RGB are converted as the processor's `convert_to_rgb` does: images with an alpha band or a
transparency key are composited onto white, others go through `Image.convert('RGB')`. (LLaVA's own training
code calls `.convert('RGB')` first, which drops the alpha band instead of compositing; the two differ only on
transparent pixels.)
"""
from __future__ import annotations

import functools
import io
import os

import numpy as np
from PIL import Image

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
  """An image that cannot be used: missing, undecodable or truncated. `path` names the file ('<bytes>' if none)."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason


def load_image(source: str | os.PathLike | bytes) -> Image.Image:
  """Decodes an image file (path) or encoded bytes fully, as RGB.

  Raises:
    ImageError: the file is missing or unreadable, is not an image, or is truncated or corrupt.
  """
  name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
  try:
    if name == "<bytes>":
      image = Image.open(io.BytesIO(source))
    else:
      image = Image.open(name)
    with image:
      image.load()  # Decode now: truncated and corrupt files fail here, not later in a worker.
      return to_rgb(image)
  except FileNotFoundError:
    raise ImageError(name, "image file not found") from None
  except Image.UnidentifiedImageError:
    raise ImageError(name, "cannot identify image file (not an image, or an unsupported format)") from None
  except Image.DecompressionBombError as e:
    raise ImageError(name, f"image too large: {e}") from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    # PIL reports truncated or corrupt data as OSError ("image file is truncated"), SyntaxError or ValueError.
    raise ImageError(name, f"cannot decode image ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB as `CLIPImageProcessor(do_convert_rgb=True)` makes it (transparency composited onto white)."""
  if image.mode == "RGB":
    return image
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
  """LLaVA's `expand2square`: the image centred on a square canvas of its longer side, filled with `background`."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = Image.new(image.mode, (side, side), background)
  canvas.paste(image, ((side - width) // 2, (side - height) // 2))
  return canvas


def resize_shortest_edge_and_crop(image: Image.Image, size: int,
                                  resample: int = Image.Resampling.BICUBIC) -> Image.Image:
  """Resize so the shorter side is `size` (the longer one rounded down, as transformers does), then take the
  centred `size` x `size` crop (offsets rounded down)."""
  width, height = image.size
  if width <= height:
    new_width, new_height = size, int(size * height / width)
  else:
    new_width, new_height = int(size * width / height), size
  # PIL's `box` argument would resample only the crop's window, but it takes float32 coordinates, which moves
  # the filter taps enough to change some pixels by one level: resize the whole image, then crop.
  resized = image.resize((new_width, new_height), resample=resample)
  left, top = (new_width - size) // 2, (new_height - size) // 2
  return resized.crop((left, top, left + size, top + size))


def preprocess_image(image: Image.Image, *, image_size: int = 336, aspect: str = "square",
                     mean: tuple[float, ...] = IMAGE_MEAN, std: tuple[float, ...] = IMAGE_STD,
                     resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
  """CLIP preprocessing of one image.

  Args:
    image: any PIL image (any mode, any size).
    image_size: output side S.
    aspect: 'square' (CLIP processor: shortest edge to S, centre crop) or 'pad' (LLaVA's expand2square with the
      mean colour `int(m * 255)` first, then the same).
    mean, std: per-channel normalisation (CLIP's by default).
    resample: PIL filter (bicubic, as CLIP).

  Returns:
    float32[S, S, 3], `(pixel / 255 - mean) / std`.
  """
  if image.width < 1 or image.height < 1:
    raise ValueError(f"empty image of size {image.size}")
  image = to_rgb(image)
  if aspect == "pad":
    image = expand_to_square(image, tuple(int(m * 255) for m in mean))
  elif aspect != "square":
    raise ValueError(f"unknown image aspect {aspect!r} (expected 'square' or 'pad')")
  pixels = np.asarray(resize_shortest_edge_and_crop(image, image_size, resample))
  scale, shift = _affine(image_size, tuple(map(float, mean)), tuple(map(float, std)))
  out = np.multiply(pixels.reshape(-1), scale, dtype=np.float32)
  out -= shift
  return out.reshape(image_size, image_size, 3)


@functools.lru_cache(maxsize=16)
def _affine(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
  """`(x / 255 - mean) / std = x * scale - shift`, with scale and shift tiled over every pixel: float32[S * S * 3].

  Tiled rather than broadcast over the channel axis: numpy's inner loop over a length-3 axis is ~10x slower.
  """
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f"mean and std need 3 values, got {mean} and {std}")
  mean64, std64 = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  scale = np.tile((1.0 / (255.0 * std64)).astype(np.float32), image_size * image_size)
  shift = np.tile((mean64 / std64).astype(np.float32), image_size * image_size)
  scale.flags.writeable = shift.flags.writeable = False
  return scale, shift
