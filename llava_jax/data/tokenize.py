"""Token ids and labels for LLaVA conversations, with labels right by construction.

A template (`llava_jax.data.templates`) cuts the prompt into pieces marked supervised or not; each piece is
tokenised on its own and its ids are labelled as a whole, so the mask never depends on re-splitting the prompt
string (LLaVA's `preprocess_v1` re-splits it on '</s>' and ' ASSISTANT: ' and counts tokens, and when the counts
disagree it masks the whole sample: the silent "tokenization mismatch" of issues #661, #1166, #1706).

Supervised: each assistant reply with its end-of-turn token ('</s>' for Vicuna; for `plain`, the caption and its
'\\n'). Unsupervised (`IGNORE_INDEX`): the BOS, the system prompt, user turns, role prompts and image placeholders.

The ids are those of LLaVA's `tokenizer_image_token(prompt)`: the prompt is split on '<image>', each chunk is
tokenised as a string of its own (so the text after an image gets the SentencePiece prefix space, e.g. '\\n' ->
['▁', '<0x0A>']), one `IMAGE_TOKEN_INDEX` goes between chunks, and the tokenizer's BOS comes once at the front.
To keep this equality, a piece that does not start a chunk is tokenised together with the piece before it and
only its own ids are kept (`ids(prev + piece)[len(ids(prev)):]`): the tokenizer then sees the same context as in
the whole string, e.g. whether the text follows a special token like '</s>' -- the legacy/non-legacy difference
of LLaMA tokenizers ('</s>USER' -> 'USER' non-legacy, '▁US', 'ER' legacy) comes out as in the whole string.
The one assumption is locality: the tokenizer never merges text across more than one piece, which holds for
BPE/SentencePiece vocabularies and is checked on the real LLaMA tokenizer in the tests. Where the tokenizer
merges a token across a piece boundary (no token boundary there), no exact label mask exists: `ValueError`.
"""
from __future__ import annotations

import weakref
from typing import Any, Sequence

import numpy as np

from llava_jax.data import templates as templates_lib
from llava_jax.data.templates import IMAGE_TAG, Template, get_template
from llava_jax.models.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX

__all__ = ["count_image_tags", "conversation_messages", "encode_conversation", "encode_prompt"]


def count_image_tags(conversations: Sequence[dict]) -> int:
  """Number of '<image>' tags over all turns of a LLaVA conversation."""
  return sum(turn.get("value", "").count(IMAGE_TAG) for turn in conversations
             if isinstance(turn, dict) and isinstance(turn.get("value"), str))


def conversation_messages(conversations: Sequence[dict], *,
                          move_image_to_front: bool = True) -> list[tuple[str, str]]:
  """LLaVA's `[{'from': ..., 'value': ...}]` as `(role, text)` messages for `Template.build_prompt`.

  With `move_image_to_front`, each turn that has '<image>' is rewritten as LLaVA's `preprocess_multimodal` does
  ('<image>\\n' + the rest of the turn, stripped). Raises ValueError for an empty conversation or a malformed turn.
  """
  if not isinstance(conversations, (list, tuple)) or not conversations:
    raise ValueError("empty conversation" if isinstance(conversations, (list, tuple))
                     else f"conversations must be a list, got {type(conversations).__name__}")
  messages = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict):
      raise ValueError(f"turn {i}: expected a dict with 'from' and 'value', got {type(turn).__name__}")
    for key in ("from", "value"):
      if key not in turn:
        raise ValueError(f"turn {i}: missing key {key!r}")
    text = turn["value"]
    if not isinstance(text, str):
      raise ValueError(f"turn {i}: 'value' must be a string, got {type(text).__name__}")
    messages.append((turn["from"], templates_lib.move_image_to_front(text) if move_image_to_front else text))
  return messages


