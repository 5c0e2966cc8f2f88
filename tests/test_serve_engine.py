"""The engine's step-wise session API the server drives (issue 25): `start` / `submit` (also while running, with
per-request sampling and seed) / `step` (streamed progress) / `cancel` / `finish`; and the serve package's
host-side pieces without a model: incremental detokenisation with stop strings, request validation, prompt
checks before tokenizing, the engine loop's answers when a request is refused or the engine fails (issue 35)."""

import asyncio
import json
import time

import pytest

pytest.importorskip("pydantic", reason="the serving extra is optional: pip install -r requirements-serve.txt")
from pydantic import ValidationError  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers

from mor_jax.infer import Generator, SamplingParams
from mor_jax.infer.engine import Engine
from mor_jax.serve.schemas import ChatRequest, CompletionRequest, validation_error
from mor_jax.serve.text import TokenText
from test_infer_engine import GREEDY, PROMPTS, tiny, variables_for

pytestmark = pytest.mark.usefixtures("fast_compilation")
HOT = SamplingParams(temperature=0.9, top_k=12)


def plain(cfg, prompt, n, sampling=GREEDY, seed=0):
  return Generator(cfg, variables_for(cfg)).generate([prompt], max_new_tokens=n, sampling=sampling, seed=seed)[0]


def test_a_session_streams_serves_late_requests_and_per_request_sampling():
  cfg = tiny()
  eng = Engine(cfg, variables_for(cfg), slots=2, max_new_tokens=10)
  eng.start(stream=True)
  a = eng.submit(PROMPTS[0], 10, row_id=0)                                    # greedy (the session's default is 1.0)
  b = eng.submit(PROMPTS[1], 7, row_id=0, sampling=HOT, seed=5)
  a_greedy = eng.submit(PROMPTS[2], 6, row_id=0, sampling=GREEDY)
  streamed, results, steps = {}, {}, 0
  late = None
  while not eng.idle or late is None:
    if steps == 2:
      late = eng.submit(PROMPTS[3], 5, row_id=0, sampling=GREEDY)           # submitted while running
    for ev in eng.step(2):
      streamed.setdefault(ev.id, []).extend(ev.tokens)
      if ev.result is not None:
        results[ev.id] = ev.result
    steps += 1
  done = eng.finish()
  assert set(done) == {a, b, a_greedy, late} and steps > 4
  for rid, r in done.items():
    assert streamed[rid] == r.tokens and results[rid] is r          # each token reported once, in order
  assert done[b].tokens == plain(cfg, PROMPTS[1], 7, HOT, seed=5).tokens      # = generate --seed=5 (row 0)
  for rid, i, n in ((a_greedy, 2, 6), (late, 3, 5)):
    want = plain(cfg, PROMPTS[i], n)
    assert (done[rid].tokens, done[rid].recursions) == (want.tokens, want.recursions)
  assert len(done[a].tokens) == 10 and eng.stats["generated_tokens"] == 10 + 7 + 6 + 5


def test_cancel_frees_the_slot_and_drops_a_waiting_request():
  cfg = tiny()
  eng = Engine(cfg, variables_for(cfg), slots=1, max_new_tokens=12)
  eng.start(stream=True, sampling=GREEDY)
  running, waiting = eng.submit(PROMPTS[0], 12), eng.submit(PROMPTS[1], 12)
  got = eng.step(1)
  assert [e.id for e in got] == [running] and eng.busy == 1 and len(eng.queue) == 1
  assert eng.cancel(waiting) and not eng.queue and not eng.cancel(12345)
  assert eng.cancel(running)
  end = eng.step(1)
  assert [e.id for e in end] == [running] and end[0].result.finish_reason == "stop"
  assert len(end[0].result.tokens) < 12 and eng.idle and eng.busy == 0
  after = eng.submit(PROMPTS[2], 4)                                           # the freed slot serves the next one
  while not eng.idle:
    eng.step()
  assert eng.finish()[after].tokens == plain(cfg, PROMPTS[2], 4).tokens
  with pytest.raises(Exception, match="no session"):
    eng.step()


