"""Conversation templates: LLaVA's `--version` prompt formats, one builder for training and generation.

A template turns a conversation, a list of `(role, text)` messages, into a list of `Segment`s: pieces of the
prompt string, each marked supervised or not. `Template.build_prompt` joins them; `llava_jax.data.tokenize`
tokenises them piece by piece, so the label mask comes from the construction and never from re-splitting the
string. A generation prompt is built by the same code and is a prefix of the training string.

The strings are those of LLaVA's `llava/conversation.py` (HEAD c121f04) for `plain`, `vicuna_v1`/`v1`, `llava_v1`,
`llava_llama_2`, `mpt` and `chatml_direct`, and of LLaVA-NeXT's `llava_llama_3` (the Llama-3-Instruct chat
format) for `llama3`. Differences from LLaVA's `Conversation.get_prompt`, all deliberate:
- No template writes a BOS token (`<s>`, `<|begin_of_text|>`): the tokenizer adds its own, as LLaVA's
  `tokenizer_image_token` does. (`llava_llama_2` keeps the literal `<s>` that separates rounds, as LLaVA does.)
- Only `None` marks the pending assistant turn of a generation prompt. LLaVA tests `if message:`, so an empty
  reply `""` silently became a generation prompt in the middle of a training string; here it is an empty reply.
- Roles must alternate human, assistant, human, ... starting with human; anything else raises `ValueError`
  (LLaVA silently drops a leading assistant turn and asserts on the rest). A trailing human turn is allowed;
  it is unsupervised.
- `plain` (stage-1 captioning) follows `preprocess_plain`, not `get_prompt`: exactly one human turn, replaced
  by its image tags alone (the instruction is discarded), then the caption and '\n'.
- `llama3` strips the whitespace around each message, as the Llama-3 chat template (`| trim`) does.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

IMAGE_TAG = "<image>"

HUMAN, ASSISTANT = 0, 1
_ROLE_NAMES = {"human": HUMAN, "user": HUMAN, "gpt": ASSISTANT, "assistant": ASSISTANT}

Message = tuple[str, "str | None"]


class Segment(NamedTuple):
  """A piece of a prompt string; `supervised` pieces are the ones the model learns to produce."""
  text: str
  supervised: bool


def move_image_to_front(text: str) -> str:
  """LLaVA's `preprocess_multimodal` for one turn: its `<image>` tags go first, each followed by '\\n'.

  `"What is this? <image>"` -> `"<image>\\nWhat is this?"`. The rest of the turn is stripped, as LLaVA does. A turn
  with several tags keeps all of them (`"<image>\\n" * n`); LLaVA collapses them into one.
  """
  count = text.count(IMAGE_TAG)
  if not count:
    return text
  rest = text.replace(IMAGE_TAG, "").strip()
  return ((IMAGE_TAG + "\n") * count + rest).strip()


def normalize_messages(messages: Sequence[Message]) -> list[tuple[int, str | None]]:
  """Checks roles and order; returns `(HUMAN | ASSISTANT, text)` pairs.

  Raises ValueError for an empty conversation, an unknown role, a non-string text, turns out of order (they must
  alternate starting with a human turn) or a `None` text anywhere but in a last assistant turn.
  """
  if not messages:
    raise ValueError("empty conversation")
  out = []
  for i, (role, text) in enumerate(messages):
    if not isinstance(role, str) or role.lower() not in _ROLE_NAMES:
      raise ValueError(f"turn {i}: unknown role {role!r} (expected one of {sorted(_ROLE_NAMES)})")
    speaker = _ROLE_NAMES[role.lower()]
    if speaker != i % 2:
      expected = "human" if i % 2 == 0 else "gpt"
      raise ValueError(f"turn {i}: turns out of order: got {role!r}, expected {expected!r} "
                       "(turns must alternate human/gpt starting with human)")
    if text is None:
      if speaker != ASSISTANT or i != len(messages) - 1:
        raise ValueError(f"turn {i}: text None is only allowed for the last, assistant, turn")
    elif not isinstance(text, str):
      raise ValueError(f"turn {i}: text must be a string, got {type(text).__name__}")
    out.append((speaker, text))
  return out


@dataclasses.dataclass(frozen=True)
class Template:
  """A conversation format.

  Attributes:
    name: the name it is registered under (LLaVA's `--version`).
    style: 'two' (Vicuna), 'plain', 'llama_2', 'mpt' (ChatML as LLaVA writes it) or 'llama3'.
    system: the system message ('' if none).
    roles: (human role, assistant role) as written in the prompt.
    sep: separator after a human turn ('two'), between rounds ('llama_2': '<s>'), or the end of every
      message ('mpt', 'llama3', 'plain').
    sep2: end of an assistant turn where it differs from `sep` ('two', 'llama_2': '</s>').
    end_of_turn: the string that ends an assistant reply (generation stops there).
  """
  name: str
  style: str
  system: str
  roles: tuple[str, str]
  sep: str
  sep2: str | None = None
  end_of_turn: str = "</s>"

  def segments(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[Segment]:
    """The prompt as pieces. A last `(assistant, None)` message, or `add_generation_prompt` after a human turn,
    ends the prompt with the assistant's role prompt (e.g. 'ASSISTANT:')."""
    turns = normalize_messages(messages)
    if add_generation_prompt:
      if turns[-1][0] == ASSISTANT:
        if turns[-1][1] is not None:
          raise ValueError("add_generation_prompt needs a conversation that ends with a human turn")
      else:
        turns.append((ASSISTANT, None))
    return _merge(getattr(self, f"_segments_{self.style}")(turns))

  def build_prompt(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The prompt string: the training string, or with a pending assistant turn, the generation prompt."""
    return "".join(s.text for s in self.segments(messages, add_generation_prompt))

  # One method per style; each yields (text, supervised) pieces of the prompt.

  def _segments_two(self, turns):
    yield Segment(self.system + self.sep, False)
    for speaker, text in turns:
      role = self.roles[speaker]
      if speaker == HUMAN:
        yield Segment(f"{role}: {text}{self.sep}", False)
      else:
        yield Segment(f"{role}:", False)
        if text is not None:
          yield Segment(f" {text}{self.sep2}", True)

  def _segments_plain(self, turns):
    if len(turns) != 2:
      raise ValueError(f"template 'plain' needs exactly one human and one assistant turn, got {len(turns)} turns")
    (_, instruction), (_, caption) = turns
    if IMAGE_TAG not in instruction:
      raise ValueError(f"template 'plain' needs an {IMAGE_TAG} tag in the human turn")
    yield Segment(IMAGE_TAG * instruction.count(IMAGE_TAG), False)
    if caption is not None:
      yield Segment(caption + self.sep, True)

  def _segments_llama_2(self, turns):
    for i, (speaker, text) in enumerate(turns):
      if speaker == HUMAN:
        if i == 0:
          text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
        yield Segment(f"{self.sep if i else ''}[INST] {text} [/INST]", False)
      elif text is not None:
        yield Segment(f" {text} {self.sep2}", True)

  def _segments_mpt(self, turns):
    yield Segment(self.system + self.sep, False)
    for speaker, text in turns:
      role = self.roles[speaker]
      if speaker == HUMAN:
        yield Segment(role + text + self.sep, False)
      else:
        yield Segment(role, False)
        if text is not None:
          yield Segment(text + self.sep, True)

  def _segments_llama3(self, turns):
    header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    if self.system:
      yield Segment(header("system") + self.system.strip() + self.sep, False)
    for speaker, text in turns:
      role = header(self.roles[speaker])
      if speaker == HUMAN:
        yield Segment(role + text.strip() + self.sep, False)
      else:
        yield Segment(role, False)
        if text is not None:
          yield Segment(text.strip() + self.sep, True)


def _merge(segments) -> list[Segment]:
  """Joins neighbours with the same supervision and drops empty pieces."""
  out: list[Segment] = []
  for seg in segments:
    if not seg.text:
      continue
    if out and out[-1].supervised == seg.supervised:
      out[-1] = Segment(out[-1].text + seg.text, seg.supervised)
    else:
      out.append(seg)
  return out


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_VISION_ASSISTANT_SYSTEM = ("You are a helpful language and vision assistant. "
                            "You are able to understand the visual content that the user provides, "
                            "and assist the user with a variety of tasks using natural language.")

_TEMPLATES = {
    "vicuna_v1": Template("vicuna_v1", "two", _VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "llava_v1": Template("llava_v1", "two", _LLAVA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
    "plain": Template("plain", "plain", "", ("", ""), "\n", None, end_of_turn="\n"),
    "llava_llama_2": Template("llava_llama_2", "llama_2", _VISION_ASSISTANT_SYSTEM, ("USER", "ASSISTANT"),
                              "<s>", "</s>"),
    "mpt": Template("mpt", "mpt",
                    "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
                    "The assistant gives helpful and honest answers.",
                    ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>", end_of_turn="<|im_end|>"),
    "chatml_direct": Template("chatml_direct", "mpt", "<|im_start|>system\nAnswer the questions.",
                              ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>",
                              end_of_turn="<|im_end|>"),
    "llama3": Template("llama3", "llama3", _VISION_ASSISTANT_SYSTEM, ("user", "assistant"), "<|eot_id|>",
                       end_of_turn="<|eot_id|>"),
}
_ALIASES = {"v1": "vicuna_v1", "mistral_direct": "chatml_direct", "llava_llama_3": "llama3"}


def template_names() -> list[str]:
  """Every name `get_template` accepts."""
  return sorted([*_TEMPLATES, *_ALIASES])


def get_template(name: str) -> Template:
  """The template registered as `name` (LLaVA's `--version`, e.g. 'plain', 'v1')."""
  key = _ALIASES.get(name, name)
  if key not in _TEMPLATES:
    raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(template_names())}")
  return _TEMPLATES[key]

