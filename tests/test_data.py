"""CSV, TSV, plain text and JSON Lines in, token ids and packed blocks out: every character kept, Korean encodings
(Excel's UTF-16 "Unicode text" too) and separators recognised, bad files named in one line, the token cache used and
kept to one file per data file."""
import codecs
import json
import shutil

import numpy as np
import pytest
from conftest import SAMPLE_CSV, TINY_TRAINING, run_generator, run_main, write_csv

from kogpt2.corpus.packing import open_corpus, pack
from kogpt2.corpus.reading import CsvColumn, CsvFile, tokenize_rows
from kogpt2.defaults import TEXT_COLUMN


def test_every_character_survives(tmp_path, v2_tokenizer_json):
    from kogpt2.corpus.tokenizer import load_tokenizer

    texts = ["마지막 글자까지!", "첫 줄\n둘째 줄.", "따옴표 \"안\"의, 쉼표?", "끝에 점..."]
    csv = tmp_path / "lines.csv"
    csv.write_text("score,genre,sent\n" + "".join(f'1,x,"{t.replace(chr(34), chr(34) * 2)}"\n' for t in texts),
                   encoding="utf-8")
    column = CsvColumn(csv)
    assert column.texts == texts
    tokenizer = load_tokenizer(v2_tokenizer_json)
    tokenized = tokenize_rows(column.texts, tokenizer)
    rows = [tokenized.row(i) for i in range(len(tokenized))]
    packed = pack(tokenized, 8, tokenizer.pad_id)
    stream = packed.blocks[:, :-1].reshape(-1).tolist() + [packed.blocks[-1, -1].item()]
    assert stream[:packed.tokens] == [t for row in rows for t in row]
    for row, text in zip(rows, texts):
        assert row[0] == tokenizer.bos_id and row[-1] == tokenizer.eos_id
        assert tokenizer.decode(row) == text


def test_korean_excel_encodings_load_the_same_rows(tmp_path):
    text = "score,genre,sent\n1,일상,한글 문장입니다.\n2,시,\"여러 줄\n시\"\n3,x,\n"
    for name, encoding in (("utf8", "utf-8"), ("bom", "utf-8-sig"), ("cp949", "cp949"), ("euckr", "euc-kr")):
        (tmp_path / f"{name}.csv").write_bytes(text.encode(encoding))
    want = CsvColumn(tmp_path / "utf8.csv")
    assert want.texts == ["한글 문장입니다.", "여러 줄\n시"] and want.rows_empty == 1
    for name in ("bom", "cp949", "euckr"):
        assert CsvColumn(tmp_path / f"{name}.csv").texts == want.texts


@pytest.mark.parametrize("content, column, message", [
    (None, "sent", "no such file"),
    (b"", "sent", "is empty"),
    (b"score,genre,text\n1,a,hello\n", "sent", "no column 'sent' (columns found: score, genre, text)"),
    (b"score,genre,sent\n1,a,\n2,b,  \n", "sent", "column 'sent' has no text in any of its 2 rows"),
    (b"\x7fELF\x02\x01\x01\x00\x00garbage\x80\x81", "sent", "is a binary file, not text; give a CSV"),
    (b"\xff\xfe\x00\xd8\x41", "sent", "starts with a UTF-16 byte-order mark but is not valid UTF-16"),
    (b"\x89PNG\r\n\x1a\n\x01\x02\x03\x04\x05\x06\x07\x08", "sent", "is a binary file, not text"),
    (b"sent\n\x80\x81\x82 text\n", "sent", "is neither UTF-8 nor CP949/EUC-KR text; save it as UTF-8 or name its "
                                          "encoding with --encoding"),
    (b"Q,A,label\n\xec\x95\x88\xeb\x85\x95,hi,0\n", "sent", "this looks like a question/answer CSV: train a chatbot "
                                                         "with --chat"),
])
def test_bad_csv_is_one_clear_line_and_exit_2(tmp_path, capsys, content, column, message):
    csv = tmp_path / "input.csv"
    if content is not None:
        csv.write_bytes(content)
    assert run_main("--data_file_path", csv, "--column", column, "--save_path", tmp_path, *TINY_TRAINING) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(csv) in err


