"""Fields shared by every training config (see the README's table for LLaVA's train.py flags)."""
import os

import ml_collections

import llava_jax

PACKAGE_DIR = os.path.dirname(llava_jax.__file__)
LLAMA_TOKENIZER = os.path.join(PACKAGE_DIR, "assets", "llama_tokenizer")


def tiny_model(image_size=28, hidden=64, layers=2, vocab=32000, template="vicuna_v1", aspect="pad"):
  """A CPU-sized LLaVA (random init) with the real LLaMA tokenizer's vocabulary."""
  return ml_collections.ConfigDict(dict(
      vision=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=image_size, patch_size=14),
      text=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048),
      projector_type="mlp2x_gelu", vision_feature_layer=-2, vision_feature_select="patch",
      template=template, image_aspect_ratio=aspect))


# LLaMA-2 / Vicuna v1.5 shapes (LLaVA-1.5's LLMs) and LLaMA-1 / Vicuna v0-v1.1 (LLaVA v1).
LLM_SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}


def llava_model(llm: str = "7b", image_size=336, projector_type="mlp2x_gelu", template="vicuna_v1", aspect="pad",
                max_positions=4096):
  """A real LLaVA's shapes: CLIP ViT-L/14 (VisionConfig defaults) at `image_size`, a LLaMA `llm`, vocab 32000.

  Used only where there is no init model folder yet (the memory planner); a model folder's config.json wins.
  """
  shapes = LLM_SHAPES[llm]
  return ml_collections.ConfigDict(dict(
      vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=image_size, patch_size=14),
      text=dict(vocab_size=32000, num_key_value_heads=shapes["num_attention_heads"],
                max_position_embeddings=max_positions, **shapes),
      projector_type=projector_type, vision_feature_layer=-2, vision_feature_select="patch",
      template=template, image_aspect_ratio=aspect))


def data_files_field() -> ml_collections.FieldReference:
  """A path or a list of {path, image_folder, weight} dicts (README "Mixtures").

  Typed `object`: a "" default would lock the field to str. On the command line config_flags then reads the value
  as a Python literal (`--config.data.data_files="[{'path': 'a.json', 'weight': 2.0}]"`), keeping a plain path a
  string; JSON text (with null / true) stays a string and is parsed by the trainer."""
  return ml_collections.FieldReference("", field_type=object)


def base(stage: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.init_model = ""  # model folder to start from ('' = random init from `model`, for tiny/demo configs)
  c.model = tiny_model()
  c.tokenizer = LLAMA_TOKENIZER  # used with random init only; a model folder brings its own
  c.trainable = ()  # () = the stage's default: stage 1 projector; stage 2 projector + language_model
  c.seed = 0

  c.batch_size = 128  # global, all processes and micro-batches together
  c.accum_steps = 1
  c.num_epochs = 1.0
  c.num_train_steps = -1  # > 0 overrides num_epochs

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-5, warmup_ratio=0.03, warmup_steps=-1, schedule="cosine", weight_decay=0.0, b1=0.9,
      b2=0.999, eps=1e-8, max_grad_norm=1.0, state_dtype="float32"))

  c.data = ml_collections.ConfigDict(dict(
      data_files=data_files_field(), image_folder="", template="vicuna_v1", max_length=2048,
      length_buckets=(512, 1024, 1536, 2048), aspect="pad", seed=0, shuffle=True, group_by_modality_length=True,
      bad_input="skip", move_image_to_front=True, worker_count=0, read_threads=2))
  c.eval_data_files = data_files_field()  # held-out split (same image_folder)
  c.eval_every = 0
  c.eval_batch_size = 8

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.runtime = ml_collections.ConfigDict(dict(
      param_dtype="float32", dtype="bfloat16", attention_impl="", remat_policy="none", scan_layers=True,
      recompute_elementwise=True))
  c.loss_chunk = 1024

  c.log_every = 10
  c.checkpoint_every = 500
  c.checkpoint_keep = 3
  c.async_checkpoint = True
  return c


def make_tiny(c: ml_collections.ConfigDict, *, max_length: int, length_buckets: tuple[int, ...],
              template: str = "vicuna_v1", aspect: str = "pad") -> None:
  """The `tiny` preset: a random CPU-sized model, fp32, 20 steps of batch 8, frequent logs and checkpoints."""
  c.model = tiny_model(template=template, aspect=aspect)
  c.data.max_length = max_length
  c.data.length_buckets = length_buckets
  c.batch_size = 8
  c.optim.learning_rate = 1e-3
  c.runtime.dtype = "float32"
  c.num_train_steps = 20
  c.checkpoint_every = 10
  c.log_every = 5
