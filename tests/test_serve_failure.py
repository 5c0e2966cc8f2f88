"""`--mode=serve` with an API key, and when its engine fails (issue 35), against one server process whose
engine is wrapped to raise once a trigger file exists (the injected failure): the key is required on /v1/* and
/metrics (401 with OpenAI's error body), /health and the page are open, the page asks for the key; when the
engine fails, every request queued or in flight is answered with the cause and the process exits 1 (last test)."""

import json
import os
import shutil
import threading
import time

import pytest

from test_serve import ENV, ROOT, httpx, openai, make_workdir, start_server, stop_server

pytestmark = pytest.mark.usefixtures("fast_compilation")
KEY, SLOTS, LONG = "test-key-35", 4, 900
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WRAPPER = """import os, runpy, sys
sys.path.insert(0, {root!r})
from mor_jax.infer.engine import Engine
real_step = Engine.step

def step(self, *args, **kwargs):      # the injected failure: the engine raises once the trigger file exists
  if os.path.exists({trigger!r}):
    raise RuntimeError("injected failure: the device went away")
  return real_step(self, *args, **kwargs)

Engine.step = step
sys.argv = [{main!r}] + sys.argv[1:]
runpy.run_path({main!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def trigger(tmp_path_factory):
  return str(tmp_path_factory.mktemp("failure") / "fail-now")


@pytest.fixture(scope="module")
def server(tmp_path_factory, trigger):
  d = tmp_path_factory.mktemp("failure")
  w = make_workdir(str(d / "w"), ctx=1024)
  wrapper = d / "serve_with_a_failing_engine.py"
  wrapper.write_text(WRAPPER.format(root=ROOT, trigger=trigger, main=os.path.join(ROOT, "main.py")))
  s = start_server([str(wrapper), "--mode=serve", f"--workdir={w}", "--port=0", f"--slots={SLOTS}", "--max_queue=8",
                    "--ignore_eos", "--drain_timeout=30"], api_key=KEY,
                   env=dict(ENV, MOR_API_KEY=KEY, MOR_JAX_HUGEPAGES="0"))   # (no re-exec: it would drop the wrapper)
  yield s
  stop_server(s)


def test_an_api_key_is_required_on_v1_and_metrics(server):
  assert any("API key required" in line for line in server.lines)
  for key in ("wrong", KEY + "x"):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
      client.completions.create(model="w", prompt="w1", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
  for path in ("/v1/models", "/metrics"):
    r = httpx.get(server.url + path)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + path, headers={"Authorization": "bearer " + KEY}).status_code == 200
  t0 = time.monotonic()                 # refused before the body is read
  r = httpx.post(server.url + "/v1/completions", content=b"x" * (24 << 20), timeout=30,
                 headers={"Content-Type": "application/json"})
  assert r.status_code == 401 and time.monotonic() - t0 < 5
  assert httpx.get(server.url + "/health").json()["status"] == "ok"        # open
  assert httpx.get(server.url + "/").status_code == 200
  ok = server.client.completions.create(model="w", prompt="w1 w2", max_tokens=3, temperature=0)
  assert ok.usage.completion_tokens == 3
  assert server.metric('mor_requests_total{endpoint="/v1/completions",status="401"}') == 3


@pytest.mark.environment
def test_the_page_asks_for_the_key(server):
  if not CHROMIUM:
    pytest.skip("no chromium binary (apt-get install chromium; .ci/run installs it)")
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    try:
      page = browser.new_page()
      page.goto(server.url + "/")
      page.wait_for_selector("#api_key", state="visible")
      assert page.text_content("#model") == "this server needs an API key"
      page.fill("#api_key", KEY)
      page.press("#api_key", "Tab")                                        # (change event)
      page.wait_for_function("document.querySelector('#model').textContent.includes('recursions')")
      page.fill("#prompt", "w3 w4")
      page.fill("#max_tokens", "5")
      page.click("#send")
      page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=60000)
      assert page.locator("#output span.tok").count() == 5
    finally:
      browser.close()


def test_an_engine_failure_answers_every_request_and_exits_1(server, trigger):
  """Runs last: 3 streamed and 3 plain requests (4 in slots, 2 waiting) when the engine raises: each is answered
  with the cause (500 engine_error; a stream: an error event, then [DONE]) and the process exits 1."""
  body = {"model": "w", "prompt": "w1 w2", "max_tokens": LONG, "temperature": 0}
  answers = {}

  def plain(i):
    r = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=60)
    answers[i] = (r.status_code, r.json())

  def streamed(i):
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=server.headers,
                      timeout=60) as r:
      answers[i] = (r.status_code, [line[6:] for line in r.iter_lines() if line.startswith("data: ")])
  threads = [threading.Thread(target=plain if i % 2 else streamed, args=(i,)) for i in range(6)]
  for t in threads:
    t.start()
  t0 = time.monotonic()
  while server.get("/health").json() != {"status": "ok", "slots": SLOTS, "busy": SLOTS, "waiting": 2}:
    assert time.monotonic() - t0 < 30, server.get("/health").json()
    time.sleep(0.05)
  open(trigger, "w").close()
  t0 = time.monotonic()
  for t in threads:
    t.join(30)
  assert sorted(answers) == list(range(6)) and time.monotonic() - t0 < 10
  for i, (status, got) in answers.items():
    if i % 2:
      assert status == 500 and got["error"]["code"] == "engine_error" and got["error"]["type"] == "server_error"
      message = got["error"]["message"]
    else:
      assert status == 200 and got[-1] == "[DONE]"
      message = json.loads(got[-2])["error"]["message"]
      assert json.loads(got[-2])["error"]["code"] == "engine_error"
    assert "RuntimeError: injected failure: the device went away" in message
  assert server.proc.wait(30) == 1
  assert any("the engine failed: RuntimeError: injected failure" in line and "exit code 1" in line
             for line in server.lines), "".join(server.lines[-20:])
