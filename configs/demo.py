"""The out-of-the-box demo: stage 1 then stage 2 of a tiny LLaVA on the built-in synthetic shapes data (CPU).

    python -m llava_jax.main --config=configs/demo.py --workdir=/tmp/llava_demo
"""
import ml_collections

from configs import common


def _stage(stage: int, steps: int, lr: float, template: str, aspect: str, max_length: int, buckets):
  c = common.base(stage=stage)
  c.model = common.tiny_model(image_size=56, hidden=128, layers=2, template=template, aspect=aspect)
  c.model.text.num_hidden_layers = 3
  c.data.template = template
  c.data.aspect = aspect
  c.data.max_length = max_length
  c.data.length_buckets = buckets
  c.data.group_by_modality_length = True  # length-sorted megabatches: most batches use the short bucket
  c.batch_size = 16
  c.num_train_steps = steps
  c.optim.learning_rate = lr
  c.optim.warmup_ratio = 0.05
  c.runtime.dtype = "float32"
  c.loss_chunk = 256
  c.log_every = 10
  c.checkpoint_every = 100
  c.checkpoint_keep = 1
  return c


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.demo_data = ml_collections.ConfigDict(dict(seed=0, num_stage1=2000, num_stage2=4000, num_heldout=300,
                                               image_size=56))
  c.tokenizer_vocab_size = 1000
  c.num_eval_questions = 300
  c.vision_position_std = 0.5  # the random vision tower's position embeddings (see llava_jax.demo.write_init_model)
  c.stage1 = _stage(1, steps=120, lr=1e-3, template="plain", aspect="square", max_length=64, buckets=(64,))
  c.stage2 = _stage(2, steps=1000, lr=1e-3, template="vicuna_v1", aspect="pad", max_length=192,
                    buckets=(112, 144, 192))

  return c
