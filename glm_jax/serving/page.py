"""The chat page served at ``/``: one static HTML document, no build step. It streams each
answer from ``/v1/chat/completions`` (server-sent events read from ``fetch``), keeps the
rounds as the ``messages`` history of the next question, and a Stop button aborts the
request (the server then cancels it and frees its slot). Temperature and top-p start at
the authors' web demo's 0.95 and 0.7 (temperature 0 is greedy); an empty "max tokens"
leaves the budget to the server. A failed request leaves the history as it was."""

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>glm_jax chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; padding: 0 1rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: 1rem; min-height: 12rem; white-space: pre-wrap; }
  .user { color: #1a4d8f; margin: .5rem 0 .2rem; }
  .assistant { margin: .2rem 0 .8rem; }
  form { display: flex; gap: .5rem; margin-top: 1rem; }
  #question { flex: 1; padding: .5rem; }
  button { padding: .5rem 1rem; }
  #settings { display: flex; gap: 1rem; margin-top: .5rem; font-size: .9rem; color: #444; }
  #settings input { width: 5rem; }
  .error { color: #a00; }
</style>
</head>
<body>
<h1>glm_jax chat</h1>
<div id="log" aria-live="polite"></div>
<form id="ask">
  <input id="question" autocomplete="off" placeholder="Ask something" autofocus>
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
  <button id="clear" type="button">Clear</button>
</form>
<div id="settings">
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.05" value="0.95"></label>
  <label>top-p <input id="top_p" type="number" min="0.01" max="1" step="0.05" value="0.7"></label>
  <label>max tokens <input id="max_tokens" type="number" min="1" step="1" placeholder="server"></label>
</div>
<script>
const log = document.getElementById("log"), question = document.getElementById("question");
const send = document.getElementById("send"), stop = document.getElementById("stop");
let messages = [], controller = null;

function line(cls, text) {
  const div = document.createElement("div");
  div.className = cls;
  div.textContent = text;
  log.appendChild(div);
  return div;
}

function settings() {
  const body = {temperature: Number(document.getElementById("temperature").value),
                top_p: Number(document.getElementById("top_p").value)};
  const budget = document.getElementById("max_tokens").value;
  if (budget) body.max_tokens = Number(budget);
  return body;
}

async function ask(text) {
  const asked = messages.concat([{role: "user", content: text}]);
  line("user", "You: " + text);
  const out = line("assistant", "");
  controller = new AbortController();
  send.disabled = true; stop.disabled = false;
  let answer = "", failed = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, signal: controller.signal,
      body: JSON.stringify({messages: asked, stream: true, ...settings()})});
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message = (await response.json()).error.message; } catch (e) {}
      out.textContent = "error: " + message;
      out.className = "assistant error";
      failed = true;
      return;
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let at;
      while ((at = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, at); buffer = buffer.slice(at + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const delta = JSON.parse(data).choices[0].delta;
        if (delta.content) { answer += delta.content; out.textContent = answer; }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { out.textContent = answer + " [error: " + e + "]"; failed = true; }
  } finally {
    if (!failed) messages = asked.concat([{role: "assistant", content: answer}]);
    out.dataset.done = "true";
    controller = null; send.disabled = false; stop.disabled = true;
  }
}

document.getElementById("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = question.value.trim();
  if (text && !controller) { question.value = ""; ask(text); }
});
stop.addEventListener("click", () => controller && controller.abort());
document.getElementById("clear").addEventListener("click", () => { messages = []; log.textContent = ""; });
</script>
</body>
</html>
"""
