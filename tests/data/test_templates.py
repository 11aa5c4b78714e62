"""Conversation templates against the literal prompt strings of LLaVA's conversation.py (see the spec)."""
import pytest

from llava_jax.data import templates

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")
VISION_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
MPT_SYSTEM = ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant "
              "gives helpful and honest answers.")

TWO_ROUNDS = [("human", "<image>\nQ"), ("gpt", "A"), ("human", "Q2"), ("gpt", "A2")]

EXPECTED = {
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>",
    "llava_v1": f"{LLAVA_SYSTEM} USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>",
    "llava_llama_2": (f"[INST] <<SYS>>\n{VISION_SYSTEM}\n<</SYS>>\n\n<image>\nQ [/INST] A </s>"
                      "<s>[INST] Q2 [/INST] A2 </s>"),
    "mpt": (f"{MPT_SYSTEM}<|im_end|><|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\nA<|im_end|>"
            "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\nA2<|im_end|>"),
    "chatml_direct": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ<|im_end|>"
                      "<|im_start|>assistant\nA<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
                      "A2<|im_end|>"),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n" + VISION_SYSTEM + "<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"),
}

# The generation prompt after the second question: the training string up to the second reply.
EXPECTED_GENERATION = {
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:",
    "llava_v1": f"{LLAVA_SYSTEM} USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:",
    "llava_llama_2": f"[INST] <<SYS>>\n{VISION_SYSTEM}\n<</SYS>>\n\n<image>\nQ [/INST] A </s><s>[INST] Q2 [/INST]",
    "mpt": (f"{MPT_SYSTEM}<|im_end|><|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\nA<|im_end|>"
            "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"),
    "llama3": EXPECTED["llama3"][:-len("A2<|eot_id|>")],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_training_prompt_is_the_literal_string(name):
  assert templates.get_template(name).build_prompt(TWO_ROUNDS) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_GENERATION))
def test_generation_prompt_is_the_literal_string_and_a_prefix(name):
  t = templates.get_template(name)
  gen = t.build_prompt(TWO_ROUNDS[:3], add_generation_prompt=True)
  assert gen == EXPECTED_GENERATION[name]
  assert t.build_prompt(TWO_ROUNDS[:3] + [("gpt", None)]) == gen  # the same with an explicit pending turn
  assert EXPECTED[name].startswith(gen)


def test_generation_prompt_of_one_question():
  t = templates.get_template("v1")
  assert t.build_prompt([("user", "<image>\nWhat is it?")], add_generation_prompt=True) == (
      f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:")


def test_plain_is_image_then_caption_and_newline():
  t = templates.get_template("plain")
  # preprocess_plain: the human turn is replaced by the image alone, the caption ends with '\n', no EOS.
  assert t.build_prompt([("human", "Describe the image briefly.\n<image>"), ("gpt", "A red ball.")]) == (
      "<image>A red ball.\n")
  assert t.build_prompt([("human", "<image>\nDescribe.")], add_generation_prompt=True) == "<image>"
  segs = t.segments([("human", "<image>"), ("gpt", "A red ball.")])
  assert segs == [templates.Segment("<image>", False), templates.Segment("A red ball.\n", True)]
  with pytest.raises(ValueError, match="exactly one human and one assistant"):
    t.build_prompt(TWO_ROUNDS)
  with pytest.raises(ValueError, match="needs an <image>"):
    t.build_prompt([("human", "no tag"), ("gpt", "x")])


def test_segments_mark_exactly_the_replies_and_their_end_of_turn():
  for name, ends in [("v1", ("A</s>", "A2</s>")), ("llava_llama_2", ("A </s>", "A2 </s>")),
                     ("mpt", ("A<|im_end|>", "A2<|im_end|>")), ("llama3", ("A<|eot_id|>", "A2<|eot_id|>"))]:
    t = templates.get_template(name)
    segs = t.segments(TWO_ROUNDS)
    assert "".join(s.text for s in segs) == t.build_prompt(TWO_ROUNDS)
    assert [s.text.strip() for s in segs if s.supervised] == list(ends), name
    assert t.end_of_turn in ends[0]


def test_empty_reply_is_a_reply_and_none_is_the_generation_prompt():
  t = templates.get_template("v1")
  # LLaVA's `if message:` would turn "" into a generation prompt mid-conversation; here it is an empty reply.
  assert t.build_prompt([("human", "Q"), ("gpt", "")]) == f"{VICUNA_SYSTEM} USER: Q ASSISTANT: </s>"
  with pytest.raises(ValueError, match="None is only allowed"):
    t.build_prompt([("human", "Q"), ("gpt", None), ("human", "Q2")])
  with pytest.raises(ValueError, match="None is only allowed"):
    t.build_prompt([("human", None)])
  with pytest.raises(ValueError, match="ends with a human turn"):
    t.build_prompt([("human", "Q"), ("gpt", "A")], add_generation_prompt=True)


def test_trailing_human_turn_is_unsupervised():
  segs = templates.get_template("v1").segments([("human", "Q"), ("gpt", "A"), ("human", "Q2")])
  assert segs[-1] == templates.Segment("USER: Q2 ", False)


def test_llama3_trims_messages():
  t = templates.get_template("llama3")
  assert t.build_prompt([("human", "  Q \n"), ("gpt", " A ")]).endswith(
      "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
      "A<|eot_id|>")


@pytest.mark.parametrize("messages, match", [
    ([], "empty conversation"),
    ([("system", "x"), ("gpt", "y")], "unknown role 'system'"),
    ([("gpt", "x"), ("human", "y")], "turns out of order"),
    ([("human", "x"), ("human", "y")], "turns out of order"),
    ([("human", "a"), ("gpt", "b"), ("gpt", "c")], "turns out of order"),
    ([("human", 3)], "must be a string"),
])
def test_bad_conversations_raise(messages, match):
  with pytest.raises(ValueError, match=match):
    templates.get_template("v1").build_prompt(messages)


def test_names_and_aliases():
  assert templates.get_template("v1") is templates.get_template("vicuna_v1")
  assert templates.get_template("llava_llama_3") is templates.get_template("llama3")
  assert templates.get_template("mistral_direct") is templates.get_template("chatml_direct")
  t = templates.get_template("vicuna_v1")
  assert (t.system, t.roles, t.sep, t.sep2) == (VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>")
  with pytest.raises(ValueError, match=r"unknown conversation template 'v2'.*known: .*plain.*vicuna_v1"):
    templates.get_template("v2")


@pytest.mark.parametrize("text, expected", [
    ("What is this? <image>", "<image>\nWhat is this?"),
    ("<image>\nWhat is this?", "<image>\nWhat is this?"),
    ("Look: <image> here", "<image>\nLook:  here"),
    ("<image>", "<image>"),
    ("  <image>  ", "<image>"),
    ("no image ", "no image "),  # turns without the tag are left alone (not stripped)
    ("<image> and <image>?", "<image>\n<image>\nand ?"),
])
def test_move_image_to_front(text, expected):
  assert templates.move_image_to_front(text) == expected
