"""lm-eval on our models, with the small Korean tasks of tests/lm_eval_tasks: the exported folder (`lm_eval --model
hf`) scores a text as kogpt2.evaluate does, and the server (`lm_eval --model local-completions`) gives the folder's
log-likelihood for every request. The model_args are README.md's commands."""
import json
import math

import pytest
from conftest import REPO, SAMPLE_CSV, run_main

from kogpt2.evaluate import main as evaluate_main
from kogpt2.export import main as export_main

pytest.importorskip("lm_eval", reason="lm-eval is absent: pip install -r requirements-test.txt")

TASKS = REPO / "tests" / "lm_eval_tasks"
PERPLEXITY, CHOICE = "kogpt2_ko_ppl", "kogpt2_ko_choice"


@pytest.fixture(autouse=True)
def at_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)  # the tasks name their data files from there, as the README's commands run


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval") / "hf"
    assert export_main([str(trained), str(folder)]) == 0
    return folder


def loglikelihoods(model: str, model_args: str, *tasks: str) -> dict[str, list[float]]:
    """lm-eval's log-likelihood of each request, in order (each text; each choice of each question), as
    ``lm_eval --model MODEL --model_args MODEL_ARGS --include_path tests/lm_eval_tasks --log_samples`` finds them."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), device="cpu", log_samples=True,
                              task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    found = {}
    for task, samples in results["samples"].items():
        answers = [answer for sample in sorted(samples, key=lambda s: s["doc_id"]) for answer in sample["resps"]]
        found[task] = [answer[0][0] if isinstance(answer[0], tuple) else answer[0] for answer in answers]
    return found


def evaluated(checkpoint, text: str, folder, capsys) -> tuple[float, float, int]:
    """kogpt2.evaluate on a file holding only ``text``: (perplexity, loss, tokens)."""
    one = folder / "one.jsonl"
    one.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert evaluate_main(["--load_path", str(checkpoint), "--data_file_path", str(one), "--column", "text",
                          "--no_cache"]) == 0
    words = capsys.readouterr().out.split()
    return float(words[1]), float(words[3].rstrip(")")), int(words[5])


def perplexity_is_kogpt2_evaluate(checkpoint, exported, folder, capsys) -> None:
    """lm-eval's perplexity of each text on the exported folder, with README's model_args, is kogpt2.evaluate's on
    the checkpoint; lm-eval's default scores the start token twice."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = loglikelihoods("hf", f"pretrained={exported},add_bos_token=False", PERPLEXITY)[PERPLEXITY]
    default = loglikelihoods("hf", f"pretrained={exported}", PERPLEXITY)[PERPLEXITY]
    texts = [json.loads(line)["text"] for line in (TASKS / "ko_texts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(ours) == len(default) == len(texts) == 5
    model, tokenizer = AutoModelForCausalLM.from_pretrained(exported).eval(), AutoTokenizer.from_pretrained(exported)
    for text, loglikelihood, doubled in zip(texts, ours, default):
        perplexity, loss, tokens = evaluated(checkpoint, text, folder, capsys)
        assert math.exp(-loglikelihood / tokens) == pytest.approx(perplexity, rel=1e-4), text
        assert -loglikelihood / tokens == pytest.approx(loss, abs=2e-6), text
        # lm-eval's default: its prefix token, then every token of the text as the folder's tokenizer encodes it,
        # the start token first (generation needs it): the start token is scored too, after itself
        ids = [model.config.bos_token_id] + tokenizer(text + "</s>").input_ids
        assert ids[1] == model.config.bos_token_id
        with torch.no_grad():
            logits = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        assert doubled == pytest.approx(sum(logits[i - 1, ids[i]].item() for i in range(1, len(ids))), abs=1e-4), text


def test_lm_eval_perplexity_of_the_exported_folder_is_kogpt2_evaluate(trained, exported, tmp_path, capsys):
    perplexity_is_kogpt2_evaluate(trained, exported, tmp_path, capsys)


@pytest.mark.slow
def test_the_same_for_v2_whose_start_token_is_its_end_token(v2_release, tmp_path, capsys):
    release, _ = v2_release("safetensors")
    assert run_main("--epoch", 1, "--pretrained", release, "--data_file_path", SAMPLE_CSV, "--save_path",
                    tmp_path / "run", "--max_len", 32, "--batch_size", 32, "--val_ratio", 0) == 0
    assert export_main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text(encoding="utf-8"))["bos_token"] == "</s>"
    perplexity_is_kogpt2_evaluate(tmp_path / "run", tmp_path / "hf", tmp_path, capsys)


@pytest.mark.slow
def test_lm_eval_on_the_server_gives_the_folders_loglikelihoods(trained, exported):
    from test_server import Server

    server = Server(trained / "KoGPT2_best.tar", "--served_name", "kogpt2")
    try:
        # max_length: the window (256) less one, so that every request with the start token the server adds and
        # the one token lm-eval asks for fits in it
        served = loglikelihoods("local-completions", f"model=kogpt2,base_url=http://127.0.0.1:{server.port}/v1/"
                                f"completions,tokenizer={exported},tokenizer_backend=huggingface,"
                                "tokenized_requests=False,max_length=255", PERPLEXITY, CHOICE)
    finally:
        server.stop()
    folder = {**loglikelihoods("hf", f"pretrained={exported},add_bos_token=False", PERPLEXITY),
              **loglikelihoods("hf", f"pretrained={exported},add_bos_token=True", CHOICE)}
    assert len(folder[PERPLEXITY]) == 5 and len(folder[CHOICE]) == 15
    for task in (PERPLEXITY, CHOICE):
        assert served[task] == pytest.approx(folder[task], rel=1e-5, abs=1e-4), task
