"""`--mode=serve` under hostile input (issue 35), against one server process (tiny model, context 1024, 4 slots,
EOS ignored so that generations are long): out-of-range numbers get 400 naming the field and the server goes on;
clients that go away are cancelled within a fraction of a second, streamed or not, and counted; bodies are
bounded (413 while /health keeps answering) and long texts refused before tokenizing; non-JSON posts get 415;
echo; the README's curl line as written; idle connections are closed; the drain timeout ends streams with an
error event and [DONE] (last test)."""

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_serve import ROOT, httpx, openai, make_workdir, start_server, stop_server

pytestmark = pytest.mark.usefixtures("fast_compilation")
SLOTS, CTX, IDLE_S, DRAIN_S = 4, 2048, 2.0, 1.0
LONG = CTX - 8                # tokens of a long generation (several seconds on a 2-core CPU)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """Serves a workdir folder named `w`: requests naming another model (the README's "mor") are answered."""
  w = make_workdir(str(tmp_path_factory.mktemp("hostile") / "w"), ctx=CTX)
  s = start_server([os.path.join(ROOT, "main.py"), "--mode=serve", f"--workdir={w}", "--port=0", f"--slots={SLOTS}",
                    "--max_queue=8", "--ignore_eos", f"--idle_timeout={IDLE_S}", f"--drain_timeout={DRAIN_S}"])
  # long generations first, one alone and SLOTS at once: the caches grow through every capacity bucket up to
  # LONG tokens, so the programs of each bucket are compiled before the timing-sensitive tests run
  body = {"model": "w", "prompt": "w1", "max_tokens": LONG, "temperature": 0}
  httpx.post(s.url + "/v1/completions", json=body, timeout=300).raise_for_status()
  with ThreadPoolExecutor(SLOTS) as pool:
    for r in [pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=300) for _ in range(SLOTS)]:
      r.result().raise_for_status()
  yield s
  stop_server(s)


def post(server, body, path="/v1/completions", **kw):
  raw = json.dumps(body) if isinstance(body, (dict, list)) else body
  headers = kw.pop("headers", {"Content-Type": "application/json"})
  return httpx.post(server.url + path, content=raw, headers=headers, timeout=kw.pop("timeout", 60), **kw)


def wait_idle(server, seconds: float) -> float:
  """Seconds until no slot is busy and nothing waits; fails after `seconds`."""
  t0 = time.monotonic()
  while time.monotonic() - t0 < seconds:
    h = server.get("/health").json()
    if h["busy"] == 0 and h["waiting"] == 0:
      return time.monotonic() - t0
    time.sleep(0.02)
  raise AssertionError(f"still busy after {seconds}s: {h}")


OUT_OF_RANGE = [  # (field, request body patch): each refused with 400 naming the field
    ("top_k", {"top_k": 2 ** 31}), ("seed", {"seed": 2 ** 31}), ("seed", {"seed": -1}),
    ("max_tokens", {"max_tokens": 2 ** 31}), ("max_tokens", {"max_tokens": 10 ** 30}),
    ("timeout", '"timeout": NaN'), ("timeout", '"timeout": Infinity'), ("temperature", '"temperature": -Infinity'),
    ("prompt", {"prompt": [1, 2 ** 31]}), ("prompt", {"prompt": [10 ** 30]}), ("prompt", {"prompt": [-1]}),
    ("user", {"user": "u" * 513}), ("stop", {"stop": ["s" * 257]}), ("model", {"model": "m" * 257}),
    ("model", {"model": ""}),
]


@pytest.mark.parametrize("field,patch", OUT_OF_RANGE, ids=[f"{i}-{f}" for i, (f, _) in enumerate(OUT_OF_RANGE)])
def test_out_of_range_numbers_and_strings_get_400_naming_the_field(server, field, patch):
  if isinstance(patch, str):       # JSON's non-standard NaN / Infinity: raw text
    raw = '{"model": "w", "prompt": "w1", ' + patch + "}"
  else:
    raw = json.dumps({"model": "w", "prompt": "w1", **patch})
  r = post(server, raw)
  assert r.status_code == 400, r.text
  err = r.json()["error"]
  assert err["param"] == field and err["type"] == "invalid_request_error" and field in err["message"]


