"""OpenAI-compatible chat-completions client shared by the LLaVA-Bench judge and the instruction-data generator.

Plain HTTP (stdlib `urllib`), so any server speaking `POST {base_url}/chat/completions` works: OpenAI, Azure-style
proxies, vLLM, llama.cpp, a test server on 127.0.0.1. The API key is read from an environment variable whose
*name* is configurable; the key itself is never printed, logged or stored in outputs.

Retries: 429, 408 and 5xx statuses, connection errors, timeouts and unreadable (non-JSON) bodies are retried with
exponential backoff and jitter, bounded in delay and number; `Retry-After` is honoured up to the bound. Other 4xx
statuses (bad request, auth) fail at once. Bounded concurrency comes from a thread pool of `max_workers`.
Counters (requests, retries by cause, tokens from the `usage` field) are thread-safe; `stats()` reads them.

`ResumableJsonl` is the append-only output used to make long runs resumable: it knows the ids already written
and appends + flushes one record at a time, so an interrupted run loses at most the record being written.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import http.client
import json
import os
import pathlib
import random
import threading
import time
from typing import Any, Callable, Iterable, Iterator
import urllib.error
import urllib.request

from absl import logging

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_RETRY_STATUSES = frozenset({408, 429})


class LLMError(RuntimeError):
  """A request that failed for good: a non-retryable status, an unusable reply, or retries exhausted."""


@dataclasses.dataclass(frozen=True)
class ChatReply:
  content: str  # choices[0].message.content
  usage: dict[str, int]  # the reply's `usage` ({} when the server sends none)
  raw: dict[str, Any]  # the whole decoded body


class ChatClient:
  """Chat-completions over HTTP with retries, bounded concurrency and counters.

  Args:
    base_url: API root, e.g. "https://api.openai.com/v1"; requests go to `{base_url}/chat/completions`.
    model: model name sent with every request.
    api_key_env: name of the environment variable holding the key; unset or empty -> no Authorization header.
    timeout_s: socket timeout of one HTTP attempt.
    max_retries: retries after the first attempt (so at most max_retries + 1 attempts per request).
    backoff_initial_s, backoff_max_s: the n-th retry waits a uniform draw in [d/2, d], d = min(max, initial*2^n).
    max_workers: threads used by `map_unordered`.
    seed: seeds the jitter (tests); None -> system entropy.
  """

  def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0,
               max_retries: int = 8, backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0,
               max_workers: int = 4, seed: int | None = None):
    if not base_url:
      raise ValueError("base_url is empty")
    if max_workers < 1 or max_retries < 0:
      raise ValueError(f"need max_workers >= 1 and max_retries >= 0, got {max_workers}, {max_retries}")
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model = model
    self.api_key_env = api_key_env
    self._api_key = os.environ.get(api_key_env) or None
    if self._api_key is None:
      logging.info("No API key in $%s: sending requests without an Authorization header.", api_key_env)
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_initial_s = backoff_initial_s
    self.backoff_max_s = backoff_max_s
    self.max_workers = max_workers
    self._rng = random.Random(seed)
    self._lock = threading.Lock()
    self._counts: collections.Counter[str] = collections.Counter()

  def __repr__(self) -> str:  # keeps the key out of reprs and tracebacks
    return f"ChatClient(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

  def _count(self, **increments: int) -> None:
    with self._lock:
      self._counts.update(increments)

  def stats(self) -> dict[str, int]:
    """Snapshot of the counters: requests (HTTP attempts), ok, retries, rate_limited (429), server_errors (5xx),
    connection_errors (incl. timeouts), bad_bodies (non-JSON), failed (given up), prompt/completion/total tokens."""
    keys = ("requests", "ok", "retries", "rate_limited", "server_errors", "connection_errors", "bad_bodies",
            "failed", "prompt_tokens", "completion_tokens", "total_tokens")
    with self._lock:
      return {k: int(self._counts.get(k, 0)) for k in keys}

  def stats_line(self) -> str:
    s = self.stats()
    return (f"requests {s['requests']} (ok {s['ok']}, retries {s['retries']}: 429 x{s['rate_limited']}, "
            f"5xx x{s['server_errors']}, connection x{s['connection_errors']}, bad body x{s['bad_bodies']}; "
            f"failed {s['failed']}); tokens prompt {s['prompt_tokens']} completion {s['completion_tokens']} "
            f"total {s['total_tokens']}")

  def _backoff_s(self, retry_index: int, retry_after_s: float | None) -> float:
    delay = min(self.backoff_max_s, self.backoff_initial_s * (2.0 ** retry_index))
    with self._lock:
      delay = self._rng.uniform(delay / 2, delay)
    if retry_after_s is not None:
      delay = max(delay, min(retry_after_s, self.backoff_max_s))
    return delay

  def _post(self, payload: bytes) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self._api_key:
      headers["Authorization"] = "Bearer " + self._api_key
    request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
      return e.code, dict(e.headers or {}), e.read() or b""

  def chat(self, messages: list[dict[str, str]], **params: Any) -> ChatReply:
    """One chat completion. `params` (temperature, max_tokens, ...) go into the request body as given.

    Raises:
      LLMError: on a non-retryable status (e.g. 400, 401), a JSON reply without `choices[0].message.content`,
        or when `max_retries` retries are used up.
    """
    body = {"model": self.model, "messages": messages}
    body.update({k: v for k, v in params.items() if v is not None})
    payload = json.dumps(body).encode("utf-8")
    last_problem, retry_after_s = "", None
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(self._backoff_s(attempt - 1, retry_after_s))
        self._count(retries=1)
        retry_after_s = None
      self._count(requests=1)
      try:
        status, headers, raw = self._post(payload)
      except (http.client.HTTPException, OSError) as e:  # URLError, timeouts, resets are OSErrors
        self._count(connection_errors=1)
        last_problem = f"connection error: {type(e).__name__}: {e}"
        logging.warning("%s (attempt %d/%d): %s", self.url, attempt + 1, self.max_retries + 1, last_problem)
        continue
      if status in _RETRY_STATUSES or 500 <= status < 600:
        self._count(rate_limited=int(status == 429), server_errors=int(status >= 500))
        retry_after_s = _parse_retry_after(headers)
        last_problem = f"HTTP {status}: {_excerpt(raw)}"
        logging.warning("%s (attempt %d/%d): %s", self.url, attempt + 1, self.max_retries + 1, last_problem)
        continue
      if status != 200:
        self._count(failed=1)
        raise LLMError(f"{self.url}: HTTP {status} (not retried): {_excerpt(raw)}")
      try:
        decoded = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError):
        self._count(bad_bodies=1)
        last_problem = f"reply body is not JSON: {_excerpt(raw)}"
        logging.warning("%s (attempt %d/%d): %s", self.url, attempt + 1, self.max_retries + 1, last_problem)
        continue
      try:
        content = decoded["choices"][0]["message"]["content"]
        if not isinstance(content, str):
          raise TypeError(f"content is {type(content).__name__}")
      except (KeyError, IndexError, TypeError) as e:
        self._count(failed=1)
        raise LLMError(f"{self.url}: reply has no choices[0].message.content ({e!r}): {_excerpt(raw)}") from None
      usage = decoded.get("usage") or {}
      usage = {k: int(usage[k]) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
               if isinstance(usage.get(k), (int, float))}
      self._count(ok=1, **usage)
      return ChatReply(content=content, usage=usage, raw=decoded)
    self._count(failed=1)
    raise LLMError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last: {last_problem}")

  def map_unordered(self, fn: Callable[[Any], Any], items: Iterable[Any]
                    ) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Runs `fn(item)` on `max_workers` threads; yields (item, result, None) or (item, None, error) as they finish.

    At most `2 * max_workers` items are in flight, so an interrupted run has started little it did not finish.
    """
    items = iter(items)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_workers)
    pending: dict[concurrent.futures.Future, Any] = {}

    def refill():
      while len(pending) < 2 * self.max_workers:
        try:
          item = next(items)
        except StopIteration:
          return
        pending[pool.submit(fn, item)] = item

    try:
      refill()
      while pending:
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          item = pending.pop(future)
          error = future.exception()
          yield item, (None if error else future.result()), error
        refill()
    finally:  # on an early exit (an error, Ctrl-C) drop queued work and wait only for running requests
      pool.shutdown(wait=True, cancel_futures=True)


