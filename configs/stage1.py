"""Stage 1 (feature alignment): train the projector only.

Presets (`--config=configs/stage1.py:PRESET`): llava-v1.5-7b, llava-v1.5-13b (scripts/v1_5/pretrain.sh),
llava-v1-7b (the paper: linear projector, CLIP-L/14 at 224 px, lr 2e-3, batch 128), tiny (CPU-sized).
"""
from configs import common


def get_config(preset: str = "tiny"):
  c = common.base(stage=1)
  c.data.template = "plain"
  c.data.aspect = "square"
  c.data.group_by_modality_length = False
  c.optim.weight_decay = 0.0
  c.optim.warmup_ratio = 0.03
  if preset in ("llava-v1.5-7b", "llava-v1.5-13b"):
    c.model = common.llava_model(preset.rsplit("-", 1)[1], template="plain", aspect="square")
    c.init_model = f"models/{preset}-stage1-init"  # `python -m llava_jax.convert assemble ...` writes it
    c.data.data_files = "data/blip_laion_cc_sbu_558k/blip_laion_cc_sbu_558k.json"
    c.batch_size = 256
    c.optim.learning_rate = 1e-3
    c.num_epochs = 1.0
  elif preset == "llava-v1-7b":
    c.model = common.llava_model("7b", image_size=224, projector_type="linear", template="plain",
                                 aspect="square", max_positions=2048)
    c.init_model = "models/llava-v1-7b-stage1-init"
    c.data.data_files = "data/cc3m_595k/chat.json"
    c.batch_size = 128
    c.optim.learning_rate = 2e-3
    c.num_epochs = 1.0
  elif preset == "tiny":
    common.make_tiny(c, template="plain", aspect="square", max_length=128, length_buckets=(64, 128))
  else:
    raise ValueError(f"unknown preset {preset!r} (llava-v1.5-7b | llava-v1.5-13b | llava-v1-7b | tiny)")
  return c