def read_from_the_cache(monkeypatch, path, tokenizer):
    """The file's column and token rows read again: only its header is parsed, the rows come from the cache."""
    import kogpt2.corpus.reading as data

    read = data.CsvFile._read

    def header_only(self, nrows=None):
        assert nrows == 0, "the cache was not used"
        return read(self, nrows)

    with monkeypatch.context() as patch:
        patch.setattr(data.CsvFile, "_read", header_only)
        column = CsvColumn(path)
        return column, column.token_rows(tokenizer)


def test_tokenized_rows_are_cached_in_one_file_next_to_the_csv(tmp_path, v2_tokenizer_json, v1_spiece, monkeypatch):
    import os
    import stat

    from kogpt2.corpus.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(v2_tokenizer_json)
    csv = tmp_path / "train.csv"
    csv.write_text("sent\n첫 문장\n둘째 문장\n", encoding="utf-8")
    first = CsvColumn(csv).token_rows(tokenizer)
    cache = tmp_path / ".train.csv.kogpt2cache.npz"
    assert [p.name for p in tmp_path.glob(".*kogpt2cache*")] == [cache.name]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not a private one

    column, again = read_from_the_cache(monkeypatch, csv, tokenizer)
    assert (column.rows_read, column.rows_empty) == (2, 0)
    assert np.array_equal(first.ids, again.ids) and np.array_equal(first.offsets, again.offsets)

    CsvColumn(csv).token_rows(load_tokenizer(v1_spiece))  # another tokenizer replaces it: one cache per CSV
    csv.write_text("sent\n바뀐 문장\n", encoding="utf-8")
    changed = CsvColumn(csv).token_rows(tokenizer)
    assert len(changed) == 1 and [p.name for p in tmp_path.glob(".*kogpt2cache*")] == [cache.name]


def test_no_cache_neither_reads_nor_writes_it(tmp_path, capsys):
    csv = tmp_path / "fresh.csv"
    shutil.copy(SAMPLE_CSV, csv)
    assert run_main("--epoch", 1, "--data_file_path", csv, "--save_path", tmp_path / "run", "--no_cache",
                    *TINY_TRAINING) == 0
    assert not list(tmp_path.glob(".*kogpt2cache*"))


@pytest.mark.slow
def test_first_scratch_run_reads_and_parses_the_csv_once(tmp_path, monkeypatch):
    """The tokenizer is learnt from the rows training then uses: one read of a big CSV, not two."""
    import kogpt2.corpus.reading

    decode, read, decoded, parsed = kogpt2.corpus.reading.decode, kogpt2.corpus.reading.CsvFile._read, [], []

    def counting_decode(raw, path, encoding):
        decoded.append(path)
        return decode(raw, path, encoding)

    def counting_read(self, nrows=None):
        if nrows is None:
            parsed.append(self.path)
        return read(self, nrows)

    monkeypatch.setattr(kogpt2.corpus.reading, "decode", counting_decode)
    monkeypatch.setattr(kogpt2.corpus.reading.CsvFile, "_read", counting_read)
    csv_path = tmp_path / "fresh.csv"  # no token cache next to it yet
    shutil.copy(SAMPLE_CSV, csv_path)
    assert run_main("--epoch", 1, "--data_file_path", csv_path, "--save_path", tmp_path / "run", *TINY_TRAINING) == 0
    assert decoded == [csv_path] and parsed == [csv_path]