def _parse_retry_after(headers: dict[str, str]) -> float | None:
  for k, v in headers.items():
    if k.lower() == "retry-after":
      try:
        return max(0.0, float(v))
      except ValueError:
        return None  # an HTTP date: fall back to our own backoff
  return None


def _excerpt(raw: bytes, limit: int = 300) -> str:
  text = raw.decode("utf-8", errors="replace").strip().replace("\n", " ")
  return text if len(text) <= limit else text[:limit] + "..."


def add_client_flags(parser: argparse.ArgumentParser, *, default_workers: int = 4) -> None:
  """The endpoint flags shared by every command that talks to an LLM."""
  g = parser.add_argument_group("LLM endpoint (OpenAI-compatible chat completions)")
  g.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL),
                 help="API root; requests go to BASE_URL/chat/completions (default $OPENAI_BASE_URL or %(default)s)")
  g.add_argument("--model", required=True, help="model name, e.g. gpt-4-0314")
  g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                 help="name of the environment variable holding the API key (the key is never printed)")
  g.add_argument("--max-workers", type=int, default=default_workers, help="concurrent requests")
  g.add_argument("--max-retries", type=int, default=8, help="retries per request on 429/5xx/connection errors")
  g.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP attempt")
  g.add_argument("--backoff-initial", type=float, default=1.0, help="first retry delay in seconds (doubles)")
  g.add_argument("--backoff-max", type=float, default=60.0, help="upper bound of one retry delay in seconds")


