"""`--mode=serve` (issue 25): the OpenAI-compatible server on the depth-wise batching engine, tested with the
official `openai` client against one server process on a free loopback port: completions and chat, streamed
and not; greedy (and seeded) output equal to `--mode=generate` token for token, with each token's recursion
depth; 64 concurrent streams; a client that disconnects frees its slot; bad inputs get OpenAI-style errors;
a full queue answers 429; timeouts; the web page in a real browser; SIGTERM drains and exits 0 (last test)."""

import asyncio
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

REASON = "the serving extra is optional: pip install -r requirements-serve.txt"
httpx = pytest.importorskip("httpx", reason=REASON)
openai = pytest.importorskip("openai", reason=REASON)
pytest.importorskip("fastapi", reason=REASON)

from mor_jax import config as C
from mor_jax.infer import Generator, SamplingParams, main_generate, restore
from mor_jax.infer.checkpoint import load_tokenizer
from mor_jax.interop import importer
from mor_jax.model.transformer import init_variables
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL, SLOTS, MAX_QUEUE, CTX = "tiny-mor", 4, 64, 256
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant{% endif %}")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")   # = the fast_compilation fixture

pytestmark = pytest.mark.usefixtures("fast_compilation")


def make_workdir(w: str, ctx: int = CTX) -> str:
  """A random-init MoR model (middle_cycle R=2, expert-choice) with a word-level tokenizer and a chat template."""
  c = tiny_config("middle_cycle", R=2, mor="expert", vocab=128, max_seq_len=ctx)
  cfg = C.model_config(C.validate(c, num_devices=1))
  importer.write_checkpoint(c, init_variables(cfg, jax.random.PRNGKey(0))["params"], w)
  words = {f"w{i}": i for i in range(124)}
  words.update({"user": 124, "assistant": 125, "system": 126, "<|endoftext|>": 127})
  tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(["<|endoftext|>"])
  d = os.path.join(w, "tokenizer")
  os.makedirs(d)
  tok.save(os.path.join(d, "tokenizer.json"))
  with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"chat_template": TEMPLATE, "eos_token": "<|endoftext|>"}, f)
  return w


