"""CSV in, token ids and packed blocks out: every character kept, Korean encodings and separators recognised, bad
files named in one line, the token cache used and kept to one file per CSV."""
import shutil

import numpy as np
import pytest

from conftest import SAMPLE_CSV, TINY_TRAINING, run_main
from kogpt2.data import CsvColumn, tokenize_rows
from kogpt2.packing import pack


def test_every_character_survives(tmp_path, v2_tokenizer_json):
    from kogpt2.tokenizer import load_tokenizer

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
    (b"\xff\xfe\x00\x01\x02garbage\x80\x81", "sent", "is a binary file, not text; give a CSV"),
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


def test_tokenized_rows_are_cached_in_one_file_next_to_the_csv(tmp_path, v2_tokenizer_json, v1_spiece, monkeypatch):
    import os
    import stat

    import kogpt2.data as data
    from kogpt2.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(v2_tokenizer_json)
    csv = tmp_path / "train.csv"
    csv.write_text("sent\n첫 문장\n둘째 문장\n", encoding="utf-8")
    first = CsvColumn(csv).token_rows(tokenizer)
    cache = tmp_path / ".train.csv.kogpt2cache.npz"
    assert [p.name for p in tmp_path.glob(".*kogpt2cache*")] == [cache.name]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not a private one

    read = data.CsvFile._read

    def header_only(self, nrows=None):
        assert nrows == 0, "the cache was not used"
        return read(self, nrows)

    with monkeypatch.context() as patch:
        patch.setattr(data.CsvFile, "_read", header_only)
        column = CsvColumn(csv)
        again = column.token_rows(tokenizer)
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
    import kogpt2.data

    decode, read, decoded, parsed = kogpt2.data.decode, kogpt2.data.CsvFile._read, [], []

    def counting_decode(raw, path, encoding):
        decoded.append(path)
        return decode(raw, path, encoding)

    def counting_read(self, nrows=None):
        if nrows is None:
            parsed.append(self.path)
        return read(self, nrows)

    monkeypatch.setattr(kogpt2.data, "decode", counting_decode)
    monkeypatch.setattr(kogpt2.data.CsvFile, "_read", counting_read)
    csv_path = tmp_path / "fresh.csv"  # no token cache next to it yet
    shutil.copy(SAMPLE_CSV, csv_path)
    assert run_main("--epoch", 1, "--data_file_path", csv_path, "--save_path", tmp_path / "run", *TINY_TRAINING) == 0
    assert decoded == [csv_path] and parsed == [csv_path]


def test_tab_separated_files_are_recognised(tmp_path):
    for name, text in (("rows.tsv", "score\tgenre\tsent\n1\tx\t첫, 문장\n"), ("rows.csv", "sent\tgenre\n첫, 문장\tx\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert CsvColumn(tmp_path / name).texts == ["첫, 문장"]
