"""Token ids and labels against an independent reference of LLaVA's preprocessing, on the real LLaMA tokenizer.

The reference below is written from the spec's description of LLaVA's `tokenizer_image_token`,
`preprocess_multimodal`, `preprocess_v1` (string split on '</s>' and ' ASSISTANT: ', `instruction_len - 2`, the
non-legacy `-1` after the first round, whole-sample masking on a length mismatch) and `preprocess_plain`.
On ordinary conversations ours must give the same ids and labels; the differences are asserted one by one.
"""
import numpy as np
import pytest
import transformers

from llava_jax.data import templates
from llava_jax.data import tokenize
from llava_jax.models.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE = "<image>"
MODEL_MAX_LENGTH = 2048  # LLaVA-1.5's tokenizer_model_max_length


@pytest.fixture(scope="module", params=["non_legacy", "legacy"])
def tok(request, llama_tokenizer_dir):
  legacy = request.param == "legacy"
  t = transformers.AutoTokenizer.from_pretrained(str(llama_tokenizer_dir), legacy=legacy)
  assert t.legacy == legacy
  return t


# ---------------------------------------------------------------------------------------------------------------
# Independent reference of LLaVA's preprocessing (train.py / mm_utils.py as the spec describes them).


def ref_tokenizer_image_token(prompt, tok):
  """Chunks between '<image>' tokenised separately; BOS kept once; one IMAGE_TOKEN_INDEX between chunks."""
  chunks = [tok(c).input_ids for c in prompt.split(IMAGE)]
  keep_bos = bool(chunks and chunks[0] and chunks[0][0] == tok.bos_token_id)
  ids = [tok.bos_token_id] if keep_bos else []
  for i, chunk in enumerate(chunks):
    if i:
      ids.append(IMAGE_TOKEN_INDEX)
    ids.extend(chunk[1:] if keep_bos else chunk)
  return ids


def ref_preprocess_multimodal(conversation):
  out = []
  for turn in conversation:
    value = turn["value"]
    if IMAGE in value:
      value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
    out.append({"from": turn["from"], "value": value})
  return out


def ref_v1_prompt(conversation, system):
  """Conversation.get_prompt, SeparatorStyle.TWO, after dropping a leading gpt turn."""
  if conversation[0]["from"] != "human":
    conversation = conversation[1:]
  roles, seps = ("USER", "ASSISTANT"), (" ", "</s>")
  prompt = system + seps[0]
  for i, turn in enumerate(conversation):
    assert turn["from"] == ("human", "gpt")[i % 2]
    prompt += roles[i % 2] + ": " + turn["value"] + seps[i % 2]
  return prompt


