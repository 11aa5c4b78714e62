"""Training entry point.

    python -m llava_jax.main --config=configs/stage2.py:llava-v1.5-7b --workdir=runs/stage2 [--config.FIELD=VALUE]
    python -m llava_jax.main --config=configs/demo.py --workdir=/tmp/llava_demo

A config with `stage1` and `stage2` sub-configs (configs/demo.py) runs the whole demo: synthetic data, stage 1,
stage 2, and the held-out accuracy with and without the images.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from llava_jax import distributed
from llava_jax.data import records
from llava_jax.train import planner  # defines --plan_devices, --plan_device_memory_gib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path[:preset]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder: checkpoints, metrics, the trained model.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Plan memory: compile the sharded step without weights, print bytes.")


class ConfigError(ValueError):
  pass


def validate(config) -> None:
  """Checks that a training config can start; raises ConfigError saying what to do otherwise."""
  if config.init_model and not os.path.isdir(config.init_model):
    raise ConfigError(
        f"init_model {config.init_model!r} does not exist. Make it with the conversion CLI, e.g.\n"
        f"  stage 1: python -m llava_jax.convert assemble --vision CLIP_DIR --llm VICUNA_DIR "
        f"--projector-type mlp2x_gelu --output {config.init_model}\n"
        f"  stage 2: python -m llava_jax.convert assemble --vision CLIP_DIR --llm VICUNA_DIR "
        f"--projector STAGE1_WORKDIR/projector.safetensors --output {config.init_model}\n"
        f"  or from a released LLaVA: python -m llava_jax.convert from-hf SRC --output {config.init_model}")
  if not config.data.data_files:
    raise ConfigError("data.data_files is empty: set --config.data.data_files=PATH.json")
  try:
    files = records.parse_data_files(records.config_data_files(config.data.data_files, "data.data_files"))
  except ValueError as e:
    raise ConfigError(str(e)) from e
  for file in files:
    if not os.path.exists(file.path):
      raise ConfigError(f"data file {file.path!r} does not exist")
  if config.stage not in (1, 2):
    raise ConfigError(f"stage must be 1 or 2, got {config.stage}")
  if config.batch_size % config.accum_steps:
    raise ConfigError(f"batch_size {config.batch_size} is not a multiple of accum_steps {config.accum_steps}")


def run(config, workdir: str) -> int:
  if "stage1" in config and "stage2" in config:
    from llava_jax import demo  # pylint: disable=g-import-not-at-top
    return demo.run_demo(config, workdir)
  if _DRY_RUN.value:  # shapes only: needs neither the init model nor the data
    planner.print_plan(config)
    return 0
  validate(config)
  from llava_jax.train import trainer  # pylint: disable=g-import-not-at-top
  result = trainer.train(config, workdir)
  if result.interrupted:
    return 0
  if distributed.is_primary():
    print(f"trained {result.step} steps; model folder: {result.model_dir}", file=sys.stderr)
  return 0


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax and grain log every save at INFO; keep the console readable
    logging.set_verbosity(logging.WARNING)
  if _WORKDIR.value is None and not _DRY_RUN.value:
    raise app.UsageError("--workdir is required")
  if not _DRY_RUN.value:
    distributed.initialize()  # several processes (TPU pod, SLURM, launch/local.sh): join them first
  try:
    return run(_CONFIG.value, _WORKDIR.value)
  except ConfigError as err:
    logging.error("%s", err)
    print(f"config error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