def words(vocab=16):
  tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

  class T:   # mor_jax's Tokenizer interface: decode(ids) -> str
    decode = staticmethod(lambda ids: tok.decode(list(ids)))
  return T()


def test_token_text_pieces_depths_and_stop_strings():
  tt = TokenText(words())
  assert tt.add([1, 2], [1, 2]) == [("w1", 1), (" w2", 2)]
  assert tt.add([3], [0]) + tt.finish() == [(" w3", 0)]
  # a stop string is cut from the text, including across tokens; text that may start one is held back
  tt = TokenText(words(), stop=["w3 w4"])
  out = tt.add([1, 2, 3], [1, 1, 2])
  assert "".join(p for p, _ in out) == "w1" and not tt.stopped   # the last len(stop) - 1 characters wait
  out += tt.add([4, 5], [2, 2])
  assert tt.stopped and "".join(p for p, _ in out) == "w1 w2 " and tt.text == "w1 w2 "
  tt = TokenText(words(), stop=["w9"])
  assert "".join(p for p, _ in tt.add([1, 2], [1, 1]) + tt.finish()) == "w1 w2" and not tt.stopped


def test_request_validation_names_the_field():
  ok = CompletionRequest.model_validate_json('{"model": "m", "prompt": ["w1 w2"], "stop": "x"}')
  assert ok.prompt == "w1 w2" and ok.stops() == ("x",) and ok.max_tokens == 16 and ok.temperature == 1.0
  assert ChatRequest.model_validate_json('{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
                                         '"max_completion_tokens": 3}').limit() == 3
  for raw, param in (('{"model": "m", "prompt": "x", "best_of": 2}', "best_of"),
                     ('{"model": "m", "prompt": "x", "seed": 1.5}', "seed"),
                     ('{"model": "m", "prompt": ["a", "b"]}', "prompt"),
                     ('{"model": "m", "prompt": "x", "top_p": 1.5}', "top_p")):
    with pytest.raises(ValidationError) as e:
      CompletionRequest.model_validate_json(raw)
    err = validation_error(e.value.errors())
    assert err.status == 400 and err.param == param and param in err.message


def test_token_text_gives_eos_no_text():
  tt = TokenText(words(), eos_id=5)
  assert tt.add([1, 5], [1, 2]) + tt.finish() == [("w1", 1), ("", 2)]


class _FakeEngine:
  """What the HTTP layer reads from the engine (no model: these requests never reach it)."""
  cfg = type("Cfg", (), {"vocab_size": 16, "max_seq_len": 32, "strategy": "middle_cycle", "recursions": 2,
                         "mor_enable": True, "mor_type": "expert"})()
  slots, busy, max_new_tokens, context = 2, 0, 32, 32

  def default_new_tokens(self, prompt_len):
    return max(1, min(self.max_new_tokens, self.context - prompt_len))

  def encode(self, text):
    return [1] * len(text.split())


def test_chat_without_or_with_a_failing_template_and_draining_answer_clearly():
  from fastapi.testclient import TestClient  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.app import create_app  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.metrics import Metrics  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.server import Service  # pylint: disable=g-import-not-at-top

  def refuse(messages):
    raise ValueError("the chat template refused the conversation: roles must alternate\nmore")
  loop = type("Loop", (), {"waiting": 0, "error": None, "max_queue": 4})()
  svc = Service(engine=_FakeEngine(), loop=loop, metrics=Metrics(2, 2), tokenizer=None, model_name="m",
                chat_template=None, request_timeout=5.0)
  client = TestClient(create_app(svc))
  chat = {"model": "m", "messages": [{"role": "user", "content": "w1"}]}
  r = client.post("/v1/chat/completions", json=chat)
  assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
  svc.chat_template = refuse
  err = client.post("/v1/chat/completions", json=chat).json()["error"]
  assert err["code"] == "chat_template_error" and err["message"].endswith("roles must alternate")
  assert client.get("/v1/models").json()["data"][0]["mor"]["chat"] is True
  svc.draining = True
  r = client.post("/v1/completions", json={"model": "m", "prompt": "w1"})
  assert r.status_code == 503 and r.headers["retry-after"] == "5" and r.json()["error"]["code"] == "shutting_down"
  assert client.get("/health").status_code == 503
  loop.error, loop.error_message = RuntimeError("boom"), "the engine failed: RuntimeError: boom"   # (loop.py's)
  health = client.get("/health")
  assert health.status_code == 503 and health.json()["status"] == "error" and health.json()["error"].endswith("boom")
  err = client.post("/v1/completions", json={"model": "m", "prompt": "w1"}).json()["error"]
  assert err["code"] == "engine_error" and "RuntimeError: boom" in err["message"]


