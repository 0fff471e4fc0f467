"""Chat (--chat): KoGPT2-chatbot layout with the real tokenizers, answers-only loss, examples that cannot see each
other, and a scratch chatbot that answers in Hangul, greedy exactly as transformers."""
import csv
import io
import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import DIALOGUE_CSV, REPO, run_generator, run_main

from kogpt2.corpus.chat_format import ChatExample, ChatFormat, conversation
from kogpt2.corpus.packing import pack_examples
from kogpt2.corpus.tokenizer import load_tokenizer
from kogpt2.errors import KoGPT2Error
from kogpt2.model.head_loss import IGNORE_INDEX
from kogpt2.store.checkpoint import load_checkpoint, read_record

CHAT_CSV = REPO / "data" / "chat_sample.csv"
CHAT_TRAINING = ("--chat", "--data_file_path", CHAT_CSV, "--pretrained", "scratch:tiny", "--max_len", 64,
                 "--batch_size", 8, "--seed", 1)


def pairs():
    with CHAT_CSV.open(encoding="utf-8") as f:
        return [(row["Q"], row["A"]) for row in csv.DictReader(f)]


def test_the_sample_chat_csv_has_enough_pairs():
    assert len(pairs()) >= 200 and len(set(pairs())) == len(pairs())


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_formatted_examples_are_the_tokenizers_ids_of_the_concatenated_text(which, v1_spiece, v2_tokenizer_json):
    tokenizer = load_tokenizer(v1_spiece if which == "v1" else v2_tokenizer_json)
    chat = ChatFormat(tokenizer)
    assert (chat.usr_id, chat.sys_id) == (2, 4)  # the ids both published vocabularies give <usr> and <sys>
    for question, answer in pairs()[::7] + [("여러 줄\n질문", "답도\n두 줄"), ("😀", "하하")]:
        ids, start = chat.example(question, answer)
        assert ids == tokenizer.encode("<usr>" + question + "<sys>" + answer) + [tokenizer.eos_id]
        assert ids.count(chat.usr_id) == 1 and ids.count(chat.sys_id) == 1 and ids[start - 1] == chat.sys_id
        assert tokenizer.decode(ids[start:]) == answer


def one_turn(ids: list[int], answer_start: int) -> ChatExample:
    return ChatExample(ids, [t if i + 1 >= answer_start else IGNORE_INDEX for i, t in enumerate(ids[1:])], 1)


def test_only_the_answer_and_the_end_token_are_targets(v2_tokenizer_json):
    tokenizer = load_tokenizer(v2_tokenizer_json)
    chat = ChatFormat(tokenizer)
    examples = [chat.example(q, a) for q, a in pairs()[:12]]
    data = pack_examples([e for q, a in pairs()[:12] for e in chat.dialogue([(q, a)], 48)], 48, tokenizer.pad_id)
    batch = data.batch(torch.arange(len(data.blocks)))
    counted = [t for row in batch.targets.tolist() for t in row if t != IGNORE_INDEX]
    want = [t for ids, start in examples for t in ids[start:]]
    assert counted == want and int(data.real_tokens.sum()) == len(want)
    for ids, start in examples:  # whole examples: each appears inside one block
        assert any(ids[:-1] == row[i:i + len(ids) - 1] for row in batch.inputs.tolist() for i in range(48))


def test_a_tokens_logits_do_not_depend_on_the_example_before_it():
    from kogpt2.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4)).eval()
    second = ([5, 17, 4, 40, 41, 1], 3)  # (ids, first answer token)
    with torch.no_grad():
        alone = model(torch.tensor([second[0][:-1]]))[0]
        for first in ([5, 9, 4, 30, 1], [5, 9, 9, 9, 9, 9, 9, 4, 1], [5, 4, 1]):
            data = pack_examples([one_turn(first, 2), one_turn(*second)], 32, 3)
            batch = data.batch(torch.tensor([0]))
            logits = model(batch.inputs, segments=batch.segments)[0]
            offset = len(first) - 1
            assert torch.allclose(logits[offset:offset + 5], alone, atol=1e-5)


