"""The out-of-the-box demo: synthetic shapes data -> stage 1 -> stage 2 -> held-out accuracy, on CPU.

    python -m llava_jax.main --config=configs/demo.py --workdir=/tmp/llava_demo

Everything is made locally: the images and LLaVA-format data (`llava_jax.data.demo`), a small BPE tokenizer
trained on that text (the LLaMA tokenizer's normalizer, byte fallback and special tokens, with a 32k -> ~1k
vocabulary so the LM head of a tiny model is cheap on CPU; trained on the rendered prompts, so the system message
costs one token per word), and a randomly initialised tiny LLaVA written as stage 1's starting model folder (as
`convert assemble` makes one; its random vision tower has position embeddings large enough to say where each patch
is, see `write_init_model`). The two stages run through the same trainer as real runs; the final model answers the
held-out short questions greedily, once with the images and once with the images blanked (mean colour), which
shows the answers come from the pixels.
"""
from __future__ import annotations

import json
import os
import sys
import time

import ml_collections
import numpy as np

from llava_jax.data import demo as demo_data
from llava_jax.data import templates

_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def build_tokenizer(texts: list[str], out_dir: str, vocab_size: int) -> str:
  """Trains a LLaMA-style BPE tokenizer (same normalizer, byte fallback, <unk>/<s>/</s> = 0/1/2) on `texts`."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  base_dir = os.path.join(os.path.dirname(__file__), "assets", "llama_tokenizer")
  with open(os.path.join(base_dir, "tokenizer.json")) as f:
    spec = json.load(f)
  bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
  bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + _BYTE_TOKENS,
                                show_progress=False)
  bpe.train_from_iterator(texts, trainer)
  trained = json.loads(bpe.to_str())
  spec["model"]["vocab"] = trained["model"]["vocab"]
  spec["model"]["merges"] = trained["model"]["merges"]
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
    json.dump(spec, f, ensure_ascii=False)
  with open(os.path.join(base_dir, "tokenizer_config.json")) as f:
    tok_config = json.load(f)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(tok_config, f, indent=1)
  return out_dir


def _corpus(files: dict[str, str]) -> list[str]:
  """The text the model is trained on: {data file: template} -> every record rendered as its training prompt.

  The tokenizer learns from the prompts themselves (system message and roles included), so the fixed text each
  sample carries takes few tokens; `<image>` is cut out as the pipeline's encoder does.
  """
  texts = []
  for path, template_name in files.items():
    template = templates.get_template(template_name)
    with open(path) as f:
      for record in json.load(f):
        turns = [(t["from"], templates.move_image_to_front(t["value"])) for t in record["conversations"]]
        texts.extend(piece for piece in template.build_prompt(turns).split(templates.IMAGE_TAG) if piece)
  return texts


def _stage_config(stage_cfg: ml_collections.ConfigDict, data_file: str, image_folder: str, tokenizer: str,
                  vocab: int, init_model: str, workdir: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(stage_cfg.to_dict())
  c.data.data_files = data_file
  c.data.image_folder = image_folder
  c.tokenizer = tokenizer
  c.model.text.vocab_size = vocab
  c.init_model = init_model
  return c


def write_init_model(model_cfg: ml_collections.ConfigDict, tokenizer_dir: str, vocab: int, out_dir: str, *,
                     seed: int, position_std: float) -> str:
  """Stage 1's starting model folder, as `convert assemble` makes one: vision tower + LLM + fresh projector.

  There is no pretrained CLIP here, so the tower is random; its position embeddings are drawn with std
  `position_std` instead of CLIP's init (`clip.EMBEDDING_INIT_STD`, 0.02) so that, like a trained CLIP's, each
  patch feature says where the patch is (with 0.02 the patch content drowns the position and "where is it?"
  stays at chance).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  from llava_jax import model_folder  # pylint: disable=g-import-not-at-top
  from llava_jax.models import clip  # pylint: disable=g-import-not-at-top
  from llava_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from llava_jax.models.llava import LlavaModel  # pylint: disable=g-import-not-at-top
  cfg_dict = model_cfg.to_dict()
  cfg_dict["text"]["vocab_size"] = vocab
  cfg = ModelConfig.from_dict(cfg_dict)
  model = LlavaModel(cfg, rngs=nnx.Rngs(seed))
  embedding = model.vision_tower.position_embedding
  embedding.value = embedding.value * (position_std / clip.EMBEDDING_INIT_STD)
  model_folder.save_model_folder(out_dir, cfg, nnx.state(model, nnx.Param),
                                 tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), overwrite=True)
  return out_dir