def test_top_k_2_31_is_refused_and_the_server_goes_on(server):
  """The request that used to kill the engine loop; chat's own bounds; then the largest top_k and seed are
  served (the engine's int32 arrays hold them) and the server is healthy."""
  with pytest.raises(openai.BadRequestError, match="top_k"):
    server.client.completions.create(model="w", prompt="w1", max_tokens=2, extra_body={"top_k": 2 ** 31})
  assert server.client.completions.create(model="w", prompt="w1", max_tokens=2).usage.completion_tokens == 2
  chat = {"model": "w", "messages": [{"role": "user", "content": "w1", "name": "n" * 65}]}
  assert post(server, chat, "/v1/chat/completions").json()["error"]["param"] == "messages.0.name"
  chat = {"model": "w", "messages": [{"role": "user", "content": "w1"}], "max_completion_tokens": 2 ** 31}
  assert post(server, chat, "/v1/chat/completions").json()["error"]["param"] == "max_completion_tokens"
  many = {"model": "w", "messages": [{"role": "user", "content": ""}] * (CTX + 1)}
  assert post(server, many, "/v1/chat/completions").json()["error"]["code"] == "context_length_exceeded"
  ok = server.client.completions.create(model="w", prompt="w1 w2", max_tokens=4, temperature=0.7, seed=2 ** 31 - 1,
                                        extra_body={"top_k": 2 ** 31 - 1})
  assert ok.usage.completion_tokens == 4
  assert server.get("/health").json()["status"] == "ok"


def test_clients_that_go_away_are_cancelled_at_once_and_counted(server):
  """4 non-streamed long generations, closed after 1 s of generating: the slots are free within 2 s (tokens
  keep coming until then: the check does not wait for a quiet moment); then 2 streams the same."""
  body = {"model": "w", "prompt": "w1 w2 w3", "max_tokens": LONG, "temperature": 0}

  async def plain(client):
    await client.post(server.url + "/v1/completions", json=body)

  async def streamed(client):
    async with client.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r:
      async for _ in r.aiter_lines():
        pass

  async def go_away(request, n: int):
    async with httpx.AsyncClient(timeout=60) as client:
      tasks = [asyncio.create_task(request(client)) for _ in range(n)]
      t0 = time.monotonic()
      while server.get("/health").json()["busy"] < n:
        assert time.monotonic() - t0 < 30
        await asyncio.sleep(0.05)
      tokens = server.metric("mor_generated_tokens_total")
      await asyncio.sleep(1.0)
      assert server.metric("mor_generated_tokens_total") > tokens + 10          # generating when closed
      for t in tasks:
        t.cancel()                                                              # closes the connections
      await asyncio.gather(*tasks, return_exceptions=True)
  for request, n in ((plain, 4), (streamed, 2)):
    gone = server.metric("mor_client_disconnects_total")
    asyncio.run(go_away(request, n))
    assert wait_idle(server, 2.0) < 2.0
    assert server.metric("mor_client_disconnects_total") == gone + n


def test_bodies_are_bounded_and_health_answers_meanwhile(server):
  """24 MB bodies (with Content-Length, and chunked without one) get 413 in a few seconds; a 3 MB text prompt
  (under the body limit) is refused before it is tokenized; /health answers within 1 s throughout."""
  latencies, codes, stop = [], set(), threading.Event()

  def poll():
    while not stop.is_set():
      t0 = time.monotonic()
      codes.add(server.get("/health").status_code)
      latencies.append(time.monotonic() - t0)
      time.sleep(0.02)
  poller = threading.Thread(target=poll)
  poller.start()
  try:
    big = b'{"model": "w", "prompt": "' + b"w1 " * (8 << 20) + b'"}'
    assert len(big) > 24 << 20
    for content in (big, (big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20))):
      t0 = time.monotonic()
      r = post(server, content)
      assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
      assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    r = post(server, b'{"model": "w", "prompt": "' + b"w1 " * (1 << 20) + b'"}')
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in r.json()["error"]["message"] and time.monotonic() - t0 < 2
    time.sleep(0.2)
  finally:
    stop.set()
    poller.join()
  assert codes == {200} and len(latencies) >= 5 and max(latencies) < 1.0, latencies
  assert server.metric('mor_requests_total{endpoint="/v1/completions",status="413"}') == 2


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x", None])
def test_posts_that_are_not_json_get_415(server, ctype):
  """What a foreign page can send without a CORS preflight (a form, text/plain, no type) is refused."""
  r = post(server, json.dumps({"model": "w", "prompt": "w1"}), headers={"Content-Type": ctype} if ctype else {})
  assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
  preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
  assert httpx.options(server.url + "/v1/completions", headers=preflight).status_code == 405   # no CORS


def test_echo_prepends_the_prompt(server):
  plain = server.client.completions.create(model="w", prompt="w5 w6", max_tokens=5, temperature=0)
  echoed = server.client.completions.create(model="w", prompt="w5 w6", max_tokens=5, temperature=0, echo=True)
  assert echoed.choices[0].text == "w5 w6" + plain.choices[0].text and echoed.usage == plain.usage
  chunks = list(server.client.completions.create(model="w", prompt="w5 w6", max_tokens=5, temperature=0, echo=True,
                                                 stream=True))
  assert chunks[0].choices[0].text == "w5 w6" and "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
  ids = server.client.completions.create(model="w", prompt=[5, 6], max_tokens=5, temperature=0, echo=True)
  assert ids.choices[0].text.startswith("w5 w6")