def client_from_flags(args: argparse.Namespace) -> ChatClient:
  return ChatClient(args.base_url, args.model, api_key_env=args.api_key_env, timeout_s=args.timeout,
                    max_retries=args.max_retries, backoff_initial_s=args.backoff_initial,
                    backoff_max_s=args.backoff_max, max_workers=args.max_workers)


class ResumableJsonl:
  """Append-only JSONL output keyed by `key`: knows which ids are done, appends + flushes one record at a time.

  A last line cut off by an interrupted write (no trailing newline, not valid JSON) is dropped with a warning so
  the next append starts cleanly; any other unreadable line is an error naming the file and line. Thread-safe.
  """

  def __init__(self, path: str | os.PathLike, key: str = "id"):
    self.path = pathlib.Path(path)
    self.key = key
    self._lock = threading.Lock()
    self._done: set[Any] = set()
    self.dropped_partial_line = False
    if self.path.exists():
      self._load()
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")

  def _load(self) -> None:
    data = self.path.read_bytes()
    lines = data.split(b"\n")
    keep_bytes = len(data)
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if i == len(lines) - 1:  # no newline after it: the write was interrupted
          logging.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run.",
                          self.path, len(line))
          keep_bytes = len(data) - len(line)
          self.dropped_partial_line = True
          break
        raise ValueError(f"{self.path}:{i + 1}: not valid JSON ({e})") from None
      if not isinstance(record, dict) or self.key not in record:
        raise ValueError(f"{self.path}:{i + 1}: record without key {self.key!r}")
      self._done.add(record[self.key])
    if keep_bytes != len(data):
      with open(self.path, "r+b") as f:
        f.truncate(keep_bytes)
    elif data and not data.endswith(b"\n"):
      with open(self.path, "ab") as f:
        f.write(b"\n")

  def __contains__(self, record_id: Any) -> bool:
    with self._lock:
      return record_id in self._done

  def __len__(self) -> int:
    with self._lock:
      return len(self._done)

  @property
  def done_ids(self) -> set[Any]:
    with self._lock:
      return set(self._done)

  def write(self, record: dict[str, Any]) -> None:
    if self.key not in record:
      raise KeyError(f"record for {self.path} has no key {self.key!r}")
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with self._lock:
      self._file.write(line)
      self._file.flush()
      self._done.add(record[self.key])

  def close(self) -> None:
    with self._lock:
      self._file.close()

  def __enter__(self) -> "ResumableJsonl":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All records of a JSONL file; errors name the file and line."""
  return [record for _, record in read_jsonl_lines(path)]


def read_jsonl_lines(path: str | os.PathLike) -> list[tuple[int, Any]]:
  """(1-based line number, record) of each non-blank line of a JSONL file, for messages that name the line."""
  records = []
  with open(path, encoding="utf-8-sig") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        records.append((i + 1, json.loads(line)))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
  return records
