// The mor-jax page: streams a completion (fetch + server-sent events) and colours each token by the number of
// recursions the model ran for it (the `mor.depths` extension of the API, requested with return_depths).
"use strict";
const $ = (id) => document.getElementById(id);
let model = null, controller = null;

function legend(recursions) {
  const box = $("legend");
  box.textContent = "recursions per token: ";
  for (let d = 0; d <= recursions; d++) {
    const s = document.createElement("span");
    s.className = "tok d" + Math.min(d, 8);
    s.textContent = String(d);
    box.appendChild(s);
  }
}

async function loadModel() {
  const r = await fetch("/v1/models");
  const card = (await r.json()).data[0];
  model = card;
  const m = card.mor || {};
  $("model").textContent = `${card.id}: ${m.strategy}, ${m.recursions} recursions` +
    (m.routing ? `, ${m.routing}-choice routing` : "");
  if (!m.chat) $("mode").querySelector('option[value="chat"]').disabled = true;
  legend(m.recursions || 1);
}

function addTokens(out, tokens, depths) {
  for (let i = 0; i < tokens.length; i++) {
    const s = document.createElement("span");
    s.className = "tok d" + Math.min(depths[i], 8);
    s.dataset.depth = depths[i];
    s.title = `depth ${depths[i]}`;
    s.textContent = tokens[i];
    out.appendChild(s);
  }
}

async function send(ev) {
  ev.preventDefault();
  const chat = $("mode").value === "chat";
  const prompt = $("prompt").value;
  const body = {model: model.id, stream: true, return_depths: true, max_tokens: Number($("max_tokens").value),
                temperature: Number($("temperature").value), top_k: Number($("top_k").value)};
  if (chat) body.messages = [{role: "user", content: prompt}]; else body.prompt = prompt;
  const out = $("output");
  out.textContent = "";
  if (!chat) { const p = document.createElement("span"); p.className = "prompt"; p.textContent = prompt; out.appendChild(p); }
  $("summary").textContent = "";
  $("status").textContent = "generating…";
  $("send").disabled = true; $("stop").disabled = false;
  controller = new AbortController();
  const depths = [];
  let finish = null;
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal: controller.signal});
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data || data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        const c = msg.choices[0];
        if (c && c.mor) { addTokens(out, c.mor.tokens, c.mor.depths); depths.push(...c.mor.depths); }
        if (c && c.finish_reason) finish = c.finish_reason;
      }
    }
    $("status").textContent = `done (${finish || "stopped"})`;
  } catch (e) {
    $("status").innerHTML = "";
    const s = document.createElement("span"); s.className = "error";
    s.textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
    $("status").appendChild(s);
  } finally {
    $("send").disabled = false; $("stop").disabled = true;
    if (depths.length) {
      const mean = depths.reduce((a, b) => a + b, 0) / depths.length;
      $("summary").textContent = `${depths.length} tokens, mean recursions per token ${mean.toFixed(2)}`;
    }
  }
}

$("form").addEventListener("submit", send);
$("stop").addEventListener("click", () => controller && controller.abort());
loadModel();
