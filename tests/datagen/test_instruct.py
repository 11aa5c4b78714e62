"""`python -m llava_jax.datagen instruct` against a local HTTP server: the requests (system message, few-shot
examples, context with normalised boxes), reply parsing, malformed replies and 429/500 retries counted, the
output counts, and a restart after a killed run that does not repeat finished images."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from llava_jax import llm_client
from llava_jax.datagen import __main__ as datagen_main
from llava_jax.datagen import instruct, prompt_files
from llava_jax.llm_client_testing import FakeChatServer, FakeResponse

NUM_IMAGES = 8  # ids 1..8; image 8 has no caption
MALFORMED_IMAGE = 3


def write_coco(folder):
  images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(1, NUM_IMAGES + 1)]
  captions = {"images": images, "annotations": [
      {"id": 1000 + 10 * i + k, "image_id": i, "caption": f"Image {i} caption {k}. "}
      for i in range(1, NUM_IMAGES) for k in range(2)]}
  instances = {"images": images, "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 18, "bbox": [64, 48, 256, 192]},
                               {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 640, 480]},
                               {"id": 3, "image_id": 2, "category_id": 1, "bbox": [100, 50, 33.3, 77.7]}]}
  paths = folder / "captions.json", folder / "instances.json"
  paths[0].write_text(json.dumps(captions))
  paths[1].write_text(json.dumps(instances))
  return paths


def _image_of(body):
  return int(re.match(r"Image (\d+) caption", body["messages"][-1]["content"]).group(1))


def responder(fail_first=None, delay_s=0.0):
  """Replies in the format of the request's kind; image 3 gets a malformed reply; `fail_first` {image: status}."""
  seen = set()
  systems = {k: prompt_files.load_kind(k).system_message for k in prompt_files.KINDS}

  def respond(body, index):
    del index
    kind = next(k for k, s in systems.items() if body["messages"][0]["content"] == s)
    image = _image_of(body)
    if fail_first and image in fail_first and (kind, image) not in seen:
      seen.add((kind, image))
      return FakeResponse(status=fail_first[image])
    if image == MALFORMED_IMAGE:
      text = "" if kind == "detail" else "Sure! Here is a conversation about the image."
    elif kind == "detail":
      text = f"A detailed description of image {image}."
    else:
      text = "\n===\n".join(f"Question:\nQ{j} about image {image}?\n===\nAnswer:\nA{j} for image {image}."
                            for j in range(1 if kind == "complex" else 3))
    return FakeResponse(content=text, delay_s=delay_s)

  return respond


def _argv(caps, inst, kind, out, server, *extra):
  return ["instruct", "--captions", str(caps), "--instances", str(inst), "--kind", kind, "--output", str(out),
          "--base-url", server.base_url, "--model", "gpt-test", "--max-workers", "3", "--backoff-initial",
          "0.001", "--backoff-max", "0.01", "--image-prefix", "coco/", *extra]


def test_load_coco_and_context(tmp_path):
  caps, inst = write_coco(tmp_path)
  images, counts = instruct.load_coco(str(caps), str(inst))
  assert counts == {"images": NUM_IMAGES, "skipped_no_caption": 1}
  assert [im.image_id for im in images] == list(range(1, NUM_IMAGES))
  # bbox [x, y, w, h] = [64, 48, 256, 192] in 640x480 -> [0.1, 0.1, 0.5, 0.5]; [100, 50, 33.3, 77.7] ->
  # [0.156, 0.104, 0.208, 0.266] (rounded to 3 decimals).
  assert images[0].boxes == (("dog", (0.1, 0.1, 0.5, 0.5)), ("person", (0.0, 0.0, 1.0, 1.0)))
  assert images[1].boxes == (("person", (0.156, 0.104, 0.208, 0.266)),)
  assert instruct.context_text(images[0], use_boxes=True) == (
      "Image 1 caption 0.\nImage 1 caption 1.\n\ndog: [0.1, 0.1, 0.5, 0.5]\nperson: [0.0, 0.0, 1.0, 1.0]")
  assert instruct.context_text(images[0], use_boxes=False) == "Image 1 caption 0.\nImage 1 caption 1."
  assert instruct.context_text(images[2], use_boxes=True) == "Image 3 caption 0.\nImage 3 caption 1."
  bad = json.loads(inst.read_text())
  bad["annotations"][0]["category_id"] = 99
  (tmp_path / "bad.json").write_text(json.dumps(bad))
  with pytest.raises(KeyError, match="bad.json: annotation 1: unknown category_id 99"):
    instruct.load_coco(str(caps), str(tmp_path / "bad.json"))


