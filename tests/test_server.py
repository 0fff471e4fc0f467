"""generator.py --serve: the same text as the CLI over HTTP, streamed, queued, refusing bad requests in one line,
freed by a client that leaves; and the page, typed into in a real headless browser."""
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, run_generator

pytest.importorskip("fastapi", reason="the server's packages are absent: pip install -r requirements-serve.txt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, *flags: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "generator.py", "--load_path", str(checkpoint), "--serve",
                                         "--port", str(self.port), *flags], cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.banner = self.process.stdout.readline()
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"the server did not start: {self.process.stderr.read()}")

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str):
        connection = self.connection(5)
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8")

    def post(self, path: str, body, raw: bool = False):
        connection = self.connection()
        data = body if raw else json.dumps(body)
        connection.request("POST", path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained):
    running = Server(trained / "KoGPT2_best.tar")
    yield running
    running.stop()


def cli_text(checkpoint: Path, prompt: str, capsys, *flags) -> str:
    capsys.readouterr()
    assert run_generator("--load_path", checkpoint, "--tmp_sent", prompt, "--loops", 1, *flags) == 0
    return capsys.readouterr().out.rstrip("\n")


def test_banner_health_and_models(server, trained):
    assert server.banner.startswith(f"serving KoGPT2_best ({trained / 'KoGPT2_best.tar'}) at "
                                    f"http://127.0.0.1:{server.port}/  (API: /v1/completions;")
    status, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    models = json.loads(server.get("/v1/models")[1])
    assert models["data"][0]["id"] == "KoGPT2_best" and models["data"][0]["mode"] == "text"
    status, page = server.get("/")
    assert status == 200 and "생성 / Generate" in page and "<script src=\"/app.js\">" in page