def ref_preprocess_v1(conversation, tok, has_image, system):
  """Returns (ids, labels, mismatch) as LLaVA's preprocess_v1 computes them."""
  if has_image:
    conversation = ref_preprocess_multimodal(conversation)
  prompt = ref_v1_prompt(conversation, system)
  encode = (lambda s: ref_tokenizer_image_token(s, tok)) if has_image else (lambda s: tok(s).input_ids)
  ids = encode(prompt)
  labels = list(ids)
  pad_id = tok.unk_token_id  # LLaVA sets pad = unk for v1
  total_len = sum(1 for x in ids if x != pad_id)
  sep = " ASSISTANT: "
  cur_len = 1
  labels[:cur_len] = [IGNORE_INDEX] * cur_len
  for i, rou in enumerate(prompt.split("</s>")):
    if rou == "":
      break
    parts = rou.split(sep)
    if len(parts) != 2:
      break
    parts[0] += sep
    round_len = len(encode(rou))
    instruction_len = len(encode(parts[0])) - 2
    if i != 0 and not tok.legacy:  # tokenizers >= 0.14
      round_len -= 1
      instruction_len -= 1
    labels[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * len(labels[cur_len:cur_len + instruction_len])
    cur_len += round_len
  labels[cur_len:] = [IGNORE_INDEX] * len(labels[cur_len:])
  mismatch = cur_len < MODEL_MAX_LENGTH and cur_len != total_len
  if mismatch:
    labels = [IGNORE_INDEX] * len(labels)
  return ids, labels, mismatch


def ref_preprocess_plain(conversation, tok):
  assert len(conversation) == 2 and IMAGE in conversation[0]["value"]
  ids = ref_tokenizer_image_token(IMAGE + conversation[1]["value"] + "\n", tok)
  labels = list(ids)
  n = len(ref_tokenizer_image_token(IMAGE, tok))
  labels[:n] = [IGNORE_INDEX] * n
  return ids, labels


# ---------------------------------------------------------------------------------------------------------------
# Generated conversations.

FRAGMENTS = [
    "What is in the picture?", "Describe the image in detail.", "How many cats are there", "the", "red", "car",
    "3.14", "1,024", "2023", "-7", "42%", "x = [1, 2, 3]", "café", "naïve", "Übersetze «chat»", "猫", "日本語のテキスト",
    "Привет, мир", "مرحبا", "🐱", "👍🏽", "🇯🇵", "❤️", "?!", "...", "—", "(a)", "\n", "\n\n", "\n- item one", "\t",
    "  ", "A", "It's", "e.g.", "USER", "ASSISTANT", "don't", "<b>bold</b>", "1.", "2)", "#", "'quoted'",
]


def random_text(rng, lo=1, hi=12):
  parts = [FRAGMENTS[i] for i in rng.integers(0, len(FRAGMENTS), size=rng.integers(lo, hi + 1))]
  return " ".join(parts) if rng.random() < 0.7 else "".join(parts)


def random_conversation(rng):
  """1-4 rounds; an image in the first or a later human turn, before or after the text, or text-only."""
  rounds = int(rng.integers(1, 5))
  turns = []
  for r in range(rounds):
    turns.append({"from": "human", "value": random_text(rng)})
    reply = random_text(rng, 1, 20)
    if rng.random() < 0.1:
      reply = " " + reply  # a reply that starts with a space
    turns.append({"from": "gpt", "value": reply})
  kind = rng.integers(0, 6)
  if kind < 4:  # image
    turn = 0 if kind < 3 else 2 * int(rng.integers(0, rounds))
    text = turns[turn]["value"]
    turns[turn]["value"] = [IMAGE + "\n" + text, text + "\n" + IMAGE, text + " " + IMAGE,
                            IMAGE + text][int(rng.integers(0, 4))]
  return turns


CONVERSATIONS = [random_conversation(np.random.default_rng(seed)) for seed in range(60)]
CONVERSATIONS += [  # hand-written ones: short, long, numbers only, newlines only, emoji only
    [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}],
    [{"from": "human", "value": "2+2"}, {"from": "gpt", "value": "4"}],
    [{"from": "human", "value": "Say nothing.\n\n\n<image>"}, {"from": "gpt", "value": "\n\n"}],
    [{"from": "human", "value": "🐱🐱🐱"}, {"from": "gpt", "value": "🐶"}, {"from": "human", "value": "<image>"},
     {"from": "gpt", "value": "猫です。"}],
]


def has_image(conversation):
  return tokenize.count_image_tags(conversation) > 0


def supervised_runs(labels):
  runs, current = [], []
  for x in labels:
    if x != IGNORE_INDEX:
      current.append(int(x))
    elif current:
      runs.append(current)
      current = []
  if current:
    runs.append(current)
  return runs


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, system", [("vicuna_v1", templates.get_template("vicuna_v1").system),
                                          ("llava_v1", templates.get_template("llava_v1").system)])
def test_v1_matches_llava_preprocess_v1(tok, name, system):
  assert len(CONVERSATIONS) >= 50
  for conversation in CONVERSATIONS:
    ids, labels = tokenize.encode_conversation(conversation, tok, name)
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    ref_ids, ref_labels, mismatch = ref_preprocess_v1(conversation, tok, has_image(conversation), system)
    assert not mismatch, conversation  # LLaVA's own masking works on all of these ...
    assert ids.tolist() == ref_ids, conversation
    assert labels.tolist() == ref_labels, conversation  # ... and agrees with ours token for token.


def test_v1_supervises_exactly_the_replies_and_eos(tok):
  for conversation in CONVERSATIONS:
    ids, labels = tokenize.encode_conversation(conversation, tok, "v1")
    replies = [t["value"] for t in conversation if t["from"] == "gpt"]
    assert [tok.decode(run) for run in supervised_runs(labels)] == [r + "</s>" for r in replies], conversation
    np.testing.assert_array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    assert labels[0] == IGNORE_INDEX and ids[0] == tok.bos_token_id
    assert np.all(labels[ids == IMAGE_TOKEN_INDEX] == IGNORE_INDEX)
    assert np.sum(ids == IMAGE_TOKEN_INDEX) == tokenize.count_image_tags(conversation)


def test_plain_matches_llava_preprocess_plain(tok):
  for seed, conversation in enumerate(CONVERSATIONS):
    caption = conversation[1]["value"]
    instruction = [IMAGE, "Describe.\n" + IMAGE, IMAGE + "\nWrite a caption."][seed % 3]
    plain = [{"from": "human", "value": instruction}, {"from": "gpt", "value": caption}]
    ids, labels = tokenize.encode_conversation(plain, tok, "plain")
    ref_ids, ref_labels = ref_preprocess_plain(plain, tok)
    assert ids.tolist() == ref_ids and labels.tolist() == ref_labels, plain
    assert ids[:2].tolist() == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    # No EOS in stage 1. A caption starts a chunk (it follows the image), where SentencePiece's prefix space and a
    # leading space of the text are the same '▁': the decoder drops one leading space.
    assert [tok.decode(run) for run in supervised_runs(labels)] == [caption.removeprefix(" ") + "\n"]


