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
    def __init__(self, checkpoint: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "generator.py", "--load_path", str(checkpoint), "--serve",
                                         "--port", str(self.port)], cwd=REPO, stdout=subprocess.PIPE,
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
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
    ({"prompt": "a", "n": 9}, "n: at most 8 samples per prompt"),
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
