"""A local HTTP server imitating `POST /v1/chat/completions`, for offline tests and dry runs of the LLM tools.

It speaks real HTTP on 127.0.0.1 (an OS-chosen port) from a background thread. What it answers is decided by a
`respond(request_body, request_index)` callable returning a `FakeResponse`: canned text, an error status (429,
500, ...), a body that is not JSON, or a delay. Every request is recorded (body and headers) for assertions.
"""
from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
from typing import Any, Callable


@dataclasses.dataclass
class FakeResponse:
  content: str | None = None  # the assistant message (status 200)
  status: int = 200
  raw_body: bytes | None = None  # sent as is instead of a chat-completion body
  headers: dict[str, str] = dataclasses.field(default_factory=dict)
  delay_s: float = 0.0
  usage: dict[str, int] | None = None  # default: words of the prompt / of the reply


@dataclasses.dataclass
class RecordedRequest:
  path: str
  headers: dict[str, str]
  body: dict[str, Any]


def _word_count(body: dict[str, Any]) -> int:
  return sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))


class FakeChatServer:
  """Context manager: `with FakeChatServer(respond) as server: ChatClient(server.base_url, ...)`."""

  def __init__(self, respond: Callable[[dict[str, Any], int], FakeResponse]):
    self.respond = respond
    self.requests: list[RecordedRequest] = []
    self._lock = threading.Lock()
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        try:
          body = json.loads(raw)
        except json.JSONDecodeError:
          body = {"_unparsed": raw.decode("utf-8", errors="replace")}
        with outer._lock:
          index = len(outer.requests)
          outer.requests.append(RecordedRequest(self.path, dict(self.headers), body))
        if self.path.rstrip("/") != "/v1/chat/completions":
          reply = FakeResponse(status=404, raw_body=b'{"error": "unknown path"}')
        else:
          reply = outer.respond(body, index)
        if reply.delay_s:
          time.sleep(reply.delay_s)
        if reply.raw_body is not None:
          payload = reply.raw_body
        elif reply.status == 200:
          usage = reply.usage or {"prompt_tokens": _word_count(body),
                                  "completion_tokens": len((reply.content or "").split())}
          usage.setdefault("total_tokens", usage["prompt_tokens"] + usage["completion_tokens"])
          payload = json.dumps({
              "id": f"chatcmpl-{index}", "object": "chat.completion", "model": body.get("model"),
              "choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": reply.content}}],
              "usage": usage}).encode()
        else:
          payload = json.dumps({"error": {"message": f"fake status {reply.status}"}}).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in reply.headers.items():
          self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

      def log_message(self, *args):  # keep test output quiet
        del args

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  @property
  def base_url(self) -> str:
    host, port = self._server.server_address[:2]
    return f"http://{host}:{port}/v1"

  def request_count(self) -> int:
    with self._lock:
      return len(self.requests)

  def start(self) -> "FakeChatServer":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join()

  def __enter__(self) -> "FakeChatServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def main() -> None:
  """Serves replies from a JSON file {"replies": [...]} in turn (cycling), printing the base URL: for dry runs."""
  import argparse
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("replies", help='JSON file {"replies": ["text", ...]} answered in turn')
  args = parser.parse_args()
  with open(args.replies, encoding="utf-8") as f:
    replies = json.load(f)["replies"]
  with FakeChatServer(lambda body, i: FakeResponse(content=replies[i % len(replies)])) as server:
    print(server.base_url, flush=True)
    try:
      threading.Event().wait()
    except KeyboardInterrupt:
      pass


if __name__ == "__main__":
  main()