class _ScriptedEngine:
  """The step-wise Engine API the loop drives, without a model: a request of n tokens gets one token (id 7,
  depth 1) per step; submitting the prompt [13] is refused; `fail` makes the next step raise it."""
  slots = 2

  def __init__(self):
    self.queue, self.running, self.next_id, self.fail = [], {}, 0, None

  idle = property(lambda self: not self.queue and not self.running)
  busy = property(lambda self: len(self.running))

  def start(self, **_):
    pass

  def finish(self):
    return {}

  def submit(self, prompt, n, **_):
    from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
    if prompt == [13]:
      raise InferenceError("prompt 13 does not fit")
    self.next_id += 1
    self.queue.append([self.next_id, n])
    return self.next_id

  def cancel(self, rid):
    self.queue = [q for q in self.queue if q[0] != rid]
    return self.running.pop(rid, None) is not None

  def step(self):
    from mor_jax.infer.engine import Progress  # pylint: disable=g-import-not-at-top
    if self.fail is not None:
      raise self.fail
    while self.queue and len(self.running) < self.slots:
      rid, n = self.queue.pop(0)
      self.running[rid] = n
    out = []
    for rid in list(self.running):
      self.running[rid] -= 1
      ev = Progress(rid, [7], [1])
      if self.running[rid] == 0:
        del self.running[rid]
        ev.result = type("Generation", (), {"finish_reason": "length"})()
      out.append(ev)
    return out


async def _until(job, kind: str):
  while True:
    ev = await asyncio.wait_for(job.events.get(), 10)
    if ev[0] == kind:
      return ev


def test_the_loop_answers_a_refused_request_and_every_job_when_the_engine_fails():
  """A request the engine refuses is answered and the loop goes on; when the engine raises, every job running
  or waiting is told the cause, later submissions are refused and on_failure is called."""
  from mor_jax.serve.loop import EngineLoop, Job, LoopClosed  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.metrics import Metrics  # pylint: disable=g-import-not-at-top
  eng, failures = _ScriptedEngine(), []
  loop = EngineLoop(eng, Metrics(2, 2), max_queue=4, on_failure=failures.append)

  async def main():
    def job(prompt, n=3):
      return Job(prompt, n, SamplingParams(0.0), 0, time.monotonic() + 30, asyncio.get_running_loop())
    refused, served = job([13]), job([1])
    loop.submit(refused)
    loop.submit(served)
    assert await _until(refused, "error") == ("error", "invalid_request", "prompt 13 does not fit")
    assert (await _until(served, "done"))[1].finish_reason == "length"
    jobs = [job([1], 10 ** 6) for _ in range(3)]            # 2 in slots, 1 waiting
    for j in jobs:
      loop.submit(j)
    await _until(jobs[0], "tokens")
    eng.fail = RuntimeError("the device went away")
    for j in jobs:
      _, kind, message = await _until(j, "error")
      assert kind == "engine_failed" and message.startswith("the engine failed: RuntimeError: the device went away")
    with pytest.raises(LoopClosed):
      loop.submit(job([1]))
  loop.start()
  asyncio.run(main())
  loop.stop(5)
  assert [str(e) for e in failures] == ["the device went away"] and loop.waiting == 0