@pytest.mark.parametrize("reply, expected", [
    ("Question:\nWhat?\n===\nAnswer:\nThat.", [("What?", "That.")]),
    ("Question: What?\n===\nAnswer: That.\n===\nQuestion:\nWhy?\n===\nAnswer:\nBecause.\n\nMore.\n===\n",
     [("What?", "That."), ("Why?", "Because.\n\nMore.")]),
    ("question:\nLower?\n  ===  \nANSWER:\nYes.", [("Lower?", "Yes.")]),
])
def test_parse_qa(reply, expected):
  assert instruct.parse_qa(reply) == expected


@pytest.mark.parametrize("reply, match", [
    ("", "empty reply"),
    ("Here you go.", "starts with neither"),
    ("Answer:\nThat.\n===\nQuestion:\nWhat?", "expected a question, got a answer"),
    ("Question:\nWhat?\n===\nQuestion:\nWhy?\n===\nAnswer:\nx", "expected an answer, got a question"),
    ("Question:\nWhat?", "the last question has no answer"),
    ("Question:\n\n===\nAnswer:\nx", "block 1 \\(question\\) is empty"),
])
def test_parse_qa_malformed(reply, match):
  with pytest.raises(instruct.MalformedReply, match=match):
    instruct.parse_qa(reply)


@pytest.mark.parametrize("kind", ["conversation", "detail", "complex"])
def test_instruct_cli(tmp_path, kind, capsys):
  caps, inst = write_coco(tmp_path)
  out = tmp_path / f"{kind}.json"
  with FakeChatServer(responder(fail_first={2: 429, 4: 500})) as server:
    assert datagen_main.main(_argv(caps, inst, kind, out, server)) == 0
    good = NUM_IMAGES - 2  # no caption: 8; malformed: 3
    assert server.request_count() == NUM_IMAGES - 1 + 2  # 7 images + one 429 and one 500 retried
    printed = capsys.readouterr().out
    assert f"written {good}, malformed 1, failed requests 0" in printed
    assert "429 x1" in printed and "5xx x1" in printed and "tokens prompt" in printed
    # A second run has nothing to do.
    assert datagen_main.main(_argv(caps, inst, kind, out, server)) == 0
    assert server.request_count() == NUM_IMAGES - 1 + 2
    assert "already done 7, written 0" in capsys.readouterr().out

  prompts = prompt_files.load_kind(kind)
  body = next(r.body for r in server.requests if _image_of(r.body) == 1)
  assert body["model"] == "gpt-test"
  messages = body["messages"]
  assert messages[0] == {"role": "system", "content": prompts.system_message}
  assert len(messages) == 2 + 2 * len(prompts.examples) and len(prompts.examples) >= 1
  for j, (context, reply) in enumerate(prompts.examples):
    assert messages[1 + 2 * j] == {"role": "user", "content": context}
    assert messages[2 + 2 * j] == {"role": "assistant", "content": reply}
  has_boxes = "\n\ndog: [0.1, 0.1, 0.5, 0.5]\n" in messages[-1]["content"]
  assert has_boxes == (kind != "conversation")  # prompts/kinds.json

  records = json.loads(out.read_text())
  assert [r["id"] for r in records] == [f"{i}-{kind}" for i in (1, 2, 4, 5, 6, 7)]  # input order
  detail_requests = set(prompt_files.instruction_list("detailed_description"))
  for r in records:
    image = int(r["id"].split("-")[0])
    assert r["image"] == f"coco/{image:012d}.jpg"
    turns = r["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    first = turns[0]["value"]
    assert first.startswith("<image>\n") or first.endswith("\n<image>")
    assert sum(t["value"].count("<image>") for t in turns) == 1
    question = first.replace("<image>", "").strip()
    if kind == "detail":
      assert question in detail_requests
      assert turns[1]["value"] == f"A detailed description of image {image}."
    else:
      assert len(turns) == (2 if kind == "complex" else 6)
      assert question == f"Q0 about image {image}?"
      assert turns[-1]["value"] == f"A{len(turns) // 2 - 1} for image {image}."
  malformed = llm_client.read_jsonl(str(out) + ".malformed.jsonl")
  assert [m["id"] for m in malformed] == [f"{MALFORMED_IMAGE}-{kind}"] and malformed[0]["reason"]


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer_dir):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))


