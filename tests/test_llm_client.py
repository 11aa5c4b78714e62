"""ChatClient against a real HTTP server on 127.0.0.1: retries, counters, key handling, concurrency; ResumableJsonl."""
import json
import logging
import socket
import threading
import time

import pytest

from llava_jax import llm_client
from llava_jax.llm_client_testing import FakeChatServer, FakeResponse

SECRET = "sk-test-SECRET-value-123"


def _client(server, **kw):
  kw.setdefault("backoff_initial_s", 0.001)
  kw.setdefault("backoff_max_s", 0.01)
  kw.setdefault("timeout_s", 5.0)
  return llm_client.ChatClient(server.base_url, "judge-model", seed=0, **kw)


def test_success_sends_model_params_key_and_counts_tokens(monkeypatch, caplog, capsys):
  monkeypatch.setenv("MY_KEY_VAR", SECRET)
  caplog.set_level(logging.DEBUG)
  with FakeChatServer(lambda body, i: FakeResponse(
      content="hello", usage={"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14})) as server:
    client = _client(server, api_key_env="MY_KEY_VAR")
    reply = client.chat([{"role": "user", "content": "hi"}], temperature=0.2, max_tokens=7, top_p=None)
    reply2 = client.chat([{"role": "user", "content": "again"}])
  assert reply.content == "hello" and reply2.content == "hello"
  req = server.requests[0]
  assert req.path == "/v1/chat/completions"
  assert req.body == {"model": "judge-model", "messages": [{"role": "user", "content": "hi"}],
                      "temperature": 0.2, "max_tokens": 7}  # None-valued params are not sent
  assert req.headers["Authorization"] == "Bearer " + SECRET
  stats = client.stats()
  assert (stats["requests"], stats["ok"], stats["retries"]) == (2, 2, 0)
  assert (stats["prompt_tokens"], stats["completion_tokens"], stats["total_tokens"]) == (22, 6, 28)
  out = capsys.readouterr()
  for text in (repr(client), client.stats_line(), caplog.text, out.out, out.err):
    assert SECRET not in text


def test_no_key_no_authorization_header(monkeypatch):
  monkeypatch.delenv("ABSENT_KEY_VAR", raising=False)
  with FakeChatServer(lambda body, i: FakeResponse(content="ok")) as server:
    _client(server, api_key_env="ABSENT_KEY_VAR").chat([{"role": "user", "content": "x"}])
  assert "Authorization" not in server.requests[0].headers


@pytest.mark.parametrize("failures, counter", [
    ([FakeResponse(status=429, headers={"Retry-After": "0"})] * 2, "rate_limited"),
    ([FakeResponse(status=500), FakeResponse(status=503)], "server_errors"),
    ([FakeResponse(raw_body=b"<html>proxy error</html>")], "bad_bodies"),
])
def test_retryable_failures_then_success(failures, counter):
  def respond(body, i):
    return failures[i] if i < len(failures) else FakeResponse(content="fine")

  with FakeChatServer(respond) as server:
    client = _client(server)
    assert client.chat([{"role": "user", "content": "q"}]).content == "fine"
  stats = client.stats()
  assert server.request_count() == len(failures) + 1
  assert stats["requests"] == len(failures) + 1 and stats["retries"] == len(failures)
  assert stats[counter] == len(failures) and stats["ok"] == 1 and stats["failed"] == 0


def test_gives_up_after_max_retries():
  with FakeChatServer(lambda body, i: FakeResponse(status=503)) as server:
    client = _client(server, max_retries=3)
    with pytest.raises(llm_client.LLMError, match="gave up after 4 attempts; last: HTTP 503"):
      client.chat([{"role": "user", "content": "q"}])
  assert server.request_count() == 4
  assert client.stats()["failed"] == 1 and client.stats()["server_errors"] == 4


@pytest.mark.parametrize("reply, match", [
    (FakeResponse(status=400, raw_body=b'{"error": "bad request"}'), "HTTP 400 \\(not retried\\)"),
    (FakeResponse(status=401), "HTTP 401"),
    (FakeResponse(raw_body=b'{"choices": []}'), "no choices\\[0\\].message.content"),
])
def test_non_retryable_fails_at_once(reply, match):
  with FakeChatServer(lambda body, i: reply) as server:
    client = _client(server)
    with pytest.raises(llm_client.LLMError, match=match):
      client.chat([{"role": "user", "content": "q"}])
  assert server.request_count() == 1


def test_connection_refused_is_retried_and_counted():
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()  # nothing listens on this port now
  client = llm_client.ChatClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff_initial_s=0.001,
                                 backoff_max_s=0.002, timeout_s=2)
  with pytest.raises(llm_client.LLMError, match="connection error"):
    client.chat([{"role": "user", "content": "q"}])
  assert client.stats()["connection_errors"] == 3


def test_timeout_is_retried():
  def respond(body, i):
    return FakeResponse(content="slow", delay_s=1.0) if i == 0 else FakeResponse(content="fast")

  with FakeChatServer(respond) as server:
    client = _client(server, timeout_s=0.3)
    assert client.chat([{"role": "user", "content": "q"}]).content == "fast"
  assert client.stats()["connection_errors"] == 1


def test_backoff_is_exponential_jittered_and_bounded():
  client = llm_client.ChatClient("http://127.0.0.1:1/v1", "m", backoff_initial_s=1.0, backoff_max_s=10.0, seed=1)
  for n, (lo, hi) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (5, 10), (5, 10), (5, 10)]):
    draws = [client._backoff_s(n, None) for _ in range(50)]
    assert lo <= min(draws) and max(draws) <= hi and max(draws) - min(draws) > 0
  assert client._backoff_s(0, 7.0) == 7.0  # Retry-After wins when longer
  assert client._backoff_s(0, 1000.0) == 10.0  # but stays bounded