def test_generation_prompt_is_a_prefix_of_the_training_ids(tok):
  for conversation in CONVERSATIONS:
    ids, labels = tokenize.encode_conversation(conversation, tok, "v1")
    messages = tokenize.conversation_messages(conversation)
    for r in range(len(messages) // 2):
      prompt = tokenize.encode_prompt(messages[:2 * r + 1], tok, "v1")
      assert prompt.dtype == np.int32
      np.testing.assert_array_equal(prompt, ids[:len(prompt)])
      assert labels[len(prompt)] != IGNORE_INDEX  # the reply starts right after the prompt
      assert labels[len(prompt) - 1] == IGNORE_INDEX
      assert tok.convert_ids_to_tokens(int(prompt[-1])) == ":"  # ... 'ASSISTANT:'
    pending = tokenize.encode_prompt(messages[:1] + [("gpt", None)], tok, "v1")
    np.testing.assert_array_equal(pending, tokenize.encode_prompt(messages[:1], tok, "v1"))


def test_text_after_eos_is_tokenized_as_in_the_whole_string(tok):
  """The famous legacy difference: after '</s>', 'USER' is one token ('USER') for a non-legacy tokenizer and
  two ('▁US', 'ER') for a legacy one. Tokenising the round on its own would always give the latter; ours follows
  the tokenizer, as tokenising the whole prompt does."""
  conversation = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                  {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."}]
  ids, _ = tokenize.encode_conversation(conversation, tok, "v1")
  after_eos = tok.convert_ids_to_tokens(ids[list(ids).index(tok.eos_token_id) + 1:][:3].tolist())
  assert after_eos[:3 if tok.legacy else 2] == (["▁US", "ER", ":"] if tok.legacy else ["USER", ":"])
  prompt = templates.get_template("v1").build_prompt(tokenize.conversation_messages(conversation))
  assert ids.tolist() == tok(prompt).input_ids


# ----- Where we differ from LLaVA, one test each. ---------------------------------------------------------------


def test_role_string_in_a_question_masks_the_whole_sample_in_llava_not_here(tok):
  # LLaVA splits each round on ' ASSISTANT: '; a question that contains it breaks the split, the token counts no
  # longer add up ("tokenization mismatch") and LLaVA masks every label: the sample trains nothing (loss 0).
  conversation = [{"from": "human", "value": "<image>\nRepeat: ASSISTANT: hello"},
                  {"from": "gpt", "value": "ASSISTANT: hello"}]
  ref_ids, ref_labels, mismatch = ref_preprocess_v1(conversation, tok, True, templates.get_template("v1").system)
  assert mismatch and all(x == IGNORE_INDEX for x in ref_labels)
  ids, labels = tokenize.encode_conversation(conversation, tok, "v1")
  assert ids.tolist() == ref_ids  # same ids ...
  assert [tok.decode(run) for run in supervised_runs(labels)] == ["ASSISTANT: hello</s>"]  # ... the reply learnt


def test_eos_string_inside_a_reply(tok):
  # A reply that contains the text '</s>' (the tokenizer makes it the EOS id, in LLaVA too): LLaVA splits the
  # round there, the counts disagree and it masks the whole sample. We supervise the whole reply.
  conversation = [{"from": "human", "value": "How is EOS written?"},
                  {"from": "gpt", "value": "As </s> in LLaMA."}]
  ref_ids, ref_labels, mismatch = ref_preprocess_v1(conversation, tok, False, templates.get_template("v1").system)
  assert mismatch and all(x == IGNORE_INDEX for x in ref_labels)
  ids, labels = tokenize.encode_conversation(conversation, tok, "v1")
  assert ids.tolist() == ref_ids
  assert [tok.decode(run) for run in supervised_runs(labels)] == ["As </s> in LLaMA.</s>"]


def test_leading_assistant_turn_raises_where_llava_drops_it(tok):
  conversation = [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
  ref_ids, _, _ = ref_preprocess_v1(conversation, tok, False, templates.get_template("v1").system)
  assert ref_ids == tokenize.encode_conversation(conversation[1:], tok, "v1")[0].tolist()  # LLaVA drops it
  with pytest.raises(ValueError, match="turns out of order"):
    tokenize.encode_conversation(conversation, tok, "v1")


def test_two_image_tags_in_a_turn_stay_two(tok):
  # preprocess_multimodal removes every tag of a turn and puts back one; we keep one placeholder per tag, so
  # that the number of placeholders always equals the number of images (the records module checks it).
  conversation = [{"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."}]
  ref_ids, _, _ = ref_preprocess_v1(conversation, tok, True, templates.get_template("v1").system)
  ids, _ = tokenize.encode_conversation(conversation, tok, "v1")
  assert ref_ids.count(IMAGE_TOKEN_INDEX) == 1 and np.sum(ids == IMAGE_TOKEN_INDEX) == 2
  prompt = templates.get_template("v1").build_prompt(tokenize.conversation_messages(conversation))
  assert ids.tolist() == ref_tokenizer_image_token(prompt, tok)


# ----- Other templates: ids equal the whole prompt's, replies supervised. -------------------------------------


@pytest.fixture(scope="module")
def tok_with_chat_tokens(tok):
  t = transformers.AutoTokenizer.from_pretrained(tok.name_or_path, legacy=tok.legacy)
  t.add_tokens(["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               special_tokens=True)
  return t


@pytest.mark.parametrize("name", ["llava_llama_2", "mpt", "chatml_direct", "llama3"])
def test_other_templates_match_the_whole_prompt(tok_with_chat_tokens, name):
  tok = tok_with_chat_tokens
  template = templates.get_template(name)
  for conversation in CONVERSATIONS:
    ids, labels = tokenize.encode_conversation(conversation, tok, name)
    messages = tokenize.conversation_messages(conversation)
    assert ids.tolist() == ref_tokenizer_image_token(template.build_prompt(messages), tok), conversation
    replies = [t["value"] for t in conversation if t["from"] == "gpt"]
    if name == "llava_llama_2":
      expected = [" " + r + " </s>" for r in replies]
    elif name == "llama3":
      expected = [r.strip() + "<|eot_id|>" for r in replies]
    else:
      expected = [r + "<|im_end|>" for r in replies]
    # Each run decodes to its text; the decoder drops one leading space of a run, SentencePiece-style.
    decoded = [tok.decode(run) for run in supervised_runs(labels)]
    assert decoded == [e.removeprefix(" ") for e in expected], conversation
    prompt = tokenize.encode_prompt(messages[:1], tok, name)
    np.testing.assert_array_equal(prompt, ids[:len(prompt)])
    assert labels[len(prompt)] != IGNORE_INDEX and np.all(labels[:len(prompt)] == IGNORE_INDEX)


def test_merge_across_a_piece_boundary_raises(tok):
  # With '<|im_end|>' as plain text the LLaMA BPE merges '>' and '<' across the boundary of the masked role
  # prompt and the supervised reply, so no exact mask exists: a clear error, never a shifted mask.
  conversation = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<b>A</b>"}]
  template = templates.Template("test", "mpt", "<|im_start|>system\nS", ("<|im_start|>user\n", "U>"), "<|im_end|>")
  if tok.convert_tokens_to_ids("><") == tok.unk_token_id:
    pytest.skip("this vocabulary has no '><' token")
  with pytest.raises(ValueError, match="merges text across the boundary"):
    tokenize.encode_conversation(conversation, tok, template)


# ----- Input errors. --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conversation, match", [
    ([], "empty conversation"),
    ("not a list", "must be a list"),
    ([{"from": "human"}], "missing key 'value'"),
    ([{"value": "x"}], "missing key 'from'"),
    (["text"], "expected a dict"),
    ([{"from": "human", "value": None}], "must be a string"),
    ([{"from": "system", "value": "x"}], "unknown role"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "gpt", "value": "c"}],
     "turns out of order"),
])
def test_bad_conversations_raise(tok, conversation, match):
  with pytest.raises(ValueError, match=match):
    tokenize.encode_conversation(conversation, tok, "v1")


def test_no_reply_means_no_labels_and_count_image_tags(tok):
  ids, labels = tokenize.encode_conversation([{"from": "human", "value": "<image>\nQ"}], tok, "v1")
  assert len(ids) > 0 and np.all(labels == IGNORE_INDEX)
  conversation = [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "<image>"}]
  assert tokenize.count_image_tags(conversation) == 3
  assert tokenize.count_image_tags([{"from": "human", "value": "none"}]) == 0


def test_move_image_to_front_off_keeps_the_tag_in_place(tok):
  conversation = [{"from": "human", "value": "What is this? <image>"}, {"from": "gpt", "value": "A cat."}]
  ids, _ = tokenize.encode_conversation(conversation, tok, "v1", move_image_to_front=False)
  prompt = templates.get_template("v1").build_prompt([("human", "What is this? <image>"), ("gpt", "A cat.")])
  assert ids.tolist() == ref_tokenizer_image_token(prompt, tok)
  where = ids.tolist().index(IMAGE_TOKEN_INDEX)
  assert tok.decode(ids[1:where]).endswith("USER: What is this? ")
  moved, _ = tokenize.encode_conversation(conversation, tok, "v1")
  assert tok.decode(moved[1:moved.tolist().index(IMAGE_TOKEN_INDEX)]).endswith("USER: ")
