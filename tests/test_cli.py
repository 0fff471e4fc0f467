"""What a new user types: the README's test command, bad values for any flag, --help texts, folders as paths."""
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_generator, run_main

CLIS = {
    "main.py": lambda: __import__("main").parse_args,
    "generator.py": lambda: __import__("generator").parse_args,
    "kogpt2.evaluate": lambda: __import__("kogpt2.evaluate", fromlist=["parse_args"]).parse_args,
    "kogpt2.export": lambda: __import__("kogpt2.export", fromlist=["main"]).main,
    "kogpt2.plot": lambda: __import__("kogpt2.plot", fromlist=["main"]).main,
}


def test_readme_test_command_finds_the_package(tmp_path):
    """`pytest` (the console script, not `python -m pytest`) from the checkout imports kogpt2."""
    script = Path(sys.executable).parent / "pytest"
    if not script.is_file():
        pytest.skip("no pytest console script next to this interpreter")
    result = subprocess.run([str(script), "-q", "-p", "no:cacheprovider", "tests/test_sampling.py"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-2000:]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -r requirements-test.txt && pytest" in readme and "pip install -r requirements-test.txt && pytest\n" in ci
    assert "pytest -m slow" in readme and "\npytest -m slow" in ci  # the tests a plain pytest leaves out still run in CI


@pytest.mark.parametrize("cli, argv, message", [
    ("main.py", ["--device", "gpu"], "'gpu' is not a device: use auto, cpu, cuda, cuda:N or mps"),
    ("generator.py", ["--device", "gpu"], "'gpu' is not a device"),
    ("kogpt2.evaluate", ["--device", "gpu"], "'gpu' is not a device"),
    ("main.py", ["--lr", "-1"], "--lr: must be greater than 0, not -1"),
    ("main.py", ["--lr", "nan"], "--lr: must be a finite number, not nan"),
    ("main.py", ["--dropout", "2"], "--dropout: must be in [0, 0.99], not 2"),
    ("main.py", ["--keep_last", "-1"], "--keep_last: must be at least 0, not -1"),
    ("main.py", ["--max_len", "0"], "--max_len: must be at least 8, not 0"),
    ("main.py", ["--epoch", "0"], "--epoch: must be at least 1, not 0"),
    ("main.py", ["--batch_size", "two"], "--batch_size: 'two' is not a whole number"),
    ("main.py", ["--val_ratio", "1"], "--val_ratio: must be in [0, 0.9], not 1"),
    ("main.py", ["--warmup", "-2"], "--warmup: must be at least -1, not -2"),
    ("main.py", ["--seed", "-5"], "--seed: must be at least 0, not -5"),
    ("generator.py", ["--temperature", "nan"], "--temperature: must be a finite number, not nan"),
    ("generator.py", ["--temperature", "inf"], "--temperature: must be a finite number, not inf"),
    ("generator.py", ["--temperature", "-0.5"], "--temperature: must be at least 0, not -0.5"),
    ("generator.py", ["--top_k", "-1"], "--top_k: must be at least 0, not -1"),
    ("generator.py", ["--top_p", "0"], "--top_p: must be greater than 0, not 0"),
    ("generator.py", ["--top_p", "1.5"], "--top_p: must be at most 1, not 1.5"),
    ("generator.py", ["--no_repeat_ngram", "-1"], "--no_repeat_ngram: must be at least 0, not -1"),
    ("generator.py", ["--repetition_penalty", "0"], "--repetition_penalty: must be greater than 0, not 0"),
    ("generator.py", ["--text_size", "0"], "--text_size: must be at least 1, not 0"),
    ("generator.py", ["--num_samples", "0"], "--num_samples: must be at least 1, not 0"),
    ("generator.py", ["--loops", "-2"], "--loops: must be at least -1, not -2"),
    ("generator.py", ["--copy_words", "0"], "--copy_words: must be at least 1, not 0"),
    ("generator.py", ["--prompts", "p.txt", "--output", "out.txt"], "write to a .csv (opens in Excel) or a .jsonl file"),
    ("kogpt2.evaluate", ["--batch_size", "0"], "--batch_size: must be at least 1, not 0"),
    ("kogpt2.evaluate", ["--max_len", "-3"], "--max_len: must be at least 8, not -3"),
])
def test_bad_flag_values_are_one_line_and_exit_2(capsys, cli, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        CLIS[cli]()(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]  # one line, no usage dump


@pytest.mark.parametrize("cli, argv, line", [
    ("main.py", ["--epochs", "3"], "error: unknown flag --epochs; did you mean --epoch?"),
    ("main.py", ["--save-path", "run/"], "error: unknown flag --save-path; did you mean --save_path?"),
    ("main.py", ["--epoch", "3", "--save-path=run/"], "error: unknown flag --save-path; did you mean --save_path?"),
    ("main.py", ["-batch_size", "8"], "error: unknown flag -batch_size; did you mean --batch_size?"),
    ("main.py", ["run/"], "error: unexpected argument run/: every value follows its flag (--help lists them)"),
    ("generator.py", ["--temprature", "0.5"], "error: unknown flag --temprature; did you mean --temperature?"),
    ("generator.py", ["--load-path", "run/"], "error: unknown flag --load-path; did you mean --load_path?"),
    ("kogpt2.evaluate", ["--data-file-path", "a.csv"],
     "error: unknown flag --data-file-path; did you mean --data_file_path?"),
    ("kogpt2.export", ["run/", "out.tar", "--halve"], "error: unknown flag --halve; did you mean --half?"),
    ("kogpt2.plot", ["run/", "--verbose"], "error: unknown flag --verbose; --help lists the flags"),
])
def test_a_mistyped_flag_is_one_line_naming_the_flag_meant(capsys, cli, argv, line):
    with pytest.raises(SystemExit) as exit_info:
        CLIS[cli]()(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize("module", ["main.py", "generator.py", "kogpt2.evaluate", "kogpt2.plot", "kogpt2.export"])
def test_help_gives_every_flag_one_line_with_its_real_default(module):
    command = [sys.executable, module] if module.endswith(".py") else [sys.executable, "-m", module]
    result = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    text = " ".join(result.stdout.split())
    for wrong in ("(default: None)", "(default: False)", "``"):
        assert wrong not in text, wrong
    assert not re.search(r"\(default[^)]*\)\s*\(default", text), "a default printed twice"
    entries = [entry for section in result.stdout.split("\n\n")
               if section.startswith(("positional arguments:\n", "options:\n"))
               for entry in re.split(r"\n(?=  \S)", section.split("\n", 1)[1])]
    assert any(entry.lstrip().startswith("-h, --help") for entry in entries)
    for entry in entries:  # Korean first, like the README (names and metavars are ASCII)
        assert re.search("[가-힣]", entry), f"{module} {entry.split()[0]} has no Korean help"
    if module == "main.py":
        assert "(default: 5)" in text and "(default: skt/kogpt2-base-v2)" in text


def test_slash_settings_refuse_bad_values_and_keep_the_old_one():
    from kogpt2.defaults import SAMPLING
    from kogpt2.generation.prompt_loop import PromptLoop

    loop = PromptLoop(sampler=None, settings=SAMPLING, seed=None)
    assert loop.command("/num_samples 0") == "/num_samples: must be at least 1" and loop.num_samples == 1
    assert loop.command("/num_samples 3") == "num_samples = 3" and loop.num_samples == 3
    assert "finite" in loop.command("/temperature nan") or "positive" in loop.command("/temperature nan")
    assert loop.command("/temperature inf").startswith("/temperature:") and loop.settings.temperature == 1.0
    assert loop.command("/top_k -1") == "/top_k: top_k must be 0 (all tokens) or more, not -1"
    assert loop.command("/top_p 2").startswith("/top_p: top_p must be in (0, 1]")
    assert loop.command("/no_repeat_ngram -1").startswith("/no_repeat_ngram:")
    assert loop.command("/text_size x") == "/text_size: 'x' is not a number"
    assert loop.command("/seed 7") == "seed = 7" and loop.seed == 7
    assert loop.settings == SAMPLING


def test_ctrl_d_leaves_the_shell_prompt_on_its_own_line(capsys, monkeypatch):
    from kogpt2.generation.prompt_loop import prompts_from

    monkeypatch.setattr("sys.stdin", io.StringIO("하나\n"))  # input() reads sys.stdin, with line editing on a terminal
    assert list(prompts_from(None, True, io.StringIO())) == ["하나"]
    assert capsys.readouterr().out == "input : input : \n"


def test_generator_takes_a_folder_and_prefers_the_best_checkpoint(trained, capsys):
    assert run_generator("--load_path", trained, "--tmp_sent", "오늘", "--seed", 3, "--text_size", 10) == 0
    from_folder = capsys.readouterr().out
    assert run_generator("--load_path", trained / "KoGPT2_best.tar", "--tmp_sent", "오늘", "--seed", 3,
                         "--text_size", 10) == 0
    assert capsys.readouterr().out == from_folder


def test_a_text_file_as_checkpoint_is_named_as_such(tmp_path, capsys):
    notes = tmp_path / "notes.tar"
    notes.write_text("these are my notes\n", encoding="utf-8")
    assert run_generator("--load_path", notes, "--tmp_sent", "x") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {notes} is not a checkpoint file (not a PyTorch archive); give a .tar written by main.py"


def test_generator_offline_does_not_suggest_what_it_rejects(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "generator.py", "--tmp_sent", "x"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stderr.startswith("error: cannot get skt/kogpt2-base-v2")
    assert "scratch" not in result.stderr
    main_run = subprocess.run([sys.executable, "main.py", "--save_path", str(tmp_path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    assert main_run.returncode == 2 and "--pretrained scratch" in main_run.stderr


def test_prompt_files_in_cp949_are_read(trained, tmp_path, capsys):
    prompts = tmp_path / "p949.txt"
    prompts.write_bytes("오늘\n우리는\n".encode("cp949"))
    assert run_generator("--load_path", trained, "--prompts", prompts, "--seed", 1, "--text_size", 5) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("오늘") and lines[1].startswith("우리는")
    assert run_generator("--load_path", trained, "--prompts", prompts, "--encoding", "utf-8") == 2
    assert "is not valid utf-8" in capsys.readouterr().err


def test_resume_takes_the_checkpoints_settings_and_says_so(tmp_path, capsys):
    args = ("--data_file_path", REPO / "data" / "sample.csv", "--save_path", tmp_path, "--pretrained", "scratch:tiny")
    assert run_main("--epoch", 1, *args, "--max_len", 64, "--batch_size", 8, "--seed", 1) == 0
    capsys.readouterr()
    assert run_main("--epoch", 2, *args, "--load_path", tmp_path) == 0
    out = capsys.readouterr().out
    assert "resuming with the checkpoint's settings: --max_len 64 --batch_size 8 --lr 0.001 --warmup 1 --seed 1" in out
    assert "blocks of 64" in out and "(batch 8 x" in out and "the training data differ" not in out
    assert run_main("--epoch", 3, *args, "--load_path", tmp_path, "--batch_size", 4) == 0
    assert "new settings --batch_size 4 (was 8)" in capsys.readouterr().out


def test_second_ctrl_c_while_plotting_names_the_checkpoint(tmp_path, capsys, monkeypatch):
    import kogpt2.finetune

    def interrupted(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(kogpt2.finetune, "plot_metrics", interrupted)
    assert run_main("--epoch", 1, "--save_path", tmp_path, "--pretrained", "scratch:tiny", "--max_len", 64) == 130
    out = capsys.readouterr()
    saved = next(tmp_path.glob("KoGPT2_checkpoint_*.tar"))
    assert f"interrupted; the last checkpoint is {saved}" in out.out
    assert "nothing was written" not in out.out + out.err


def test_end_of_training_names_the_best_checkpoint_and_counts_in_words(tmp_path, capsys):
    assert run_main("--epoch", 1, "--save_path", tmp_path, "--pretrained", "scratch:tiny", "--max_len", 64,
                    "--batch_size", 1000) == 0
    out = capsys.readouterr().out
    assert "training: 1 epoch x 1 step (batch" in out and "1 epochs" not in out
    assert f"best checkpoint: {tmp_path / 'KoGPT2_best.tar'} (step 1, validation loss" in out