def test_a_port_in_use_is_one_line_before_any_address(trained, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        capsys.readouterr()
        assert run_generator("--load_path", trained / "KoGPT2_best.tar", "--serve", "--port", port) == 2
    out, err = capsys.readouterr()
    assert "http://" not in out
    assert err == f"error: port {port} on 127.0.0.1 is in use (another server?); choose another --port\n"


@pytest.mark.parametrize("flags", [dict(temperature=0), dict(temperature=0.9, top_k=20, top_p=0.8, seed=11),
                                   dict(temperature=1.0, repetition_penalty=1.3, seed=5, stop=["다"])])
def test_completions_equal_the_cli(server, trained, capsys, flags):
    body = {"prompt": "오늘 아침에", "max_tokens": 25, **flags}
    status, answer = server.post("/v1/completions", body)
    assert status == 200 and answer["object"] == "text_completion"
    cli_flags = [x for k, v in flags.items() if k != "stop" for x in (f"--{k}", v)] + \
        [x for s in flags.get("stop", []) for x in ("--stop", s)]
    if "seed" not in flags:
        cli_flags += ["--seed", answer["seed"]]
    want = cli_text(trained / "KoGPT2_best.tar", "오늘 아침에", capsys, "--text_size", 25, *cli_flags)
    assert "오늘 아침에" + answer["choices"][0]["text"] == want
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert answer["usage"]["prompt_tokens"] > 0
    if answer["choices"][0]["finish_reason"] == "length":  # the tokens drawn, not a re-encoding of the text
        assert answer["usage"]["completion_tokens"] == 25


def stream_events(server, body):
    connection = server.connection()
    connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    return connection, response


def test_streamed_events_add_up_to_the_whole_answer(server):
    body = {"prompt": "우리는", "max_tokens": 30, "seed": 3, "n": 2}
    _, whole = server.post("/v1/completions", body)
    _, response = stream_events(server, body)
    texts, finished, events = ["", ""], [None, None], 0
    for line in response:
        line = line.decode("utf-8").strip()
        if not line:
            continue
        assert line.startswith("data: ")
        if line == "data: [DONE]":
            break
        event = json.loads(line[6:])
        events += 1
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
            finished[choice["index"]] = choice["finish_reason"] or finished[choice["index"]]
    assert events > 4 and texts == [c["text"] for c in whole["choices"]] and all(finished)


def test_thirty_concurrent_requests_get_thirty_right_answers(server):
    bodies = [{"prompt": f"{i}번째 이야기", "max_tokens": 12, "seed": i, "temperature": 0.8} for i in range(30)]
    expected = [server.post("/v1/completions", body)[1]["choices"][0]["text"] for body in bodies[:5]]
    answers = [None] * 30

    def ask(i: int) -> None:
        answers[i] = server.post("/v1/completions", bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(a is not None and a[0] == 200 for a in answers)
    assert [a[1]["choices"][0]["text"] for a in answers[:5]] == expected
    assert [a[1]["seed"] for a in answers] == list(range(30))


@pytest.mark.parametrize("body, message", [
    ("{not json", "the request body is not valid JSON"),
    ({"prompt": "a", "temperature": "hot"}, "temperature: Input should be a valid number"),
    ({"prompt": "a", "temperature": -1}, "temperature: Input should be greater than or equal to 0"),
    ({"prompt": "a", "top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
    ({"prompt": "a", "n": 0}, "n: Input should be greater than or equal to 1"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens: 0 is only allowed with echo"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt: give at least one prompt"),
    ({"prompt": [1, 10**6]}, "prompt: token id 1000000 is not in this model's vocabulary"),
    ({"prompt": "a", "best_of": 2}, "best_of: only 1 is supported"),
    ({"prompt": "a", "suffix": "끝"}, "suffix: insertion is not supported"),
    ({"prompt": "a", "logprobs": 6}, "logprobs: Input should be less than or equal to 5"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "a", "stop": [str(i) for i in range(17)]}, "at most 16 stop strings"),
    ({"prompt": "가 " * 400}, "This model's maximum context length is 256 tokens"),
    ({"prompt": "a", "repetition_penalty": 1e-300}, "repetition_penalty: Input should be greater than or equal"),
    ({"prompt": "a", "logit_bias": {"²": 1}}, "logit_bias: keys are token ids"),
    ({"prompt": "a", "tools": [{"type": "function"}]}, "tools: not supported"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options: only allowed with stream"),
    ({"prompt": "a", "n": 9}, "n: at most 8 samples per prompt"),
    ({"prompt": ["a"] * 33}, "prompt: at most 32 prompts per request"),
    ({"max_tokens": 5}, "prompt: this field is required"),
    ({"prompt": "a", "stop": [1]}, "stop"),
])
def test_bad_requests_get_400_while_a_good_one_is_served(server, body, message):
    good = {}
    worker = threading.Thread(target=lambda: good.update(zip(("status", "body"), server.post(
        "/v1/completions", {"prompt": "오늘", "max_tokens": 40, "seed": 1}))))
    worker.start()
    status, answer = server.post("/v1/completions", body, raw=isinstance(body, str))
    worker.join(60)
    assert status == 400 and message in answer["error"]["message"] and "\n" not in answer["error"]["message"]
    assert good["status"] == 200 and good["body"]["choices"][0]["text"]


def health(server) -> dict:
    return json.loads(server.get("/health")[1])


def freed(server, seconds: float = 5) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if health(server)["rows"] == 0:
            return True
        time.sleep(0.02)
    return False


ENDLESS = {"prompt": "긴 글", "max_tokens": 250, "n": 8, "seed": 1, "logit_bias": {"1": -100}}  # </s> banned


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_rows(server, stream):
    steps = health(server)["steps"]
    connection = server.connection()
    connection.request("POST", "/v1/completions", json.dumps({**ENDLESS, "stream": stream}),
                       {"Content-Type": "application/json"})
    while health(server)["steps"] < steps + 3:  # it runs
        time.sleep(0.01)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert freed(server) and health(server)["steps"] < steps + 250  # it left before its 250 tokens
    status, answer = server.post("/v1/completions", {"prompt": "다음", "max_tokens": 5, "seed": 2})
    assert status == 200 and health(server)["waiting"] == 0


def test_a_prompt_that_does_not_fit_is_openais_400(server):
    prompt = "오늘 " * 400  # longer than the tiny model's 256 positions
    status, answer = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
    error = answer["error"]
    assert status == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert error["message"].startswith("This model's maximum context length is 256 tokens, however you requested ")
    assert "in your prompt; 8 for the completion)" in error["message"]
    status, fits = server.post("/v1/completions", {"prompt": "오늘", "max_tokens": 1})
    prompt_tokens = fits["usage"]["prompt_tokens"]
    assert status == 200 and server.post("/v1/completions", {"prompt": "오늘", "max_tokens": 256 - prompt_tokens,
                                                             "temperature": 0, "logit_bias": {"1": -100}})[0] == 200
    status, answer = server.post("/v1/completions", {"prompt": "오늘", "max_tokens": 257 - prompt_tokens})
    assert status == 400 and (f"requested 257 tokens ({prompt_tokens} in your prompt; {257 - prompt_tokens} for the "
                              "completion)") in answer["error"]["message"]


@pytest.fixture(scope="module")
def chat_server(dialogue_chatbot):
    running = Server(dialogue_chatbot / "KoGPT2_best.tar")
    yield running
    running.stop()


TALK = ["배고파", "추천해 줘", "고마워", "비가 와"]


def cli_answers(checkpoint: Path, capsys, questions: list[str], *flags) -> list[str]:
    capsys.readouterr()
    assert run_generator("--load_path", checkpoint, *flags, stdin="".join(q + "\n" for q in questions)) == 0
    return capsys.readouterr().out.splitlines()


def test_chat_server_answers_like_the_cli_by_one_history_rule(chat_server, dialogue_chatbot, capsys):
    """The page and API clients send the whole conversation; the server keeps the turns the CLI keeps (this model's
    default: the 2 it learnt with), so the fourth answer sees the same 2 turns, not 3."""
    assert chat_server.post("/v1/completions", {"prompt": "x"})[0] == 400
    assert json.loads(chat_server.get("/v1/models")[1])["data"][0]["history"] == 2
    messages = []
    for question, want in zip(TALK, cli_answers(dialogue_chatbot, capsys, TALK, "--seed", 4), strict=True):
        messages.append({"role": "user", "content": question})
        status, answer = chat_server.post("/v1/chat/completions", {"messages": messages, "seed": 4})
        assert status == 200 and answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"] == want
        messages.append({"role": "assistant", "content": want})


def test_chat_messages_are_read_by_role_with_text_parts_and_system_messages_noted(chat_server):
    def answer(messages: list[dict]) -> dict:
        status, body = chat_server.post("/v1/chat/completions", {"messages": messages, "temperature": 0})
        assert status == 200, body
        return body

    plain = answer([{"role": "user", "content": "배고파"}, {"role": "assistant", "content": "뭐 먹고 싶어요?"},
                    {"role": "user", "content": "추천해 줘"}])
    varied = answer([{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": [{"type": "text", "text": "배고파"}]},
                     {"role": "assistant", "content": "뭐 먹고 싶어요?"}, {"role": "developer", "content": "짧게"},
                     {"role": "user", "content": [{"type": "text", "text": "추천해 줘"}]}])
    assert varied["choices"] == plain["choices"] and "notes" not in plain
    assert varied["notes"] == ["2 system/developer message(s) left out: this model learnt from question/answer "
                               "turns only"]
    joined = answer([{"role": "user", "content": "배고파"}, {"role": "user", "content": "추천해 줘"}])
    assert joined["choices"] == answer([{"role": "user", "content": "배고파 추천해 줘"}])["choices"]
    status, refused = chat_server.post("/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert status == 400 and "only text parts" in refused["error"]["message"]


def test_a_large_max_tokens_never_cuts_the_chat_question(chat_server):
    messages = [{"role": "user", "content": "배고파"}]
    _, short = chat_server.post("/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 64})
    status, long = chat_server.post("/v1/chat/completions", {"messages": messages, "temperature": 0,
                                                              "max_tokens": 2048})
    assert status == 200 and long["choices"][0]["message"]["content"] == short["choices"][0]["message"]["content"]
    assert short["choices"][0]["message"]["content"] and long["settings"]["text_size"] == 256 - long["usage"][
        "prompt_tokens"]  # the tiny model's window, less the question
    status, refused = chat_server.post("/v1/chat/completions", {"messages": [{"role": "user",
                                                                              "content": "질문 " * 300}]})
    assert status == 400 and "leaves no room for an answer" in refused["error"]["message"]


def chromium_or_skip():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them where it can)")
    pytest.importorskip("selenium")


def chromium(tmp_path: Path):
    """A headless Chromium under Selenium (the test is skipped where either is absent)."""
    chromium_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,900", "--lang=ko"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def test_the_page_streams_text_in_a_real_browser(server, tmp_path):
    driver = chromium(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "temperature").get_attribute("value"))
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys("오늘 아침에")
        driver.find_element(By.ID, "seed").send_keys("7")
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("40")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "완료" in d.find_element(By.ID, "status").text)
        shown = driver.find_element(By.CSS_SELECTOR, "#results .result .text").text
        meta = driver.find_element(By.CSS_SELECTOR, "#results .result .meta").text
        assert shown.startswith("오늘 아침에") and len(shown) > len("오늘 아침에") + 3
        assert "seed 7" in meta and "temperature" in meta
        _, answer = server.post("/v1/completions", {"prompt": "오늘 아침에", "max_tokens": 40, "seed": 7})
        assert shown == ("오늘 아침에" + answer["choices"][0]["text"]).strip()
        driver.save_screenshot(str(tmp_path / "page.png"))
        if os.environ.get("KOGPT2_SCREENSHOT"):
            shutil.copy(tmp_path / "page.png", os.environ["KOGPT2_SCREENSHOT"])
    finally:
        driver.quit()


def test_the_chat_page_answers_like_the_cli(chat_server, dialogue_chatbot, tmp_path, capsys):
    driver = chromium(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def answers_shown(driver) -> list:
        return driver.find_elements(By.CSS_SELECTOR, "#chat-log .result .text")

    try:
        driver.get(f"http://127.0.0.1:{chat_server.port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "history: 2" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "seed").send_keys("4")
        for count, question in enumerate(TALK, 1):
            driver.find_element(By.ID, "prompt").send_keys(question, Keys.ENTER)
            wait.until(lambda d: len(answers_shown(d)) == count and "완료" in d.find_element(By.ID, "status").text)
        shown = [box.text for box in answers_shown(driver)]
    finally:
        driver.quit()
    assert shown == cli_answers(dialogue_chatbot, capsys, TALK, "--seed", 4)


def client(server, **options):
    openai = pytest.importorskip("openai", reason="the openai client is a test-only dependency")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=options.pop("api_key", "none"),
                         max_retries=0, **options)


def test_the_openai_client_scores_an_echoed_prompt_like_the_model(server, trained):
    """A text prompt is read after the start token, as in training (one the server adds is not echoed); a prompt
    that writes ``<s>`` itself, or gives token ids, is taken as it is, so its first word is scored too."""
    import torch

    from kogpt2.store.opening import open_model

    opened = open_model(str(trained / "KoGPT2_best.tar"))
    prompt = "우리는 오늘 바다에 갔다"
    ids = [opened.tokenizer.bos_id] + opened.tokenizer.encode(prompt)
    with torch.no_grad():
        expected = [lp[t].item() for lp, t in zip(opened.model.eval()(torch.tensor([ids]))[0].log_softmax(-1),
                                                  ids[1:])]  # each token after the ones before it
    api = client(server)
    answer = api.completions.create(model="KoGPT2_best", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert choice.text == prompt and "".join(logprobs.tokens) == prompt and len(logprobs.tokens) == len(ids) - 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # as OpenAI: the first is null
    assert logprobs.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
    assert all(max(top.values()) >= lp for top, lp in zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:]))
    assert [prompt[:offset] for offset in logprobs.text_offset] == ["".join(logprobs.tokens[:i])
                                                                     for i in range(len(ids) - 1)]
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 0
    for whole in ("<s>" + prompt, ids):
        scored = api.completions.create(model="KoGPT2_best", prompt=whole, echo=True, logprobs=1, max_tokens=0)
        assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    one = api.completions.create(model="KoGPT2_best", prompt=prompt, echo=True, logprobs=1, max_tokens=1,
                                 temperature=0, logit_bias={"1": 100})  # the end token, forced
    assert len(one.choices[0].logprobs.tokens) == len(ids)  # the prompt's, and the one new (end) token's


def test_prompt_lists_give_one_choice_per_prompt_and_sample_in_openais_order(server):
    api = client(server)
    prompts = ["오늘", "우리는"]
    both = api.completions.create(model="KoGPT2_best", prompt=prompts, n=2, max_tokens=10, seed=7, logprobs=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for k, prompt in enumerate(prompts):  # prompt k draws with seed + k
        alone = api.completions.create(model="KoGPT2_best", prompt=prompt, n=2, max_tokens=10, seed=7 + k)
        assert [c.text for c in both.choices[2 * k:2 * k + 2]] == [c.text for c in alone.choices]
    long_stop = "아주 긴 멈춤 문자열은 열여섯 글자보다 깁니다"
    assert api.completions.create(model="KoGPT2_best", prompt="오늘", max_tokens=3, stop=long_stop).choices
    for choice in both.choices:
        assert "".join(choice.logprobs.tokens).startswith(choice.text) and all(
            lp <= 0 for lp in choice.logprobs.token_logprobs)
        assert choice.logprobs.text_offset[0] == len(prompts[choice.index // 2])  # offsets count the prompt too


def test_streams_carry_usage_when_asked_and_the_same_text(server):
    api = client(server)
    whole = api.completions.create(model="KoGPT2_best", prompt="우리는", max_tokens=20, seed=3)
    chunks = list(api.completions.create(model="KoGPT2_best", prompt="우리는", max_tokens=20, seed=3, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_models_are_found_by_their_short_name_and_others_are_404(server):
    openai = pytest.importorskip("openai")
    api = client(server)
    assert api.models.retrieve("KoGPT2_best").id == "KoGPT2_best"
    with pytest.raises(openai.NotFoundError) as missing:
        api.models.retrieve("gpt-4")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt="오늘", max_tokens=2)
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        connection = server.connection(5)
        connection.request(method, path)
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == status and error["type"] == "invalid_request_error" and path in error["message"]


def test_a_body_over_the_limit_is_413(server):
    from kogpt2.defaults import MAX_BODY_BYTES

    status, answer = server.post("/v1/completions", {"prompt": "가" * 10, "pad": "x" * MAX_BODY_BYTES})
    assert status == 413 and answer["error"]["code"] == "request_too_large"


@pytest.fixture(scope="module")
def keyed(trained):
    """A server with a key, one row and one place in line."""
    running = Server(trained / "KoGPT2_best.tar", "--api_key", "s3cret", "--max_batch", "1", "--max_queue", "1")
    yield running
    running.stop()


def test_a_key_is_required_beyond_this_computer_and_checked(trained, keyed, capsys, monkeypatch):
    openai = pytest.importorskip("openai")
    monkeypatch.delenv("KOGPT2_API_KEY", raising=False)
    capsys.readouterr()
    assert run_generator("--load_path", trained / "KoGPT2_best.tar", "--serve", "--host", "0.0.0.0") == 2
    assert "--api_key" in capsys.readouterr().err
    assert "key required" in keyed.banner and keyed.get("/health")[0] == 200
    for key in ("none", "wrong"):
        with pytest.raises(openai.AuthenticationError):
            client(keyed, api_key=key).models.list()
    api = client(keyed, api_key="s3cret")
    assert api.models.list().data[0].id == "KoGPT2_best"
    # one row, one place in line: of twelve requests at once, those with no place get 503 with Retry-After
    body = {"prompt": "긴 글", "max_tokens": 200, "logit_bias": {"1": -100}}
    headers = {"Content-Type": "application/json", "Authorization": "Bearer s3cret"}
    answers = []

    def ask() -> None:
        connection = keyed.connection()
        connection.request("POST", "/v1/completions", json.dumps(body), headers)
        response = connection.getresponse()
        answers.append((response.status, response.getheader("Retry-After"), json.loads(response.read())))

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(status for status, *_ in answers)
    assert len(answers) == 12 and set(statuses) == {200, 503} and statuses.count(200) >= 2
    assert all(after == "1" and answer["error"]["code"] == "server_busy"
               for status, after, answer in answers if status == 503)


def test_the_page_asks_for_the_key_once(keyed, tmp_path):
    driver = chromium(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(f"http://127.0.0.1:{keyed.port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(expected_conditions.alert_is_present())
        driver.switch_to.alert.send_keys("s3cret")
        driver.switch_to.alert.accept()
        wait.until(lambda d: "KoGPT2_best" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("5")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "완료" in d.find_element(By.ID, "status").text)  # no second question
    finally:
        driver.quit()


def test_chat_streams_start_with_the_role_and_join_into_the_answer(chat_server):
    api = client(chat_server)
    messages = [{"role": "user", "content": "배고파"}]
    whole = api.chat.completions.create(model="KoGPT2_best", messages=messages, seed=2)
    chunks = list(api.chat.completions.create(model="KoGPT2_best", messages=messages, seed=2, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks).rstrip() == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chat_server.banner.split("(API: ")[1].startswith("/v1/chat/completions;")