class Server:
  def __init__(self, proc, url, lines, api_key="none"):
    self.proc, self.url, self.lines = proc, url, lines
    self.headers = {"Authorization": f"Bearer {api_key}"}
    self.client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)

  def get(self, path):
    return httpx.get(self.url + path, timeout=30, headers=self.headers)

  def metric(self, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", self.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0

  def wait_idle(self, seconds=15.0):
    end = time.time() + seconds
    while time.time() < end:
      h = self.get("/health").json()
      if h["busy"] == 0 and h["waiting"] == 0:
        return h
      time.sleep(0.05)
    raise AssertionError(f"the server is not idle after {seconds}s: {h}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return make_workdir(str(tmp_path_factory.mktemp("serve") / "w"))


def start_server(argv, env=None, api_key="none") -> Server:
  """Starts `python <argv>` (main.py --mode=serve ... or a wrapper) and waits until it serves."""
  proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env or ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  lines, ready = [], threading.Event()

  def read():
    for line in proc.stderr:
      lines.append(line)
      if " serving " in line:
        ready.set()
  threading.Thread(target=read, daemon=True).start()
  if not ready.wait(300):
    proc.kill()
    raise AssertionError("the server did not start:\n" + "".join(lines[-30:]))
  url = re.search(r"at (http://\S+)", [l for l in lines if " serving " in l][0]).group(1)
  return Server(proc, url, lines, api_key)


def stop_server(server: Server) -> None:
  if server.proc.poll() is None:
    server.proc.kill()
    server.proc.wait()


@pytest.fixture(scope="module")
def server(workdir):
  s = start_server([os.path.join(ROOT, "main.py"), "--mode=serve", f"--workdir={workdir}", "--port=0",
                    f"--slots={SLOTS}", f"--max_queue={MAX_QUEUE}", f"--served_model_name={MODEL}",
                    "--drain_timeout=30"])
  yield s
  stop_server(s)


@pytest.fixture(scope="module")
def reference(workdir):
  """The plain generation path on the same checkpoint (what --mode=generate runs)."""
  r = restore(workdir)
  return Generator(r.cfg, r.variables, load_tokenizer(r.config, r.cfg, directory=r.directory))


def generate(workdir, prompt, n, **kw):
  return main_generate(None, workdir, prompt=prompt, max_new_tokens=n, stdout=io.StringIO(), stderr=io.StringIO(),
                       **kw)[0]


@pytest.fixture(scope="module")
def long_prompt(reference):
  """A prompt whose greedy continuation runs 200 tokens without EOS (for disconnect and drain tests)."""
  prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(0, 60, 6)]
  outs = reference.generate(prompts, max_new_tokens=200, sampling=SamplingParams(0.0))
  good = [p for p, o in zip(prompts, outs) if o.finish_reason == "length"]
  assert good, "every candidate prompt reaches EOS: pick others"
  return good[0]


def test_models_health_metrics_and_page(server):
  models = server.client.models.list().data
  assert [m.id for m in models] == [MODEL]
  mor = models[0].model_extra["mor"]
  assert mor["recursions"] == 2 and mor["routing"] == "expert" and mor["chat"] and mor["slots"] == SLOTS
  assert server.get("/health").json() == {"status": "ok", "slots": SLOTS, "busy": 0, "waiting": 0}
  text = server.get("/metrics").text
  for name in ("mor_requests_total", "mor_queue_depth", "mor_busy_slots", "mor_tokens_per_second",
               "mor_time_to_first_token_seconds_bucket", "mor_inter_token_latency_seconds_bucket",
               "mor_mean_recursions_per_token"):
    assert name in text
  page = server.get("/")
  assert page.status_code == 200 and "<script src=\"/static/app.js\">" in page.text
  assert "return_depths" in server.get("/static/app.js").text
  icon = server.get("/favicon.ico")
  assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")


def test_completions_equal_generate_token_for_token(server, workdir):
  prompt = "w1 w2 w3"
  want = generate(workdir, prompt, 12, temperature=0.0)
  got = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body={"return_depths": True})
  ch = got.choices[0]
  assert ch.text == want.text and got.usage.completion_tokens == len(want.tokens) == 12
  assert ch.model_extra["mor"]["depths"] == want.recursions and "".join(ch.model_extra["mor"]["tokens"]) == want.text
  assert set(want.recursions) <= {0, 1, 2} and len(set(want.recursions)) >= 2   # tokens went to different depths
  assert ch.finish_reason == "length" and got.usage.prompt_tokens == 3
  # streamed: the same text, the same depths, one finish
  chunks = list(server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                  stream=True, extra_body={"return_depths": True}))
  assert "".join(c.choices[0].text for c in chunks) == want.text
  depths = [d for c in chunks for d in (c.choices[0].model_extra.get("mor") or {}).get("depths", [])]
  assert depths == want.recursions
  assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
  # seeded sampling: the same draws as --mode=generate --seed (top_k, a stop string)
  want = generate(workdir, prompt, 10, temperature=0.9, top_k=20, seed=7)
  got = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0.9, seed=7,
                                         extra_body={"top_k": 20})
  assert got.choices[0].text == want.text
  stop = want.text.split()[3]
  cut = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0.9, seed=7,
                                         stop=[stop], extra_body={"top_k": 20})
  assert cut.choices[0].text == want.text[:want.text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_streamed_and_not(server, workdir):
  messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w4 w5"}]
  want = generate(workdir, "system w9 user w4 w5 assistant", 8, temperature=0.0)   # the template's rendering
  got = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
  assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
  assert got.object == "chat.completion" and got.usage.prompt_tokens == 6
  chunks = list(server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
  assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def test_64_concurrent_streams_complete_once_with_the_right_text(server, reference):
  prompts = [" ".join(f"w{(7 * i + j) % 120}" for j in range(2 + i % 5)) for i in range(64)]
  want = [g.text for g in reference.generate(prompts, max_new_tokens=16, sampling=SamplingParams(0.0))]
  client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)

  async def one(p):
    texts, finishes, ids = [], [], set()
    async for c in await client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0,
                                                   stream=True):
      texts.append(c.choices[0].text)
      ids.add(c.id)
      if c.choices[0].finish_reason:
        finishes.append(c.choices[0].finish_reason)
    return "".join(texts), finishes, ids

  async def everything():
    try:
      return await asyncio.gather(*(one(p) for p in prompts))
    finally:
      await client.close()
  before = server.metric('mor_requests_total{endpoint="/v1/completions",status="200"}')
  results = asyncio.run(everything())
  assert [r[0] for r in results] == want
  assert all(len(r[1]) == 1 and len(r[2]) == 1 for r in results)
  assert len({next(iter(r[2])) for r in results}) == 64
  assert server.metric('mor_requests_total{endpoint="/v1/completions",status="200"}') == before + 64
  server.wait_idle()


