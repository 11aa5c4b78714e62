"""Reads the data files of `llava_jax/datagen/prompts/` (or a copy given by `--prompts-dir`); see the README there."""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import pathlib
import re
from typing import Any

KINDS = ("conversation", "detail", "complex")
REPLY_FORMATS = ("qa", "description")
_EXAMPLE = re.compile(r"^(\d+)_(context|reply)\.txt$")


def prompts_root(prompts_dir: str | os.PathLike | None = None) -> Any:
  """The prompts folder: `prompts_dir` if given, else the package's (a Traversable)."""
  if prompts_dir is not None:
    root = pathlib.Path(prompts_dir)
    if not root.is_dir():
      raise FileNotFoundError(f"prompts folder {root} does not exist")
    return root
  return importlib.resources.files("llava_jax.datagen") / "prompts"


def _read(root: Any, *parts: str) -> str:
  path = root.joinpath(*parts)
  if not path.is_file():
    raise FileNotFoundError(f"prompt file {'/'.join(parts)} is missing in {root}")
  return path.read_text(encoding="utf-8")


def instruction_list(name: str, prompts_dir: str | os.PathLike | None = None) -> list[str]:
  """Lines of `<name>.txt`, without blank lines and '#' comments."""
  lines = [line.strip() for line in _read(prompts_root(prompts_dir), name + ".txt").splitlines()]
  items = [line for line in lines if line and not line.startswith("#")]
  if not items:
    raise ValueError(f"{name}.txt in {prompts_root(prompts_dir)} has no instructions")
  return items


@dataclasses.dataclass(frozen=True)
class KindPrompts:
  kind: str
  system_message: str
  examples: tuple[tuple[str, str], ...]  # (context, reply) few-shot pairs
  use_boxes: bool
  reply_format: str  # 'qa' | 'description'


def load_kind(kind: str, prompts_dir: str | os.PathLike | None = None) -> KindPrompts:
  root = prompts_root(prompts_dir)
  kinds = json.loads(_read(root, "kinds.json"))
  if kind not in kinds:
    raise KeyError(f"kind {kind!r} is not in kinds.json of {root} (has {sorted(kinds)})")
  settings = kinds[kind]
  if settings.get("reply_format") not in REPLY_FORMATS:
    raise ValueError(f"kinds.json: {kind}.reply_format must be one of {REPLY_FORMATS}")
  folder = root / kind
  found: dict[str, dict[str, str]] = {}
  for entry in folder.iterdir():
    m = _EXAMPLE.match(entry.name)
    if m:
      found.setdefault(m.group(1), {})[m.group(2)] = entry.read_text(encoding="utf-8").strip()
  examples = []
  for number in sorted(found, key=int):
    pair = found[number]
    if set(pair) != {"context", "reply"}:
      missing = ({"context", "reply"} - set(pair)).pop()
      raise FileNotFoundError(f"{kind}/{number}_{missing}.txt is missing in {root}")
    examples.append((pair["context"], pair["reply"]))
  return KindPrompts(kind=kind, system_message=_read(root, kind, "system_message.txt").strip(),
                     examples=tuple(examples), use_boxes=bool(settings.get("use_boxes", False)),
                     reply_format=settings["reply_format"])


def chat_messages(prompts: KindPrompts, context: str) -> list[dict[str, str]]:
  """System message, the few-shot (user context, assistant reply) pairs, then the query context."""
  messages = [{"role": "system", "content": prompts.system_message}]
  for example_context, reply in prompts.examples:
    messages += [{"role": "user", "content": example_context}, {"role": "assistant", "content": reply}]
  messages.append({"role": "user", "content": context})
  return messages