def test_tab_separated_files_are_recognised(tmp_path):
    for name, text in (("rows.tsv", "score\tgenre\tsent\n1\tx\t첫, 문장\n"), ("rows.csv", "sent\tgenre\n첫, 문장\tx\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert CsvColumn(tmp_path / name).texts == ["첫, 문장"]


POEM = "봄비 내린 뒤\n꽃잎이 진다\n\n여름 한낮\n매미가 운다\n\n\n  가을\n"


def test_plain_text_is_one_text_per_line_or_per_paragraph(tmp_path):
    poem = tmp_path / "poem.txt"  # blank lines between blocks of several lines: paragraphs
    poem.write_bytes(POEM.replace("\n", "\r\n").encode("utf-8"))  # Windows line ends change nothing
    paragraphs = CsvColumn(poem)
    assert paragraphs.texts == ["봄비 내린 뒤\n꽃잎이 진다", "여름 한낮\n매미가 운다", "  가을"]
    assert (paragraphs.rows_read, paragraphs.rows_empty) == (3, 0) and paragraphs.file.layout == "utf-8, one text per paragraph"
    lines = CsvColumn(CsvFile(poem, txt_unit="line"))
    assert lines.texts == ["봄비 내린 뒤", "꽃잎이 진다", "여름 한낮", "매미가 운다", "  가을"]
    assert (lines.rows_read, lines.rows_empty) == (8, 3)  # blank lines are empty rows, skipped and counted

    rows = [f"{i}번째 문장입니다." for i in range(30)]
    one_a_line = tmp_path / "lines.txt"  # a stray blank line among texts of one line each: still lines
    one_a_line.write_text("\n".join(rows[:15] + [""] + rows[15:]) + "\n", encoding="utf-8")
    column = CsvColumn(one_a_line, "any name")  # a plain text has one column, whatever --column says
    assert column.texts == rows and column.rows_empty == 1 and column.file.layout == "utf-8, one text per line"
    assert CsvColumn(CsvFile(one_a_line, txt_unit="paragraph")).texts == ["\n".join(rows[:15]), "\n".join(rows[15:])]


def test_json_lines_texts_and_chat_pairs(tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "첫 줄\\n둘째 줄", "id": 1}\n\n{"text": "끝 글자까지!", "id": 2}\n{"text": null, "id": 3}\n'
                     '{"text": " ", "id": 4}\n', encoding="utf-8")
    column = CsvColumn(texts)  # the default text column 'sent' is a .jsonl's "text"
    assert column.column == "text" and column.texts == ["첫 줄\n둘째 줄", "끝 글자까지!"]
    assert (column.rows_read, column.rows_empty) == (5, 3)
    assert CsvColumn(texts, "id").texts == ["1", "2", "3", "4"]  # --column picks the key; numbers read as written

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in (
        {"Q": "배고파", "A": "밥 먹어요.", "label": 0}, {"Q": "비가 와", "A": "우산 챙기세요.", "label": 0},
        {"Q": "", "A": "질문이 없는 답"})), encoding="utf-8")
    corpus = open_corpus(CsvFile(chat), True, TEXT_COLUMN, "Q", "A", None, True, 1)
    assert corpus.texts(0) == ["배고파", "비가 와", "밥 먹어요.", "우산 챙기세요."] and corpus.rows_empty == 1


@pytest.mark.parametrize("name, bom, codec", [("unicode.txt", codecs.BOM_UTF16_LE, "utf-16-le"),
                                              ("big_endian.txt", codecs.BOM_UTF16_BE, "utf-16-be")])
def test_excel_unicode_text_utf16_with_bom_is_read(tmp_path, name, bom, codec):
    """Excel's "Unicode text": UTF-16 with a byte-order mark, tabs between cells, CRLF row ends, saved as .txt."""
    path = tmp_path / name
    path.write_bytes(bom + 'score\tgenre\tsent\r\n1\t일상\t한글 문장입니다.\r\n2\t시\t"여러 줄\n시"\r\n3\tx\t\r\n'.encode(codec))
    column = CsvColumn(path)
    assert column.texts == ["한글 문장입니다.", "여러 줄\n시"] and column.rows_empty == 1
    assert column.file.layout == "utf-16, tab-separated"


@pytest.mark.parametrize("name, content", [("lines.txt", POEM), ("rows.jsonl", '{"text": "첫 문장"}\n{"text": "둘째"}\n')])
def test_the_token_cache_serves_text_and_json_lines_files(tmp_path, v2_tokenizer_json, monkeypatch, name, content):
    from kogpt2.corpus.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(v2_tokenizer_json)
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    first = CsvColumn(path).token_rows(tokenizer)
    column, again = read_from_the_cache(monkeypatch, path, tokenizer)
    assert (column.rows_read, column.rows_empty) == ((3, 0) if name.endswith(".txt") else (2, 0))
    assert np.array_equal(first.ids, again.ids) and np.array_equal(first.offsets, again.offsets)
    assert [p.name for p in tmp_path.glob(".*kogpt2cache*")] == [f".{name}.kogpt2cache.npz"]
    if name.endswith(".txt"):  # read another way, the cached rows are not those
        assert len(CsvColumn(CsvFile(path, txt_unit="line")).token_rows(tokenizer)) == 5