def test_a_client_that_disconnects_frees_its_slot(server, long_prompt):
  cancelled = server.metric("mor_cancelled_requests_total")
  tokens = server.metric("mor_generated_tokens_total")
  body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 200, "temperature": 0, "stream": True}
  with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
    assert r.status_code == 200
    for line in r.iter_lines():
      if line.startswith("data: {"):
        break                                   # one chunk, then the client goes away
  server.wait_idle(10)
  assert server.metric("mor_cancelled_requests_total") == cancelled + 1
  assert server.metric("mor_generated_tokens_total") - tokens < 200
  ok = server.client.completions.create(model=MODEL, prompt="w1", max_tokens=3, temperature=0)
  assert ok.usage.completion_tokens == 3       # the slot serves the next request


BAD = [  # (path, raw body, status, param, code)
    ("/v1/completions", '{"model": "tiny-mor", "prompt": ', 400, None, "invalid_value"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": "w1", "frobnicate": 1}', 400, "frobnicate", "unknown_field"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": "w1", "max_tokens": "5"}', 400, "max_tokens", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": ""}', 400, "prompt", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": []}', 400, "prompt", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": [1, 128]}', 400, "prompt", "invalid_value"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "w1 " * 300}), 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": "w1 w2", "max_tokens": 255}', 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": "w1", "max_tokens": 0}', 400, "max_tokens", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": "w1", "temperature": -1}', 400, "temperature",
     "invalid_value"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": "w1", "temperature": "hot"}', 400, "temperature",
     "invalid_value"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": "w1", "top_p": 0}', 400, "top_p", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": "w1", "top_k": -2}', 400, "top_k", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": "w1", "n": 2}', 400, "n", "invalid_value"),
    ("/v1/completions", '{"model": "tiny-mor", "prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop",
     "invalid_value"),
    ("/v1/completions", '{"prompt": "w1"}', 400, "model", "invalid_value"),
    ("/v1/chat/completions", '{"model": "tiny-mor", "messages": []}', 400, "messages", "invalid_value"),
    ("/v1/chat/completions", '{"model": "tiny-mor", "messages": [{"role": "robot", "content": "w1"}]}', 400,
     "messages.0.role", "invalid_value"),
    ("/v1/chat/completions", '{"model": "tiny-mor", "messages": [{"role": "user"}]}', 400, "messages.0.content",
     "invalid_value"),
]


@pytest.mark.parametrize("path,raw,status,param,code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_gets_an_openai_error(server, path, raw, status, param, code):
  r = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["code"] == code
  assert err["message"] and "\n" not in err["message"]
  assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_the_openai_client_raises_and_the_server_stays_healthy(server):
  with pytest.raises(openai.BadRequestError, match="unknown field 'logit_bias'"):
    server.client.completions.create(model=MODEL, prompt="w1", logit_bias={"1": 5})
  assert server.get("/nowhere").json()["error"]["type"] == "not_found_error"
  assert server.wait_idle()["status"] == "ok"


def test_a_full_queue_answers_429_and_timeouts_free_the_slots(server, long_prompt):
  body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 200, "temperature": 0, "timeout": 2}

  async def burst():
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as c:
      return await asyncio.gather(*(c.post(server.url + "/v1/completions", json=body) for _ in range(100)))
  rs = asyncio.run(burst())
  codes = [r.status_code for r in rs]
  full = [r for r in rs if r.status_code == 429]
  assert full and set(codes) <= {200, 429, 504}, codes
  assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error" for r in full)
  late = [r for r in rs if r.status_code == 504]
  assert late and all(r.json()["error"]["code"] == "request_timeout" for r in late)
  assert server.metric("mor_request_timeouts_total") >= len(late)
  server.wait_idle(10)


def plural(n: int, word: str) -> str:
  return f"{n} {word}" + ("" if n == 1 else "s")