def test_the_readme_curl_runs_as_written(server):
  """README's curl (naming the model "mor") against a server whose workdir folder is `w`: answered by the one
  model served, with a warning in the log."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  cmd = re.search(r"^ *(curl -s localhost:8000/v1/completions.*?\\\n.*?)$", readme, re.M).group(1)
  assert "python main.py --mode=serve --workdir=W --port=8000" in readme
  cmd = cmd.replace("\\\n", " ").replace("localhost:8000", server.url.removeprefix("http://"))
  args = shlex.split(cmd)
  if shutil.which("curl"):
    out = json.loads(subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout)
  else:                               # the same request: its -H header and -d body
    h = args[args.index("-H") + 1].split(": ")
    out = post(server, args[args.index("-d") + 1], headers={h[0]: h[1]}).json()
  body = json.loads(args[args.index("-d") + 1])
  assert body["model"] == "mor" and out["model"] == "w" and out["object"] == "text_completion"
  assert out["usage"]["completion_tokens"] == body["max_tokens"]
  assert len(out["choices"][0]["mor"]["depths"]) == body["max_tokens"]
  assert any("requests name the model 'mor'" in line for line in server.lines)


def closed_within(sock: socket.socket, seconds: float) -> float | None:
  """Seconds until the server closes `sock` (reads whatever it sends first), None if it stays open."""
  t0 = time.monotonic()
  sock.settimeout(seconds)
  try:
    while sock.recv(65536):
      pass
  except socket.timeout:
    return None
  except ConnectionResetError:
    pass
  return time.monotonic() - t0


def test_idle_connections_are_closed(server):
  """A connection that sends nothing, one that trickles its request head, one kept alive after a response:
  closed after --idle_timeout; a body that stalls gets 408; a long stream in progress meanwhile is not cut.
  (All at once: each waits for the deadline.)"""
  host, port = server.url.removeprefix("http://").split(":")
  addr = (host, int(port))

  def silent():
    with socket.create_connection(addr) as s:
      return closed_within(s, IDLE_S + 3)

  def trickle():
    with socket.create_connection(addr) as s:
      t0 = time.monotonic()
      try:
        for c in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
          s.send(bytes([c]))
          time.sleep(0.05)
      except OSError:                 # closed while trickling
        pass
      return closed_within(s, IDLE_S + 3) is not None and time.monotonic() - t0

  def kept_alive():
    with socket.create_connection(addr) as s:
      s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
      return closed_within(s, IDLE_S + 3)

  def stalled_body():
    with socket.create_connection(addr) as s:
      s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"model\"")
      s.settimeout(IDLE_S + 3)
      return s.recv(100)

  def long_stream():   # (the other slots busy with long requests too: it lasts well beyond IDLE_S)
    t0 = time.monotonic()
    body = {"model": "w", "prompt": "w1", "max_tokens": CTX - 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json=body) as r:
      return [line for line in r.iter_lines() if line.startswith("data: ")], time.monotonic() - t0

  def busy():
    return post(server, {"model": "w", "prompt": "w2", "max_tokens": LONG, "temperature": 0}).status_code
  with ThreadPoolExecutor(5 + SLOTS - 1) as pool:
    jobs = [pool.submit(f) for f in (silent, trickle, kept_alive, stalled_body, long_stream)]
    others = [pool.submit(busy) for _ in range(SLOTS - 1)]
    silent_s, trickle_s, kept_s, stalled, (lines, stream_s) = [j.result(60) for j in jobs]
    assert [j.result(60) for j in others] == [200] * (SLOTS - 1)
  assert silent_s == pytest.approx(IDLE_S, abs=1.0) and kept_s == pytest.approx(IDLE_S, abs=1.0)
  assert trickle_s and trickle_s < IDLE_S + 1.5
  assert stalled.startswith(b"HTTP/1.1 408 ")
  assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
  assert stream_s > IDLE_S                               # the stream outlived the idle deadline


def test_the_drain_timeout_ends_streams_with_an_error_event_and_done(server):
  """Runs last: SIGTERM with a stream and a plain request in flight that need longer than --drain_timeout: the
  stream gets an error event and [DONE], the plain request a 503, and the server exits 0."""
  body = {"model": "w", "prompt": "w1 w2", "max_tokens": LONG, "temperature": 0}
  plain = {}
  t = threading.Thread(target=lambda: plain.setdefault("r", post(server, body)))
  t.start()
  events, t0 = [], None
  with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
    for line in r.iter_lines():
      if line.startswith("data: "):
        events.append(line[6:])
        if len(events) == 1:
          server.proc.send_signal(signal.SIGTERM)
          t0 = time.monotonic()
  took = time.monotonic() - t0
  t.join(30)
  assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down"
  assert 10 < len(events) < LONG and DRAIN_S - 0.2 < took < DRAIN_S + 3
  assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "shutting_down"
  assert server.proc.wait(30) == 0