def answer_questions(model_dir: str, questions: list[dict], image_folder: str, *, blank: bool,
                     batch_size: int = 32) -> dict:
  """Greedy short answers {question_id: text} for the held-out questions."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from llava_jax.generate import Generator  # pylint: disable=g-import-not-at-top
  gen = Generator.from_folder(model_dir)
  params = gen.params(max_new_tokens=6, temperature=0.0)
  out = {}
  for start in range(0, len(questions), batch_size):
    chunk = questions[start:start + batch_size]
    requests = []
    for q in chunk:
      image = Image.open(os.path.join(image_folder, q["image"])).convert("RGB")
      if blank:
        mean = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0))
        image = Image.new("RGB", image.size, mean)
      requests.append(gen.question("<image>\n" + q["text"], [image]))
    for q, result in zip(chunk, gen.generate(requests, params)):
      out[q["question_id"]] = result.text
  return out


def _final_loss(result, stage_dir: str) -> float | None:
  """The stage's last training loss; a stage resumed after its end trains nothing, so it is read from its metrics."""
  from llava_jax.train import metrics  # pylint: disable=g-import-not-at-top
  return result.losses[-1] if result.losses else metrics.last_logged(stage_dir, "loss")


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> int:
  from llava_jax.train import trainer  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  data_dir = os.path.join(workdir, "data")
  paths = demo_data.write_demo_dataset(data_dir, **config.demo_data.to_dict()) if not os.path.exists(
      os.path.join(data_dir, "heldout_answers.jsonl")) else {
          "stage1": os.path.join(data_dir, "stage1.json"), "stage2": os.path.join(data_dir, "stage2.json"),
          "heldout_questions": os.path.join(data_dir, "heldout_questions.jsonl"),
          "heldout_answers": os.path.join(data_dir, "heldout_answers.jsonl"),
          "image_folder": os.path.join(data_dir, "images")}
  tok_dir = os.path.join(workdir, "tokenizer")
  if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
    corpus = _corpus({paths["stage1"]: config.stage1.data.template, paths["stage2"]: config.stage2.data.template})
    build_tokenizer(corpus, tok_dir, config.tokenizer_vocab_size)
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  vocab = len(AutoTokenizer.from_pretrained(tok_dir))
  print(f"demo data in {data_dir}; tokenizer of {vocab} tokens", file=sys.stderr)

  stage1_dir, stage2_dir = os.path.join(workdir, "stage1"), os.path.join(workdir, "stage2")
  init_dir = os.path.join(workdir, "init_model")
  if not os.path.exists(os.path.join(init_dir, "config.json")):
    write_init_model(config.stage1.model, tok_dir, vocab, init_dir, seed=config.stage1.seed,
                     position_std=config.vision_position_std)
  s1 = _stage_config(config.stage1, paths["stage1"], paths["image_folder"], tok_dir, vocab, init_dir, stage1_dir)
  result1 = trainer.train(s1, stage1_dir)
  if result1.interrupted:
    return 0
  s2 = _stage_config(config.stage2, paths["stage2"], paths["image_folder"], tok_dir, vocab, result1.model_dir,
                     stage2_dir)
  result2 = trainer.train(s2, stage2_dir)
  if result2.interrupted:
    return 0

  with open(paths["heldout_questions"]) as f:
    questions = [json.loads(line) for line in f][:config.num_eval_questions]
  with open(paths["heldout_answers"]) as f:
    answers = [json.loads(line) for line in f]
  answers = [a for a in answers if a["question_id"] in {q["question_id"] for q in questions}]
  results = {}
  for blank in (False, True):
    predictions = answer_questions(result2.model_dir, questions, paths["image_folder"], blank=blank)
    results[blank] = (demo_data.score_short_answers(predictions, {a["question_id"]: a["answer"] for a in answers}),
                      demo_data.score_by_category(predictions, answers))
  summary = {"heldout_accuracy": results[False][0], "blank_image_accuracy": results[True][0],
             "by_category": results[False][1], "by_category_blank": results[True][1],
             "stage1_final_loss": _final_loss(result1, stage1_dir),
             "stage2_final_loss": _final_loss(result2, stage2_dir),
             "minutes": (time.perf_counter() - t0) / 60, "model": result2.model_dir}
  with open(os.path.join(workdir, "demo_result.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"\nheld-out accuracy: {100 * results[False][0]:.1f}% on {len(questions)} questions "
        f"(images blanked: {100 * results[True][0]:.1f}%)")
  for category, acc in sorted(results[False][1].items()):
    print(f"  {category:9s} {100 * acc:5.1f}%   blanked {100 * results[True][1].get(category, 0.0):5.1f}%")
  print(f"total time {summary['minutes']:.1f} min; model folder: {result2.model_dir}")
  return 0