@pytest.mark.environment
def test_the_page_streams_tokens_coloured_by_depth(server, tmp_path):
  """The page: no failed load (favicon), a legend of the depths that occur ("1 recursion"), the tokens of a word
  in touching boxes, and a multi-turn chat that sends the conversation so far."""
  if not CHROMIUM:
    pytest.skip("no chromium binary (apt-get install chromium; .ci/run installs it)")
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    try:
      page = browser.new_page(viewport={"width": 1000, "height": 640})
      failed, posts = [], []
      page.on("response", lambda r: r.status >= 400 and failed.append((r.url, r.status)))
      page.on("request", lambda r: r.method == "POST" and posts.append(r.post_data_json))
      page.goto(server.url + "/")
      page.wait_for_function("document.querySelector('#model').textContent.includes('recursions')")
      assert page.text_content("#model") == f"{MODEL}: middle_cycle, 2 recursions, expert-choice routing"
      assert not page.is_visible("#legend")                              # no depths before any token
      page.fill("#prompt", "w10 w11 w12 w13")
      page.fill("#max_tokens", "40")
      page.click("#send")
      page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=60000)
      spans = page.locator("#output span.tok")
      depths = [int(d) for d in spans.evaluate_all("els => els.map(e => e.dataset.depth)")]
      classes = spans.evaluate_all("els => els.map(e => e.className)")
      assert 1 <= len(depths) <= 40 and len(set(depths)) >= 2 and set(depths) <= {0, 1, 2}
      assert classes == [f"tok d{d}" for d in depths]
      assert page.locator("#legend span").all_text_contents() == [plural(d, "recursion") for d in sorted(set(depths))]
      assert "mean recursions per token" in page.text_content("#summary")
      boxes = spans.evaluate_all("els => els.map(e => { const r = e.getClientRects()[0], s = getComputedStyle(e); "
                                 "return [r.left, r.right, r.top, s.borderTopLeftRadius, s.marginLeft, "
                                 "s.paddingLeft]; })")
      assert {tuple(b[3:]) for b in boxes} == {("0px", "0px", "0px")}     # square boxes: no notches between tokens
      same_line = [(a, b) for a, b in zip(boxes, boxes[1:]) if a[2] == b[2]]
      assert same_line and all(abs(a[1] - b[0]) < 0.01 for a, b in same_line)   # touching, no gap
      shot = os.environ.get("MOR_SERVE_SCREENSHOT") or str(tmp_path / "page.png")
      page.screenshot(path=shot, full_page=True)
      assert os.path.getsize(shot) > 10_000
      # chat: two turns; the second request carries the first exchange
      page.select_option("#mode", "chat")
      assert page.locator("#output span.tok").count() == 0 and not page.is_visible("#legend")
      for i, words in enumerate(("w4 w5", "w6 w7")):
        page.fill("#prompt", words)
        page.click("#send")
        page.wait_for_function(f"document.querySelectorAll('.turn').length == {2 * i + 2} && "
                               "document.querySelector('#status').textContent.startsWith('done')", timeout=60000)
      turns = page.locator(".turn").all_text_contents()
      assert turns[0] == "w4 w5" and turns[2] == "w6 w7" and turns[1] and turns[3]
      assert posts[-1]["messages"] == [{"role": "user", "content": "w4 w5"}, {"role": "assistant", "content": turns[1]},
                                       {"role": "user", "content": "w6 w7"}]
      assert page.is_visible("#new_chat")
      page.click("#new_chat")
      assert page.locator(".turn").count() == 0
      assert not failed, failed                                           # nothing failed to load (favicon)
    finally:
      browser.close()


def test_sigterm_drains_in_flight_requests_and_exits_0(server, long_prompt):
  """Runs last: the server stops accepting, finishes the stream in flight and exits 0."""
  body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 200, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}}
  events = []
  with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
    for line in r.iter_lines():
      if line.startswith("data: "):
        events.append(line[6:])
        if len(events) == 1:
          server.proc.send_signal(signal.SIGTERM)
          time.sleep(0.2)
          with pytest.raises(httpx.HTTPError):           # no new connections while draining
            httpx.get(server.url + "/health", timeout=5).raise_for_status()
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  assert chunks[-1]["usage"]["completion_tokens"] == 200
  assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == \
      ["length"]
  assert server.proc.wait(60) == 0
  assert any("draining" in l for l in server.lines)
