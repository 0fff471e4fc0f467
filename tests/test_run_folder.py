"""One folder, one training run: a second run into a used folder is refused before any work, and rotation and the
best link touch only the run's own files."""
import json
import shlex
from pathlib import Path

import torch
from conftest import REPO, run_main
from test_scratch import quickstart_commands

from kogpt2.store.checkpoint import checkpoint_name, load_checkpoint, rotate, save_checkpoint


def flag_value(command: str, flag: str) -> str:
    words = shlex.split(command)
    return words[words.index(flag) + 1]


def quickstart_training(folder: Path) -> list[str]:
    """The README's quick-start training command, with the tiny model, two epochs and ``folder``."""
    words = shlex.split(quickstart_commands()[0])[2:]  # after "python main.py"
    flags = dict(zip(words[::2], words[1::2]))
    flags.update({"--pretrained": "scratch:tiny", "--epoch": "2", "--save_path": str(folder)})
    return [word for flag in flags.items() for word in flag]


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_readme_quick_start_and_real_fine_tune_use_different_folders():
    train, generate = quickstart_commands()
    quick = Path(flag_value(train, "--save_path"))
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    fine_tune = {Path(flag_value(line, "--save_path")) for line in lines
                 if line.startswith("python main.py") and "--save_path" in line and line != train}
    assert fine_tune and quick not in fine_tune
    assert Path(flag_value(generate, "--load_path")).parent == quick


def test_quick_start_twice_into_one_folder_refuses_and_keeps_the_first_run(tmp_path, capsys):
    folder = tmp_path / "quickstart"
    assert run_main(*quickstart_training(folder)) == 0
    first = contents(folder)
    capsys.readouterr()

    assert run_main(*quickstart_training(folder)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--load_path {folder}" in err[0] and "a fresh --save_path" in err[0], err
    assert contents(folder) == first  # byte for byte: nothing overwritten, rotated away or appended

    # continuing another run (its checkpoint: these weights under another run's name) into this folder: refused too
    other = load_checkpoint(folder / "KoGPT2_best.tar") | {"run": "another"}
    save_checkpoint(tmp_path / "other" / "KoGPT2_checkpoint_20.tar", other)
    assert run_main(*quickstart_training(folder), "--epoch", 3, "--load_path", tmp_path / "other") == 2
    assert f"--load_path {folder}" in capsys.readouterr().err
    assert contents(folder) == first


def test_a_run_that_never_saved_is_restarted_only_when_asked(tmp_path, capsys):
    """Metrics with no checkpoint: a run killed before its first save. A new run does not append to them; restarting
    that folder (--load_path, as an elastic torchrun does) starts over with a clean log."""
    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 9.0}) + "\n", encoding="utf-8")
    before = contents(folder)
    assert run_main(*quickstart_training(folder)) == 2
    assert "metrics.jsonl" in capsys.readouterr().err and contents(folder) == before
    assert run_main(*quickstart_training(folder), "--epoch", 1, "--load_path", folder) == 0
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, len(logged) + 1)) and logged[0]["train_loss"] != 9.0


def fake_checkpoint(folder: Path, step: int, run: str | None) -> Path:
    """A small file in our format (or the 2020 format, run None) that names its run."""
    path = folder / checkpoint_name(step)
    torch.save({"model_state_dict": {}, **({"format_version": 1, "run": run} if run else {})}, path)
    return path


def test_rotation_touches_only_the_current_runs_files(tmp_path):
    others = [fake_checkpoint(tmp_path, step, "another") for step in (10, 20, 30, 40)]
    from_2020 = fake_checkpoint(tmp_path, 50, None)
    mine = [fake_checkpoint(tmp_path, step, "mine") for step in (1, 2, 3)]
    rotate(tmp_path, 2, "mine", 3)
    assert [p.exists() for p in mine] == [False, True, True]
    assert all(p.exists() for p in others) and from_2020.exists()

    # resumed from step 1 of the same run (its steps 2 and 3 an earlier branch): the file just written stays
    rotate(tmp_path, 1, "mine", 2)
    assert mine[1].exists() and mine[2].exists()
