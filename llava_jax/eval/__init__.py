"""Evaluation: LLaVA-Bench LLM judge (`judge`), ScienceQA (`scienceqa`) and POPE (`pope`) scoring.

Model answers come from `python -m llava_jax.eval.answer` in LLaVA's `model_vqa` format (one JSON line per
question: question_id, prompt, text, answer_id, model_id, metadata).
"""