@pytest.mark.parametrize("name, content, flags, message", [
    ("bad.jsonl", '{"text": "하나"}\n{"text": "둘"}\n{"text": 셋}\n', (),
     'bad.jsonl line 3 is not valid JSON (Expecting value, column 10); each line must be one JSON object, such as '
     '{"text": "..."}'),
    ("list.jsonl", '["하나"]\n', (), "list.jsonl line 1 is not a JSON object"),
    ("missing.jsonl", '{"text": "하나"}\n{"body": "둘"}\n', (), "missing.jsonl line 2 has no key 'text'; every line needs it"),
    ("keys.jsonl", '{"body": "하나"}\n', (),
     "keys.jsonl has no key 'sent' or 'text' on its first line (keys found: body); choose one with --column"),
    ("plain.txt", "배고파\n밥 먹어요\n", ("--chat",),
     "plain.txt is plain text (one text per line), not questions and answers; a chatbot learns from a CSV"),
    ("excel.txt", "번호\t문장\n1\t하나\n", (),
     "excel.txt has no column 'sent' (columns found: 번호, 문장); choose one with --column, or read one text per line "
     "with --format txt"),
    ("sentences.csv", "오늘은 맑다\n내일은 비\n", (),
     "sentences.csv has no column 'sent' (columns found: 오늘은 맑다); choose one with --column, or if it holds one text "
     "per line with no header, read it with --format txt"),
])
def test_bad_text_and_json_lines_files_are_one_clear_line(tmp_path, capsys, name, content, flags, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert run_main("--data_file_path", path, "--save_path", tmp_path / "run", *flags, *TINY_TRAINING) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_text_file_trains_evaluates_and_reports_as_the_run_read_it(tmp_path, capsys):
    """The misleading case: a .txt with the default --column once answered "no column 'sent'"."""
    from kogpt2.evaluate import main as evaluate_main
    from kogpt2.store.checkpoint import load_checkpoint

    texts = [text for text in CsvColumn(SAMPLE_CSV).texts if "\n" not in text][:40]
    corpus = tmp_path / "corpus.txt"  # two-line paragraphs: auto would read 20 paragraphs, --txt_unit line 40 lines
    corpus.write_text("\n\n".join(f"{a}\n{b}" for a, b in zip(texts[::2], texts[1::2])) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    assert run_main("--epoch", 1, "--data_file_path", corpus, "--save_path", run, "--txt_unit", "line",
                    *TINY_TRAINING) == 0
    assert "data: 59 rows read (utf-8, one text per line), 19 empty skipped; 36 for training, 4 for validation" \
        in capsys.readouterr().out
    best = load_checkpoint(run / "KoGPT2_best.tar")
    assert evaluate_main(["--load_path", str(run), "--split", "val"]) == 0  # the recorded --txt_unit: the same rows
    loss = float(capsys.readouterr().out.split("(loss ")[1].split(")")[0])
    assert abs(loss - best["progress"]["best_val_loss"]) < 1e-5

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("오늘\n", encoding="utf-8")
    report = tmp_path / "report.json"
    assert run_generator("--load_path", run, "--prompts", prompts, "--report", report, "--seed", 1,
                         "--text_size", 5) == 0
    assert json.loads(report.read_text(encoding="utf-8"))["summary"]["samples"] == 1


def test_a_second_run_on_the_same_file_parses_only_its_header(v2_release, tmp_path, monkeypatch):
    """With the token cache warm, starting a run costs no parse of the rows (seconds on a million-row file)."""
    import kogpt2.corpus.reading as reading
    import kogpt2.train.trainer as trainer

    folder, _ = v2_release("safetensors")
    csv = write_csv(tmp_path / "train.csv", ["첫 문장입니다.", "둘째 문장입니다.", "셋째 문장입니다."] * 4)
    monkeypatch.setattr(trainer.Trainer, "fit", lambda self: None)  # the start is what is measured
    assert run_main("--pretrained", folder, "--data_file_path", csv, "--save_path", tmp_path / "one") == 0
    parses = []
    read = reading.CsvFile._read

    def counted(self, nrows=None):
        parses.append(nrows)
        return read(self, nrows)

    monkeypatch.setattr(reading.CsvFile, "_read", counted)
    assert run_main("--pretrained", folder, "--data_file_path", csv, "--save_path", tmp_path / "two") == 0
    assert parses == [0]