def test_history_slides_inside_the_window_oldest_turns_first(v2_tokenizer_json):
    chat = ChatFormat(load_tokenizer(v2_tokenizer_json))
    history = [("첫 질문", "첫 답"), ("둘째 질문", "둘째 답")]
    question = chat.prompt("셋째 질문", [], 1024)
    everything = chat.prompt("셋째 질문", history, 1024)
    assert everything == chat.example(*history[0])[0] + chat.example(*history[1])[0] + question
    newest_only = chat.prompt("셋째 질문", history, len(everything) - 1)
    assert newest_only == chat.example(*history[1])[0] + question
    long = "아주 긴 질문 " * 50  # longer than the window: kept whole, without history (the caller refuses it)
    assert chat.prompt(long, history, 20) == chat.tokenizer.encode("<usr>" + long + "<sys>")


def test_a_dialogue_is_learnt_in_one_context_and_split_at_turns(v2_tokenizer_json):
    chat = ChatFormat(load_tokenizer(v2_tokenizer_json))
    turns = [("배고파", "뭐 먹고 싶어요?"), ("추천해 줘", "국밥 어때요?"), ("고마워", "천만에요.")]
    single = [chat.example(q, a) for q, a in turns]
    (whole,) = chat.dialogue(turns, 1024)
    assert whole.ids == [t for ids, _ in single for t in ids] and whole.turns == 3
    assert [t for t in whole.targets if t != IGNORE_INDEX] == [t for ids, start in single for t in ids[start:]]
    two_turns = len(single[0][0]) + len(single[1][0]) - 1  # inputs of the first two turns: the third does not fit
    split = chat.dialogue(turns, two_turns)
    assert [e.turns for e in split] == [2, 1] and split[1].ids == single[2][0]


def test_messages_are_paired_by_role_not_by_position():
    talk = conversation([("system", "친절하게"), ("assistant", "안녕하세요!"), ("user", "배고파"), ("user", "진짜로"),
                         ("assistant", "뭐 먹을까요?"), ("developer", "짧게"), ("user", "추천해 줘")])
    assert talk.history == [("", "안녕하세요!"), ("배고파 진짜로", "뭐 먹을까요?")] and talk.question == "추천해 줘"
    assert talk.system_messages == 2 and talk.note.startswith("2 system/developer message(s) left out")
    assert conversation([("user", "배고파"), ("user", "추천해 줘")]).question == "배고파 추천해 줘"
    with pytest.raises(KoGPT2Error, match="must end with a user message"):
        conversation([("user", "배고파"), ("assistant", "밥 먹어요.")])


def test_the_question_stays_whole_and_the_answer_gets_what_the_window_leaves(v2_tokenizer_json):
    chat = ChatFormat(load_tokenizer(v2_tokenizer_json))
    model = SimpleNamespace(config=SimpleNamespace(n_positions=64))
    history = [("첫 질문", "첫 답"), ("둘째 질문", "둘째 답")]
    question = chat.prompt("셋째 질문", [], 64)
    prompt, room = chat.answer_prompt("셋째 질문", history, model.config.n_positions, 2048, 2)  # max_tokens past the window
    assert prompt == question and room == 64 - len(question)
    prompt, room = chat.answer_prompt("셋째 질문", history, model.config.n_positions, 10, 2)
    assert room == 10 and prompt == chat.example(*history[0])[0] + chat.example(*history[1])[0] + question
    assert chat.answer_prompt("셋째 질문", history, model.config.n_positions, 10, 1)[0] == chat.example(*history[1])[0] + question
    assert chat.answer_prompt("셋째 질문", history, model.config.n_positions, 10, 0)[0] == question
    with pytest.raises(KoGPT2Error, match="leaves no room for an answer"):
        chat.answer_prompt("아주 긴 질문 " * 30, [], model.config.n_positions, 10, 0)


