// The mor-jax page: streams a completion or a chat reply (fetch + server-sent events) and colours each token by
// the number of recursions the model ran for it (the `mor.depths` extension of the API, asked with return_depths).
// Chat mode keeps the conversation and sends it with every turn; "New chat" starts another.
"use strict";
const $ = (id) => document.getElementById(id);
let model = null, controller = null;
let history = [];                 // chat: the turns so far, [{role, content}]
const seen = new Set();           // recursion depths that occur in the output (the legend shows these)
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const KEY = "mor_api_key";        // sessionStorage: the API key stays in this tab

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function legend() {
  const box = $("legend");
  box.textContent = "recursions per token: ";
  for (const d of [...seen].sort((a, b) => a - b)) {
    const s = document.createElement("span");
    s.className = "tok d" + Math.min(d, 8);
    s.textContent = plural(d, "recursion");
    box.appendChild(s);
  }
  box.hidden = seen.size === 0;
}

async function loadModel() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (r.status === 401) {
    $("key_row").hidden = false;
    $("model").textContent = sessionStorage.getItem(KEY) ? "the API key was refused" : "this server needs an API key";
    return;
  }
  if (!r.ok) { $("model").textContent = `error ${r.status} loading the model`; return; }
  const card = (await r.json()).data[0];
  model = card;
  const m = card.mor || {};
  $("model").textContent = `${card.id}: ${m.strategy}, ${plural(m.recursions || 1, "recursion")}` +
    (m.routing ? `, ${m.routing}-choice routing` : "");
  $("mode").querySelector('option[value="chat"]').disabled = !m.chat;
}

function clearOutput() {
  $("output").textContent = "";
  $("summary").textContent = "";
  seen.clear();
  legend();
}

function newChat() {
  history = [];
  clearOutput();
  $("new_chat").hidden = true;
}

function addTokens(target, tokens, depths) {
  for (let i = 0; i < tokens.length; i++) {
    const s = document.createElement("span");
    s.className = "tok d" + Math.min(depths[i], 8);
    s.dataset.depth = depths[i];
    s.title = plural(depths[i], "recursion");
    s.textContent = tokens[i];
    target.appendChild(s);
    seen.add(depths[i]);
  }
  legend();
}

function block(cls, text) {
  const e = document.createElement("div");
  e.className = cls;
  if (text !== undefined) e.textContent = text;
  $("output").appendChild(e);
  return e;
}

// Reads the SSE stream of `r`, adding tokens to `target`; returns the finish reason (null: none came).
async function readStream(r, target) {
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", finish = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return finish;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
      const event = buf.slice(0, i); buf = buf.slice(i).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data || data === "[DONE]") continue;
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(msg.error.message);
      const c = msg.choices[0];
      if (c && c.mor) addTokens(target, c.mor.tokens, c.mor.depths);
      if (c && c.finish_reason) finish = c.finish_reason;
    }
  }
}

async function send(ev) {
  ev.preventDefault();
  if (!model) return;
  const chat = $("mode").value === "chat";
  const prompt = $("prompt").value;
  const body = {model: model.id, stream: true, return_depths: true, max_tokens: Number($("max_tokens").value),
                temperature: Number($("temperature").value), top_k: Number($("top_k").value)};
  let target, turn = [];
  if (chat) {
    body.messages = [...history, {role: "user", content: prompt}];
    turn = [block("turn user", prompt), block("turn assistant")];
    target = turn[1];
  } else {
    body.prompt = prompt;
    clearOutput();
    target = $("output");
    const p = document.createElement("span"); p.className = "prompt"; p.textContent = prompt; target.appendChild(p);
  }
  $("summary").textContent = "";
  $("status").textContent = "generating…";
  $("send").disabled = true; $("stop").disabled = false;
  controller = new AbortController();
  let failed = false;
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {method: "POST",
      headers: headers(), body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) throw new Error((await r.json()).error.message);
    const finish = await readStream(r, target);
    $("status").textContent = `done (${finish || "stopped"})`;
  } catch (e) {
    failed = e.name !== "AbortError";
    $("status").innerHTML = "";
    const s = document.createElement("span"); s.className = "error";
    s.textContent = failed ? "error: " + e.message : "stopped";
    $("status").appendChild(s);
  } finally {
    $("send").disabled = false; $("stop").disabled = true;
    if (chat && !failed && target.textContent) {         // the turn joins the conversation (a stopped reply too)
      history.push({role: "user", content: prompt}, {role: "assistant", content: target.textContent});
      $("prompt").value = "";
    } else if (chat) {
      turn.forEach((e) => e.remove());
    }
    $("new_chat").hidden = !chat || history.length === 0;
    const depths = [...target.querySelectorAll("span.tok")].map((e) => Number(e.dataset.depth));
    if (depths.length) {
      const mean = depths.reduce((a, b) => a + b, 0) / depths.length;
      $("summary").textContent = `${plural(depths.length, "token")}, mean recursions per token ${mean.toFixed(2)}`;
    }
  }
}

$("form").addEventListener("submit", send);
$("stop").addEventListener("click", () => controller && controller.abort());
$("new_chat").addEventListener("click", newChat);
$("mode").addEventListener("change", newChat);
$("api_key").value = sessionStorage.getItem(KEY) || "";
$("api_key").addEventListener("change", () => { sessionStorage.setItem(KEY, $("api_key").value.trim()); loadModel(); });
loadModel();