def _pipeline_rows(path, image_folder, template, tokenizer):
  """(record index, supervised label spans) of every row the training pipeline makes (strict policy)."""
  from llava_jax.data import pipeline
  from llava_jax.models.config import IGNORE_INDEX, ModelConfig, VisionConfig
  model_config = ModelConfig(vision=VisionConfig(image_size=28, patch_size=14, hidden_size=8, intermediate_size=16,
                                                 num_hidden_layers=1, num_attention_heads=2))
  config = dict(data_files=[{"path": str(path), "image_folder": str(image_folder)}], template=template,
                max_length=256, batch_size=4, shuffle=False, num_epochs=1, read_threads=1, bad_input="strict")
  rows = []
  for batch in pipeline.make_eval_iterator(config, tokenizer, model_config, process_index=0, process_count=1):
    for b in np.nonzero(batch["row_valid"])[0]:
      labels = batch["labels"][b]
      breaks = np.flatnonzero(np.diff(np.r_[0, labels != IGNORE_INDEX, 0]))
      spans = [labels[i:j].tolist() for i, j in zip(breaks[::2], breaks[1::2])]
      rows.append((int(batch["record_index"][b]), spans))
  return sorted(rows)


def test_outputs_load_through_the_training_pipeline(tmp_path, tokenizer):
  caps, inst = write_coco(tmp_path)
  image_folder = tmp_path / "images"
  (image_folder / "coco").mkdir(parents=True)
  for i in range(1, NUM_IMAGES + 1):
    Image.new("RGB", (40, 30), (10 * i, 100, 200)).save(image_folder / "coco" / f"{i:012d}.jpg")
  with FakeChatServer(responder()) as server:
    for kind in ("conversation", "detail"):
      out = tmp_path / f"{kind}.json"
      assert datagen_main.main(_argv(caps, inst, kind, out, server)) == 0
      data = json.loads(out.read_text())
      rows = _pipeline_rows(out, image_folder, "vicuna_v1", tokenizer)
      assert [i for i, _ in rows] == list(range(len(data))) and len(data) == NUM_IMAGES - 2
      for i, spans in rows:
        answers = [t["value"] for t in data[i]["conversations"][1::2]]
        assert [tokenizer.decode(s, skip_special_tokens=True).strip() for s in spans] == answers
  out = tmp_path / "stage1.json"
  assert datagen_main.main(["captions", "--input", str(caps), "--output", str(out), "--image-prefix",
                            "coco/"]) == 0
  data = json.loads(out.read_text())
  rows = _pipeline_rows(out, image_folder, "plain", tokenizer)
  assert [i for i, _ in rows] == list(range(len(data))) and len(data) == 2 * (NUM_IMAGES - 1)
  for i, spans in rows:
    assert [tokenizer.decode(s, skip_special_tokens=True).strip() for s in spans] == [
        data[i]["conversations"][1]["value"]]


def test_failed_request_is_left_for_the_next_run(tmp_path, capsys):
  caps, inst = write_coco(tmp_path)
  out = tmp_path / "c.json"

  def always_400_for_5(body, index):
    return FakeResponse(status=400) if _image_of(body) == 5 else responder()(body, index)

  with FakeChatServer(always_400_for_5) as server:
    assert datagen_main.main(_argv(caps, inst, "complex", out, server)) == 1
  assert "1 images failed" in capsys.readouterr().err
  assert "5-complex" not in {r["id"] for r in json.loads(out.read_text())}
  with FakeChatServer(responder()) as server:
    assert datagen_main.main(_argv(caps, inst, "complex", out, server)) == 0
    assert server.request_count() == 1
  assert [r["id"] for r in json.loads(out.read_text())] == [f"{i}-complex" for i in (1, 2, 4, 5, 6, 7)]


def test_restart_after_kill_does_not_repeat_finished_images(tmp_path):
  caps, inst = write_coco(tmp_path)
  out = tmp_path / "conv.json"
  progress = tmp_path / "conv.json.records.jsonl"
  with FakeChatServer(responder(delay_s=0.25)) as server:
    argv = _argv(caps, inst, "conversation", out, server)
    argv[argv.index("--max-workers") + 1] = "1"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "llava_jax.datagen", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      deadline = time.time() + 60
      while time.time() < deadline and (not progress.exists() or len(progress.read_text().splitlines()) < 2):
        time.sleep(0.05)
    finally:
      proc.kill()  # the process this test started, by its handle
      proc.wait()
    assert not out.exists()  # killed before the end
    first_run_requests = server.request_count()
    with llm_client.ResumableJsonl(progress) as records, \
         llm_client.ResumableJsonl(str(out) + ".malformed.jsonl") as malformed:
      done = records.done_ids | malformed.done_ids  # a line cut by the kill is not done
    assert 2 <= len(done) < NUM_IMAGES - 1

    assert datagen_main.main([*argv, "--max-workers", "3"]) == 0
    second_run = [_image_of(r.body) for r in server.requests[first_run_requests:]]
  assert sorted(second_run) == sorted(i for i in range(1, NUM_IMAGES) if f"{i}-conversation" not in done)
  ids = [r["id"] for r in json.loads(out.read_text())]
  assert ids == [f"{i}-conversation" for i in (1, 2, 4, 5, 6, 7)]