def test_abort_ends_every_job_and_refuses_new_ones():
  from mor_jax.serve.loop import EngineLoop, Job, LoopClosed  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.metrics import Metrics  # pylint: disable=g-import-not-at-top
  eng = _ScriptedEngine()
  loop = EngineLoop(eng, Metrics(2, 2), max_queue=4)

  async def main():
    jobs = [Job([1], 10 ** 6, SamplingParams(0.0), 0, time.monotonic() + 30, asyncio.get_running_loop())
            for _ in range(3)]
    for j in jobs:
      loop.submit(j)
    await _until(jobs[0], "tokens")
    loop.abort("drain timeout")
    assert [await _until(j, "error") for j in jobs] == [("error", "shutting_down", "drain timeout")] * 3
    with pytest.raises(LoopClosed, match="drain timeout"):
      loop.submit(jobs[0])
  loop.start()
  asyncio.run(main())
  loop.stop(5)
  assert loop.error is None and eng.idle


def test_text_prompts_get_bos_token_ids_do_not_and_long_texts_are_refused_before_tokenizing():
  from mor_jax.serve import prepare  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.metrics import Metrics  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.schemas import ApiError  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.server import Service  # pylint: disable=g-import-not-at-top
  hf = Tokenizer(models.WordLevel({f"w{i}": i for i in range(16)}, unk_token="w0"))
  tok = type("T", (), {"hf_tokenizer": hf, "decode": staticmethod(lambda ids: hf.decode(list(ids)))})()
  eng, seen = _FakeEngine(), []
  eng.encode = lambda text: seen.append(text) or [1] * len(text.split())
  limit = prepare.max_prompt_chars(tok, 32)
  assert limit == 32 * (3 + 1)                                     # the longest token, "w10", + a separator
  svc = Service(engine=eng, loop=None, metrics=Metrics(2, 2), tokenizer=tok, model_name="m", chat_template=None,
                request_timeout=5.0, bos_id=15, max_prompt_chars=limit)
  assert prepare.completion(svc, b'{"model": "m", "prompt": "w1 w2"}')[1] == [15, 1, 1]
  assert prepare.completion(svc, b'{"model": "m", "prompt": [3, 4]}')[1] == [3, 4]
  for text, tokenized in (("w1 " * 31, True), ("w1 " * 43, False)):   # 31 words + BOS = the context; 129 chars
    with pytest.raises(ApiError, match="context") as e:
      prepare.completion(svc, json.dumps({"model": "m", "prompt": text}).encode())
    assert e.value.code == "context_length_exceeded" and (text in seen) == tokenized


def test_serve_flags_are_checked_in_one_line_naming_the_flag():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.command import loopback as _loopback  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.options import ServeOptions, check_flags  # pylint: disable=g-import-not-at-top
  ok = ServeOptions()
  check_flags(ok)
  check_flags(dataclasses.replace(ok, api_key="sk-local-1"))
  for flag, bad in (("max_request_bytes", 10), ("idle_timeout", 0.0), ("api_key", ""), ("api_key", "two words"),
                    ("threshold", 1.5), ("step", -2), ("kv_capacity", "abc")):
    with pytest.raises(InferenceError, match=f"^--{flag}=") as e:
      check_flags(dataclasses.replace(ok, **{flag: bad}))
    assert "\n" not in str(e.value) and (flag != "api_key" or "two words" not in str(e.value))   # keys not echoed
  assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
  assert not _loopback("0.0.0.0") and not _loopback("192.168.1.5") and not _loopback("example.org")


def test_missing_serving_extra_is_one_line(monkeypatch, tmp_path):
  """Without the HTTP libraries (the serve extra), --mode=serve says what to install, before loading anything."""
  import builtins
  from mor_jax.infer.errors import InferenceError
  from mor_jax.serve import main_serve
  real = builtins.__import__

  def no_uvicorn(name, *args, **kwargs):
    if name == "uvicorn":
      raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")
    return real(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_uvicorn)
  with pytest.raises(InferenceError, match=r"uvicorn is not installed\): pip install -r requirements-serve.txt"):
    main_serve(None, str(tmp_path / "nothing-here"))
