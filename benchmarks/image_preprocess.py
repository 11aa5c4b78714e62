r"""Images/s of CLIP preprocessing: `llava_jax.data.images.preprocess_image` against transformers' processor.

Both sides get the same decoded RGB PIL images of random sizes and produce one `float32` array per image
(ours `[S, S, 3]`, transformers' `[3, S, S]`), one image per call as a data pipeline worker does. 'pad' is
LLaVA's expand2square followed by the processor on both sides. Single process, single thread.

  python benchmarks/image_preprocess.py --num_images=200 --image_size=336
"""
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image
import transformers

from llava_jax.data import images

_NUM_IMAGES = flags.DEFINE_integer("num_images", 200, "Number of random-size images.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 336, "Output side.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes over the images; the best is reported.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the image sizes and pixels.")


def make_images(num: int, seed: int) -> list[Image.Image]:
  """Smooth random RGB images, each side uniform in 160..1280 px (aspect ratios up to 8:1)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    w, h = (int(x) for x in rng.integers(160, 1281, size=2))
    small = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
    out.append(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))
  return out


def best_rates(fns: dict, data, repeats: int) -> dict:
  """Images/s of each function: best of `repeats` passes, the functions' passes interleaved so that a busy
  machine slows them alike."""
  for fn in fns.values():
    fn(data[0])  # warm-up
  best = {name: float("inf") for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      for x in data:
        fn(x)
      best[name] = min(best[name], time.perf_counter() - start)
  return {name: len(data) / t for name, t in best.items()}


def main(argv):
  del argv
  transformers.logging.set_verbosity_error()
  size = _IMAGE_SIZE.value
  data = make_images(_NUM_IMAGES.value, _SEED.value)
  kwargs = dict(size={"shortest_edge": size}, crop_size=size, do_convert_rgb=True,
                image_mean=list(images.IMAGE_MEAN), image_std=list(images.IMAGE_STD))
  processors = {"CLIPImageProcessor (PIL backend)": transformers.CLIPImageProcessorPil(**kwargs)}
  try:
    import torchvision  # noqa: F401  (the default/fast processor needs it)
    processors["CLIPImageProcessor (torchvision backend)"] = transformers.CLIPImageProcessor(**kwargs)
  except ImportError:
    print("torchvision is not installed: the torchvision ('fast') CLIPImageProcessor is not measured.")
  background = tuple(int(m * 255) for m in images.IMAGE_MEAN)

  rows = []
  for aspect in ("square", "pad"):
    prep = (lambda im: im) if aspect == "square" else (lambda im: images.expand_to_square(im, background))
    fns = {"llava_jax preprocess_image":
           lambda im, aspect=aspect: images.preprocess_image(im, image_size=size, aspect=aspect)}
    for name, proc in processors.items():
      fns[name] = lambda im, proc=proc, prep=prep: proc(prep(im), return_tensors="np")["pixel_values"]
    rates = best_rates(fns, data, _REPEATS.value)
    ours = rates.pop("llava_jax preprocess_image")
    rows.append((aspect, "llava_jax preprocess_image", ours, None))
    rows.extend((aspect, name, rate, ours / rate) for name, rate in rates.items())

  print(f"\n{len(data)} images, {size} px output, best of {_REPEATS.value} passes, 1 thread")
  print(f"{'aspect':<8}{'implementation':<42}{'images/s':>10}{'ours / it':>11}")
  for aspect, name, rate, ratio in rows:
    print(f"{aspect:<8}{name:<42}{rate:>10.1f}{'' if ratio is None else f'{ratio:.2f}x':>11}")


if __name__ == "__main__":
  app.run(main)
