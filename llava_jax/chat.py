r"""Multi-turn chat about an image on stdin/stdout, tokens streamed as they are produced.

  python -m llava_jax.chat --model DIR --image IMG [--temperature 0.2] [--top-p 1] [--max-new-tokens 512]

Each line read from stdin is one user turn; the reply is streamed to stdout after 'ASSISTANT: ' (the template's
role name) and ends with a newline. The image goes with the first turn ('<image>\n' before its text, as LLaVA's
CLI does); the conversation so far (replies stripped, as LLaVA keeps them) is re-encoded through the model's
template for every turn. Blank lines are skipped; end of input, 'exit' or 'quit' ends the session. When stdin
is a terminal the user role is shown as a prompt. Logs go to stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Iterator, Sequence

from absl import logging

from llava_jax import generate
from llava_jax.data.templates import IMAGE_TAG


class ChatSession:
  """A conversation with one model: `reply(text)` streams the answer to a user turn and records both turns.

  Args:
    generator: the model, tokenizer and template.
    image: the image of the conversation (path, bytes, PIL image or preprocessed array), or None (text only).
    params: sampling settings; the template's stop strings are added, and turn i samples with seed + i.
  """

  def __init__(self, generator: generate.Generator, image: Any = None,
               params: generate.SamplingParams = generate.SamplingParams()):
    self.generator = generator
    self.images = [generator.preprocess(image)] if image is not None else []
    self.params = generator.with_stops(params)
    self.messages: list[tuple[str, str]] = []

  def reply(self, text: str) -> Iterator[str]:
    """Streams the answer to `text`; the turn pair is recorded once the answer is complete."""
    if not self.messages and self.images and IMAGE_TAG not in text:
      text = IMAGE_TAG + "\n" + text
    messages = self.messages + [("human", text)]
    request = self.generator.request(messages, self.images)
    turn = len(self.messages) // 2
    params = dataclasses.replace(self.params, seed=self.params.seed + turn)
    pieces = []
    for piece in self.generator.stream(request, params):
      pieces.append(piece)
      yield piece
    self.messages = messages + [("gpt", "".join(pieces).strip())]


def run(session: ChatSession, stdin, stdout, *, interactive: bool) -> int:
  """The read-reply loop; returns the number of turns answered."""
  roles = session.generator.template.roles
  user = (roles[0] or "USER").strip() + ": "
  assistant = (roles[1] or "ASSISTANT").strip() + ": "
  turns = 0
  while True:
    if interactive:
      stdout.write(user)
      stdout.flush()
    line = stdin.readline()
    if not line:
      break
    text = line.strip()
    if not text:
      continue
    if text.lower() in ("exit", "quit"):
      break
    stdout.write(assistant)
    stdout.flush()
    for piece in session.reply(text):
      stdout.write(piece)
      stdout.flush()
    stdout.write("\n")
    stdout.flush()
    turns += 1
  return turns


def main(argv: Sequence[str] | None = None, stdin=None, stdout=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m llava_jax.chat", description=__doc__.split("\n")[0])
  generate.add_model_flags(parser)
  parser.add_argument("--image", default=None, help="image file attached to the first turn (optional)")
  generate.add_sampling_flags(parser, max_new_tokens=512, temperature=0.2)
  args = parser.parse_args(argv)
  logging.use_absl_handler()
  stdin = stdin or sys.stdin
  stdout = stdout or sys.stdout
  generator = generate.Generator.from_folder(args.model, generate.runtime_from_flag(args.dtype),
                                             template=args.template, decode_attention=args.decode_attention)
  params = generate.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, seed=args.seed)
  session = ChatSession(generator, args.image, params)
  turns = run(session, stdin, stdout, interactive=hasattr(stdin, "isatty") and stdin.isatty())
  logging.info("chat ended after %d turns", turns)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