def encode_conversation(conversations: Sequence[dict], tokenizer: Any, template: str | Template, *,
                        move_image_to_front: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and labels of one training conversation.

  Args:
    conversations: LLaVA's `[{'from': 'human' | 'gpt', 'value': str}, ...]`; turns alternate starting with human
      (a leading 'gpt' turn raises ValueError where LLaVA silently drops it).
    tokenizer: a transformers tokenizer.
    template: a `Template` or its name ('plain', 'v1', ...).
    move_image_to_front: rewrite turns with '<image>' as LLaVA's `preprocess_multimodal` does.

  Returns:
    `(input_ids int32[T], labels int32[T])`: one `IMAGE_TOKEN_INDEX` per '<image>' tag; labels equal the ids on
    the assistant replies and their end-of-turn tokens, `IGNORE_INDEX` elsewhere. Not truncated.
  """
  messages = conversation_messages(conversations, move_image_to_front=move_image_to_front)
  return _encode_segments(_as_template(template).segments(messages), tokenizer)


def encode_prompt(messages: Sequence[tuple[str, str | None]], tokenizer: Any,
                  template: str | Template) -> np.ndarray:
  """Token ids `int32[T]` of a generation prompt, ending with the assistant's role prompt (e.g. 'ASSISTANT:').

  `messages` are `(role, text)` pairs as for `Template.build_prompt`, text used as given (put '<image>\\n' first
  yourself, as LLaVA's eval scripts do); the last turn is human, or `(assistant, None)`. The ids equal the first
  ids of `encode_conversation` on the same turns followed by a reply.
  """
  segments = _as_template(template).segments(messages, add_generation_prompt=True)
  return _encode_segments(segments, tokenizer)[0]


def _as_template(template: str | Template) -> Template:
  return template if isinstance(template, Template) else get_template(template)


def _text_ids(tokenizer, texts: list[str]) -> list[list[int]]:
  if not texts:
    return []
  return tokenizer(texts, add_special_tokens=False)["input_ids"]


_LEADING_IDS: "weakref.WeakKeyDictionary[Any, list[int]]" = weakref.WeakKeyDictionary()


def _leading_special_ids(tokenizer) -> list[int]:
  """What the tokenizer puts before any text (LLaMA: [BOS]; none for tokenizers without a BOS)."""
  try:
    return _LEADING_IDS[tokenizer]
  except (KeyError, TypeError):
    pass
  full = tokenizer("a")["input_ids"]
  bare = _text_ids(tokenizer, ["a"])[0]
  for k in range(len(full) - len(bare) + 1):
    if full[k:k + len(bare)] == bare:
      head = list(full[:k])
      try:
        _LEADING_IDS[tokenizer] = head
      except TypeError:  # not weakly referenceable: recomputed next time.
        pass
      return head
  raise ValueError("cannot find the text ids inside the tokenizer's output for 'a'")


def _encode_segments(segments, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  # Runs: ('image', None, None) or ('text', text, supervised, context) where context is the text of the run
  # before it in the same image chunk ('' at the start of a chunk).
  runs = []
  context = ""
  for seg in segments:
    for j, part in enumerate(seg.text.split(IMAGE_TAG)):
      if j > 0:
        runs.append(("image", None, False, None))
        context = ""
      if part:
        runs.append(("text", part, seg.supervised, context))
        context = part

  queries = []
  for kind, text, _, ctx in runs:
    if kind == "text":
      queries.extend([ctx + text, ctx] if ctx else [text])
  encoded = iter(_text_ids(tokenizer, queries))

  ids = list(_leading_special_ids(tokenizer))
  labels = [IGNORE_INDEX] * len(ids)
  for kind, text, supervised, ctx in runs:
    if kind == "image":
      ids.append(IMAGE_TOKEN_INDEX)
      labels.append(IGNORE_INDEX)
      continue
    piece = list(next(encoded))
    if ctx:
      before = list(next(encoded))
      if piece[:len(before)] != before:
        raise ValueError(
            f"the tokenizer merges text across the boundary between {ctx[-30:]!r} and {text[:30]!r}, so no "
            "exact label mask exists (is the template's end-of-turn string a special token of this tokenizer?)")
      piece = piece[len(before):]
    ids.extend(piece)
    labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))
  return np.asarray(ids, np.int32), np.asarray(labels, np.int32)