def test_map_unordered_bounds_concurrency():
  active, peak, lock = [0], [0], threading.Lock()

  def respond(body, i):
    with lock:
      active[0] += 1
      peak[0] = max(peak[0], active[0])
    time.sleep(0.05)
    with lock:
      active[0] -= 1
    return FakeResponse(content=body["messages"][0]["content"].upper())

  with FakeChatServer(respond) as server:
    client = _client(server, max_workers=3)
    results = list(client.map_unordered(
        lambda word: client.chat([{"role": "user", "content": word}]).content, [f"w{i}" for i in range(12)]))
  assert sorted(r for _, r, _ in results) == sorted(f"W{i}" for i in range(12))
  assert all(item.upper() == r and e is None for item, r, e in results)
  assert 2 <= peak[0] <= 3


def test_map_unordered_reports_errors_per_item():
  def work(x):
    if x == 2:
      raise ValueError("bad item")
    return x * 10

  client = llm_client.ChatClient("http://127.0.0.1:1/v1", "m", max_workers=2)
  out = {item: (r, e) for item, r, e in client.map_unordered(work, range(5))}
  assert out[3] == (30, None) and isinstance(out[2][1], ValueError)


def test_resumable_jsonl(tmp_path):
  path = tmp_path / "sub" / "out.jsonl"
  with llm_client.ResumableJsonl(path, key="question_id") as w:
    w.write({"question_id": 1, "x": "a"})
    w.write({"question_id": "q2", "x": "é"})
    with pytest.raises(KeyError):
      w.write({"id": 3})
  # An interrupted write leaves a partial last line: dropped (with a warning), the next append starts cleanly.
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"question_id": 3, "x": "tru')
  w = llm_client.ResumableJsonl(path, key="question_id")
  assert w.dropped_partial_line and w.done_ids == {1, "q2"} and 1 in w and 3 not in w
  w.write({"question_id": 3, "x": "c"})
  w.close()
  assert [r["question_id"] for r in llm_client.read_jsonl(path)] == [1, "q2", 3]
  assert llm_client.read_jsonl(path)[1]["x"] == "é"
  # A bad line that is not the last one is an error naming the file and line.
  path.write_text('{"question_id": 1}\nnot json\n{"question_id": 2}\n')
  with pytest.raises(ValueError, match=r"out.jsonl:2: not valid JSON"):
    llm_client.ResumableJsonl(path, key="question_id")
  path.write_text('{"other": 1}\n')
  with pytest.raises(ValueError, match="without key 'question_id'"):
    llm_client.ResumableJsonl(path, key="question_id")
  # A complete last record without a newline is kept and the newline added.
  path.write_text('{"question_id": 5}')
  with llm_client.ResumableJsonl(path, key="question_id") as w:
    w.write({"question_id": 6})
  assert [json.loads(l)["question_id"] for l in path.read_text().splitlines()] == [5, 6]


def test_map_unordered_early_exit_drops_queued_work():
  with FakeChatServer(lambda body, i: FakeResponse(content="x", delay_s=0.1)) as server:
    client = _client(server, max_workers=2)
    results = client.map_unordered(lambda i: client.chat([{"role": "user", "content": str(i)}]), range(50))
    next(results)
    results.close()  # e.g. the caller stopped on an error or Ctrl-C
    time.sleep(0.3)
    assert server.request_count() <= 2 * 2 + 2  # what was in flight or queued, not the 50
