"""The out-of-the-box demo command, in a small form (a few steps; the full run is `configs/demo.py` as is)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_command_runs_both_stages_and_reports_accuracy(tmp_path):
  args = [sys.executable, "-m", "llava_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
          "--config.stage1.num_train_steps=3", "--config.stage2.num_train_steps=3", "--config.num_eval_questions=6",
          "--config.demo_data.num_stage1=48", "--config.demo_data.num_stage2=48", "--config.demo_data.num_heldout=12",
          "--config.tokenizer_vocab_size=400"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "held-out accuracy:" in out.stdout and "images blanked:" in out.stdout
  result = json.load(open(tmp_path / "demo_result.json"))
  assert 0.0 <= result["heldout_accuracy"] <= 1.0 and set(result["by_category"]) >= {"color", "shape", "all"}
  for stage in ("stage1", "stage2"):
    rows = [json.loads(l) for l in open(tmp_path / stage / "metrics.jsonl")]
    assert rows[-1]["step"] == 3 and {"loss", "learning_rate", "grad_norm", "tokens_per_second"} <= set(rows[-1])
  cfg = json.load(open(tmp_path / "stage2" / "model" / "config.json"))["model"]
  assert cfg["template"] == "vicuna_v1" and cfg["image_aspect_ratio"] == "pad"

  # The same command again resumes both finished stages (nothing is retrained) and reports the same accuracy.
  again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  resumed = json.load(open(tmp_path / "demo_result.json"))
  for key in ("heldout_accuracy", "stage1_final_loss", "stage2_final_loss"):
    assert resumed[key] == result[key], key
  assert isinstance(resumed["stage1_final_loss"], float)
  for stage in ("stage1", "stage2"):
    rows = [json.loads(l) for l in open(tmp_path / stage / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r][-1] == 3 and len([r for r in rows if r["step"] == 3]) == 1