@pytest.fixture(scope="module")
def chatbot(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatbot")
    assert run_main("--epoch", 60, "--save_path", folder, *CHAT_TRAINING) == 0
    return folder


def test_a_scratch_chatbot_answers_in_hangul_and_ends_its_answers(chatbot, capsys):
    payload = load_checkpoint(chatbot / "KoGPT2_best.tar")
    assert payload["mode"] == "chat" and payload["args"]["chat"] is True
    capsys.readouterr()
    questions = ["배고파", "비가 와", "머리가 아파"]
    assert run_generator("--load_path", chatbot, "--seed", 1, stdin="".join(q + "\n" for q in questions)) == 0
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == len(questions)  # piped: one answer a line, nothing else
    known = {a for _, a in pairs()}
    assert all(re.search("[가-힣]", a) for a in answers)
    assert sum(a in known for a in answers) >= 2


def test_greedy_answers_equal_transformers_generate(chatbot, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from kogpt2.store.opening import model_from_checkpoint

    payload = load_checkpoint(chatbot / "KoGPT2_best.tar")
    model, tokenizer = model_from_checkpoint(payload, read_record(payload, "chatbot"))
    config = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
                                    n_layer=config.n_layer, n_head=config.n_head, activation_function=config.activation,
                                    bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                    pad_token_id=tokenizer.pad_id)).eval()
    hf.load_state_dict(payload["model_state_dict"], strict=False)
    chat = ChatFormat(tokenizer)
    questions = ["졸려", "커피 마시고 싶어", "주말에 뭐 하지", "처음 보는 질문이야"]
    assert run_generator("--load_path", chatbot, "--temperature", 0, "--repetition_penalty", 1.0,
                         stdin="".join(q + "\n" for q in questions)) == 0
    ours = capsys.readouterr().out.splitlines()
    for question, answer in zip(questions, ours):
        prompt = chat.prompt(question, [], 10**6)
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64,
                          eos_token_id=[tokenizer.eos_id, chat.usr_id], suppress_tokens=[0, 3, 5])
        new = [t for t in out[0, len(prompt):].tolist() if t not in (tokenizer.eos_id, chat.usr_id)]
        full = tokenizer.decode(prompt + new)
        assert full[len(tokenizer.decode(prompt)):].strip() == answer, question


def test_questions_from_a_file_give_a_table_with_settings_and_seed(chatbot, tmp_path, capsys):
    questions = tmp_path / "questions.txt"
    questions.write_bytes("배고파\n눈이 와\n".encode("cp949"))
    output = tmp_path / "answers.csv"
    assert run_generator("--load_path", chatbot, "--prompts", questions, "--output", output, "--seed", 3) == 0
    rows = list(csv.DictReader(io.StringIO(output.read_text(encoding="utf-8-sig"))))
    assert [r["Q"] for r in rows] == ["배고파", "눈이 와"] and all(r["A"] for r in rows)
    assert rows[0]["seed"] == "3" and rows[0]["repetition_penalty"] == "1.2" and rows[0]["text_size"] == "64"
    again = tmp_path / "again.jsonl"
    assert run_generator("--load_path", chatbot, "--prompts", questions, "--output", again, "--seed", 3) == 0
    assert [json.loads(line)["A"] for line in again.read_text(encoding="utf-8").splitlines()] == [r["A"] for r in rows]


def test_reset_clears_the_history(chatbot, capsys):
    stdin = "배고파\n/reset\n배고파\n"
    assert run_generator("--load_path", chatbot, "--seed", 2, "--history", 3, stdin=stdin) == 0
    first, said, again = capsys.readouterr().out.splitlines()
    assert said.startswith("history cleared") and first == again  # the same question, seed and (empty) context


