"""Token ids must equal the originals', and decode(encode(text)) must give the text back."""
import csv
from pathlib import Path

import pytest

from kogpt2.corpus.tokenizer import load_tokenizer
from kogpt2.errors import KoGPT2Error

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample.csv"
MIXED = [
    "KoGPT2는 2020년에 공개되었다.",
    "오늘 회의는 오후 3시 30분, 2층에서 합니다!",
    "\"괜찮아?\" 그녀가 물었다... (조용히)",
    "이메일: kogpt2@example.com / 가격 12,500원",
    "첫 줄\n둘째 줄\n\n넷째 줄",
    "탭\t문자와  두 칸 공백",
    "",
]


def sample_texts() -> list[str]:
    with SAMPLE.open(encoding="utf-8") as f:
        return [row["sent"] for row in csv.DictReader(f)] + MIXED


@pytest.fixture(scope="module")
def v1(v1_spiece):
    return load_tokenizer(v1_spiece)


@pytest.fixture(scope="module")
def v2(v2_tokenizer_json):
    return load_tokenizer(v2_tokenizer_json)


def test_v1_ids_equal_the_original_pipeline(v1, expected_ids):
    want = expected_ids["v1"]
    assert v1.vocab_size == want["vocab_size"]
    for sentence in want["sentences"]:
        assert v1.encode(sentence["text"]) == sentence["ids"]
        assert [v1.bos_id] + v1.encode(sentence["text"]) + [v1.eos_id] == sentence["pipeline_ids"]
    specials = want["special_ids"]
    assert (v1.bos_id, v1.eos_id, v1.pad_id, v1.unk_id) == (specials["<s>"], specials["</s>"], specials["<pad>"], specials["<unk>"])


def test_v2_ids_equal_the_hub_tokenizer(v2, expected_ids):
    want = expected_ids["v2"]
    assert v2.vocab_size == want["vocab_size"]
    for sentence in want["sentences"]:
        assert v2.encode(sentence["text"]) == sentence["ids"]
    # SKT's published convention: bos = eos = </s>
    assert (v2.bos_id, v2.eos_id, v2.pad_id, v2.unk_id) == (1, 1, 3, 5)


def test_v1_round_trips_hundreds_of_strings(v1):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=v1.data)
    texts = sample_texts()
    assert len(texts) >= 300
    for text in texts:
        ids = v1.encode(text)
        # sentencepiece's own decode, line by line, is the reference (it knows the normalisation it applied)
        want = "\n".join(sp.decode(sp.encode(line)) for line in text.split("\n"))
        assert v1.decode(ids) == want.replace(" \u2047 ", "<unk>")  # sentencepiece prints unknowns as " ⁇ "


def test_v1_keeps_line_breaks_as_unused0(v1):
    ids = v1.encode("봄바람\n꽃잎")
    assert ids.count(6) == 1  # <unused0>
    assert v1.decode(ids) == "봄바람\n꽃잎"
    assert v1.encode_batch(["봄바람\n꽃잎", "가"]) == [ids, v1.encode("가")]


def test_v1_unknown_characters_stay_visible(v1):
    assert v1.decode(v1.encode("웃음 😀 끝")) == "웃음 <unk> 끝"


def test_v2_round_trips_and_equals_transformers_decode(v2, v2_tokenizer_json):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_file=str(v2_tokenizer_json))
    for text in sample_texts() + ["이모지 😀 그리고 :-) 도", "없는 글자 龘 ☃"]:
        ids = v2.encode(text)
        assert v2.decode(ids) == reference.decode(ids)
    assert v2.decode(v2.encode("이모지 😀 :-) 끝")) == "이모지 😀 :-) 끝"
    assert v2.decode(v2.encode("첫 줄\n둘째 줄")) == "첫 줄\n둘째 줄"
    assert "<unk>" in v2.decode(v2.encode("없는 글자 龘"))


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_control_tokens_are_not_printed(kind, request):
    tok = request.getfixturevalue(kind)
    ids = [tok.bos_id] + tok.encode("우리 집") + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "우리 집"


def test_not_a_tokenizer_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.spiece"
    bad.write_bytes(b"not a model")
    with pytest.raises(KoGPT2Error, match="broken.spiece: not a SentencePiece model"):
        load_tokenizer(bad)
    with pytest.raises(KoGPT2Error, match="cannot read tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")


def test_v1_as_tokenizer_json_gives_our_ids_for_chat_markup_lines_and_every_piece(v1):
    """The exported tokenizer.json (export to transformers) must give the ids training used, including KoGPT2's
    chat markup <usr>/<sys> written into the text, line breaks, and each piece of the vocabulary as a word; and
    read back the same text."""
    import random

    from tokenizers import Tokenizer

    from kogpt2.export import sentencepiece_as_tokenizer_json

    converted = Tokenizer.from_str(sentencepiece_as_tokenizer_json(v1.data).decode("utf-8"))
    pieces = [v1.id_to_piece(i) for i in range(v1.vocab_size)]
    words = [p.replace("▁", " ") for p in pieces if not p.startswith("<")]
    random.seed(0)
    fragments = ["<usr>", "<sys>", "<unused0>", "<unused7>", "\n", "\r\n", " ", "  ", "\t", "\u3000", "가", "나다", "😀",
                 "A", "ab", ".", "<", ">", "ＡＢ"]
    texts = (sample_texts() + words + ["<usr>" + w for w in words[::25]]
             + ["<usr>오늘 뭐 해?<sys>집에서 쉬어요", "안녕<usr>하세요", "x\n<usr>y", "\n시작", "끝\n", "a\n  \n b"]
             + ["".join(random.choices(fragments, k=random.randint(0, 12))) for _ in range(3000)])
    lone_piece = {p for p in pieces if p.startswith("<unused") or p in ("<usr>", "<sys>")}
    checked = [t for t in texts if t.strip(" \t\r\n\u3000") not in lone_piece]  # the one documented difference
    assert len(checked) > 50_000
    wrong = [t for t, got, want in zip(checked, converted.encode_batch(checked), v1.encode_batch(checked))
             if got.ids != want]
    assert not wrong, (len(wrong), wrong[:5])
    readable = [v1.encode(t) for t in sample_texts() + texts[-3006:-3000]]
    assert converted.decode_batch(readable) == [v1.decode(ids) for ids in readable]
