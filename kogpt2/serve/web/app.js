// The page talks to the same API other programs use: /v1/models, then /v1/completions or /v1/chat/completions
// with stream: true, reading the server-sent events as they arrive.
const $ = (id) => document.getElementById(id);
const fields = ["temperature", "top_k", "top_p", "repetition_penalty", "max_tokens", "seed", "n"];
let controller = null;
let chat = false;
const history = [];

// A server started with --api_key wants it on every API call: asked once, kept in this browser.
function headers() {
  const key = localStorage.getItem("kogpt2-api-key");
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

async function api(url, options = {}) {
  let response = await fetch(url, { ...options, headers: headers() });
  while (response.status === 401) {
    const key = window.prompt("API 키 / API key (--api_key)");
    if (key === null) break;
    localStorage.setItem("kogpt2-api-key", key.trim());
    response = await fetch(url, { ...options, headers: headers() });
  }
  return response;
}

async function start() {
  const info = (await (await api("/v1/models")).json()).data[0];
  chat = info.mode === "chat";
  $("model").textContent = `모델 / model: ${info.id} (${chat ? "대화 / chat" : "글쓰기 / text"})` +
    (chat ? ` · 문맥 / history: ${info.history}턴 / turns` : "");
  const d = info.defaults;
  $("temperature").value = d.temperature; $("top_k").value = d.top_k; $("top_p").value = d.top_p;
  $("repetition_penalty").value = d.repetition_penalty; $("max_tokens").value = d.text_size;
  if (chat) {
    $("title").innerHTML = "KoGPT2 챗봇 <small>/ chat</small>";
    $("prompt-label").textContent = "질문 / message";
    $("prompt").value = "";
    $("prompt").placeholder = "오늘 뭐 하고 놀까?";
    $("chat-log").hidden = false; $("reset").hidden = false; $("n").value = 1; $("n").disabled = true;
  }
}

function request() {
  const body = { stream: true };
  for (const name of fields) {
    const value = $(name).value.trim();
    if (value !== "") body[name] = name === "temperature" || name.endsWith("_p") || name === "repetition_penalty"
      ? parseFloat(value) : parseInt(value, 10);
  }
  return body;
}

async function generate() {
  const text = $("prompt").value;
  const body = request();
  let url = "/v1/completions";
  if (chat) {  // the whole conversation: the server keeps the turns its history rule keeps, as the CLI does
    url = "/v1/chat/completions";
    body.messages = [...history.flatMap(([q, a]) => [{ role: "user", content: q }, { role: "assistant", content: a }]),
                     { role: "user", content: text }];
  } else {
    body.prompt = text;
  }
  controller = new AbortController();
  $("generate").disabled = true; $("stop").disabled = false; $("status").textContent = "생성 중 / generating…";
  const boxes = [];
  const target = chat ? $("chat-log") : $("results");
  if (chat) {
    const asked = document.createElement("div");
    asked.className = "result user"; asked.textContent = text; target.appendChild(asked);
  } else {
    target.innerHTML = "";
  }
  const answers = [];
  try {
    const response = await api(url, { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      const problem = await response.json();
      throw new Error(problem.error ? problem.error.message : response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const event = JSON.parse(line.slice(6));
        for (const choice of event.choices) {
          if (!boxes[choice.index]) {
            const box = document.createElement("div");
            box.className = "result";
            box.innerHTML = '<span class="text"></span><div class="meta"></div>';
            box.querySelector(".text").textContent = chat ? "" : text;
            box.querySelector(".meta").textContent =
              `seed ${event.seed} · ${JSON.stringify(event.settings)} · sample ${choice.index + 1}`;
            target.appendChild(box);
            boxes[choice.index] = box;
            answers[choice.index] = "";
          }
          const piece = chat ? (choice.delta.content || "") : choice.text;
          answers[choice.index] += piece;
          boxes[choice.index].querySelector(".text").textContent += piece;
        }
      }
    }
    $("status").textContent = "완료 / done";
    if (chat) { history.push([text, answers[0].trim()]); $("prompt").value = ""; }
  } catch (error) {
    $("status").textContent = error.name === "AbortError" ? "멈춤 / stopped" : `오류 / error: ${error.message}`;
  } finally {
    $("generate").disabled = false; $("stop").disabled = true; controller = null;
  }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => { history.length = 0; $("chat-log").innerHTML = ""; });
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || chat) && !e.shiftKey) {
  e.preventDefault(); if (!$("generate").disabled) generate(); } });
start();