def test_a_chat_run_resumes_in_chat_mode(chatbot, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(chatbot, run)
    capsys.readouterr()
    assert run_main("--epoch", 61, "--save_path", run, "--data_file_path", CHAT_CSV, "--load_path", run) == 0
    out = capsys.readouterr().out
    banner = next(line for line in out.splitlines() if "checkpoint's settings" in line)
    assert "--chat" in banner.split() and "True" not in banner  # as typed on a command line
    assert "resuming from" in out and "오늘 뭐 하고 놀까? ->" in out


def test_validation_perplexity_is_over_answers_only(chatbot, capsys):
    from kogpt2.evaluate import main as evaluate_main

    best = load_checkpoint(chatbot / "KoGPT2_best.tar")
    capsys.readouterr()
    assert evaluate_main(["--load_path", str(chatbot), "--split", "val"]) == 0
    loss = float(capsys.readouterr().out.split("(loss ")[1].split(")")[0])
    assert abs(loss - best["progress"]["best_val_loss"]) < 1e-5


def test_an_exported_chatbot_answers_in_transformers_as_in_the_cli(chatbot, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kogpt2.export import main as export_main

    assert export_main([str(chatbot), str(tmp_path / "hf")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    capsys.readouterr()
    assert run_generator("--load_path", chatbot, "--temperature", 0, "--repetition_penalty", 1.0,
                         stdin="배고파\n") == 0
    ours = capsys.readouterr().out.strip()
    prompt = tok("<usr>배고파<sys>", return_tensors="pt").input_ids  # no start token: chat examples begin with <usr>
    out = model.generate(prompt, do_sample=False, repetition_penalty=1.0, max_new_tokens=64)
    assert tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip() == ours


def test_a_single_turn_chatbot_keeps_no_history_and_says_why_when_asked_to(chatbot, capsys):
    questions = "날씨가 좋네\n배고파\n비가 와\n"
    assert run_generator("--load_path", chatbot, "--seed", 1, stdin=questions) == 0
    default = capsys.readouterr()
    assert run_generator("--load_path", chatbot, "--seed", 1, "--history", 0, stdin=questions) == 0
    assert capsys.readouterr().out == default.out and default.err == ""
    assert run_generator("--load_path", chatbot, "--seed", 1, "--history", 2, stdin=questions) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "single question/answer pairs" in err and "--dialogue_column" in err


def test_a_text_size_past_the_window_keeps_the_question(chatbot, capsys):
    answers = []
    for size in (64, 400):  # the tiny model has 256 positions
        assert run_generator("--load_path", chatbot, "--temperature", 0, "--text_size", size, stdin="배고파\n") == 0
        answers.append(capsys.readouterr().out)
    assert answers[0].strip() and answers[1] == answers[0]
    assert run_generator("--load_path", chatbot, stdin="질문 " * 300 + "\n배고파\n") == 0
    out, err = capsys.readouterr()
    assert "leaves no room for an answer" in err and len(out.splitlines()) == 1  # the next question is answered


def test_chat_commands_list_reset_show_settings_and_refuse_what_does_nothing(chatbot, capsys):
    assert run_generator("--load_path", chatbot, stdin="/help\n/settings\n/num_samples 3\n") == 0
    out = capsys.readouterr().out
    assert "/reset" in out and "/num_samples 3" not in out
    assert {"temperature = 0.8", "text_size = 64", "history = 0", "seed = random / 무작위"} <= set(out.splitlines())
    assert "{" not in out and "/num_samples: a chat draws one answer at a time" in out


def dialogue_topics() -> dict[str, str]:
    """Each dialogue's first question -> the answer to its second, which only the first turn explains."""
    with DIALOGUE_CSV.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {first["Q"]: second["A"] for first, second in zip(rows[::3], rows[1::3])}


def test_history_helps_a_chatbot_trained_on_dialogues(dialogue_chatbot, capsys):
    payload = load_checkpoint(dialogue_chatbot / "KoGPT2_best.tar")
    assert payload["chat_turns"] == 3 and payload["args"]["dialogue_column"] == "dialogue"
    topics = dialogue_topics()

    talks = "".join(f"{first}\n추천해 줘\n/reset\n" for first in topics)

    def right_follow_ups(*flags) -> int:
        assert run_generator("--load_path", dialogue_chatbot, "--temperature", 0, *flags, stdin=talks) == 0
        follow_ups = capsys.readouterr().out.splitlines()[1::3]
        return sum(answer == advice for answer, advice in zip(follow_ups, topics.values(), strict=True))

    assert right_follow_ups() >= 0.75 * len(topics)  # by default the two earlier turns it learnt with
    assert right_follow_ups("--history", 0) <= len(topics) / 8  # "추천해 줘" alone: one answer whatever came before
