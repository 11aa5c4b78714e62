"""The chat REPL driven by a scripted stdin: streamed replies, the image on the first turn, history through the
template (each reply equals a fresh generation on the hand-built conversation, and transformers' greedy tokens)."""
import io

import pytest

from llava_jax import chat
from llava_jax import generate
from llava_jax import generate_testing as testing


class RecordingOutput(io.StringIO):
  """stdout that counts writes (streaming shows as many small writes)."""

  def __init__(self):
    super().__init__()
    self.writes = 0

  def write(self, s):
    self.writes += 1
    return super().write(s)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama_tokenizer_dir):
  return testing.tokenizer_model_folder(tmp_path_factory.mktemp("chat"), llama_tokenizer_dir)


def test_chat_streams_replies_and_keeps_history(model_dir, tmp_path):
  hf, path = model_dir
  image = tmp_path / "image.png"
  testing.random_image(5).save(image)
  stdin = io.StringIO("What is in the image?\n\n  \nAnd what colour is it?\nexit\nnever read\n")
  stdout = RecordingOutput()
  argv = ["--model", str(path), "--image", str(image), "--temperature", "0", "--max-new-tokens", "12"]
  assert chat.main(argv, stdin=stdin, stdout=stdout) == 0

  gen = generate.Generator.from_folder(str(path))
  params = gen.params(max_new_tokens=12)
  first = [("human", "<image>\nWhat is in the image?")]
  request1 = gen.request(first, [str(image)])
  reply1 = gen.generate([request1], params)[0].text
  second = first + [("gpt", reply1.strip()), ("human", "And what colour is it?")]
  request2 = gen.request(second, [str(image)])
  reply2 = gen.generate([request2], params)[0].text
  assert reply1.strip() and reply2.strip()
  assert stdout.getvalue() == f"ASSISTANT: {reply1}\nASSISTANT: {reply2}\n"
  assert stdout.writes >= 2 * 2 + 6  # labels and newlines, and the replies in several pieces

  # the second prompt holds the first exchange, as Vicuna writes it; the tokens are those of transformers
  prompt2 = gen.tokenizer.decode([t for t in request2.input_ids if t >= 0])
  assert f"ASSISTANT: {reply1.strip()}</s>USER: And what colour is it? ASSISTANT:" in prompt2
  assert sum(t < 0 for t in request2.input_ids) == 1  # one image, on the first turn
  assert gen.engine.generate_ids([request2], params)[0][:12] == testing.hf_greedy(hf, [request2], 12)[0]


def test_session_text_only_and_end_of_input(model_dir):
  _, path = model_dir
  gen = generate.Generator.from_folder(str(path))
  session = chat.ChatSession(gen, None, generate.SamplingParams(max_new_tokens=6))
  stdout = io.StringIO()
  assert chat.run(session, io.StringIO("Hello there\n"), stdout, interactive=True) == 1
  assert stdout.getvalue().startswith("USER: ASSISTANT: ") and stdout.getvalue().endswith("\nUSER: ")
  assert session.messages[0] == ("human", "Hello there") and session.messages[1][0] == "gpt"
