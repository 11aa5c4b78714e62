"""Stage 2 (visual instruction tuning): train the projector and the whole LLM; the vision tower stays frozen.

Presets (`--config=configs/stage2.py:PRESET`): llava-v1.5-7b, llava-v1.5-13b (scripts/v1_5/finetune.sh),
llava-v1-7b (the paper: LLaVA-Instruct-158K, batch 32, lr 2e-5, 3 epochs), tiny (CPU-sized).
"""
from configs import common


def get_config(preset: str = "tiny"):
  c = common.base(stage=2)
  c.data.template = "vicuna_v1"
  c.data.aspect = "pad"
  c.data.group_by_modality_length = True
  if preset in ("llava-v1.5-7b", "llava-v1.5-13b"):
    c.model = common.llava_model(preset.rsplit("-", 1)[1], template="vicuna_v1", aspect="pad")
    c.init_model = f"models/{preset}-stage2-init"  # `convert assemble ... --projector STAGE1/projector.safetensors`
    c.data.data_files = "data/llava_v1_5_mix665k.json"
    c.batch_size = 128
    c.optim.learning_rate = 2e-5
    c.num_epochs = 1.0
    # LLaVA's finetune.sh uses gradient checkpointing; without remat neither size fits (see the planner table).
    c.runtime.remat_policy = "full"
  elif preset == "llava-v1-7b":
    c.model = common.llava_model("7b", image_size=224, projector_type="linear", template="llava_v1",
                                 aspect="square", max_positions=2048)
    c.init_model = "models/llava-v1-7b-stage2-init"
    c.data.data_files = "data/llava_instruct_158k.json"
    c.data.aspect = "square"
    c.data.template = "llava_v1"
    c.data.group_by_modality_length = False
    c.batch_size = 32
    c.optim.learning_rate = 2e-5
    c.num_epochs = 3.0
    c.runtime.remat_policy = "full"
  elif preset == "tiny":
    common.make_tiny(c, max_length=192, length_buckets=(96, 192))
  else:
    raise ValueError(f"unknown preset {preset!r} (llava-v1.5-7b | llava-v1.5-13b | llava-v1-7b | tiny)")
  return c
