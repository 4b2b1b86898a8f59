"""The Llama 3 tokenizer file format, special ids, split regex, BPE training and `mm-llama tokenizer train`."""
from __future__ import annotations

import base64
import json
import random

import pytest
import regex

import mm_llama
from mm_llama.cli import main as cli_main
from mm_llama.text import Tokenizer, load_tokenizer, train_tokenizer, train_tokenizer_from_files
from mm_llama.text.bpe_train import _byte_to_unicode, train_hf_bpe
from mm_llama.text.tokenizer import PAT_STR, _split_long_runs, special_token_names

N_RANKS = 600


def write_model(path, tokens):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def byte_tokens():
    return [bytes([b]) for b in range(256)]


def synthetic_text(seed: int, n_words: int) -> str:
    """Deterministic multilingual text: contractions, digits, punctuation, CJK, emoji, odd whitespace."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "men", "sa", "lo", "ve", "ther", "in", "qu", "é", "ñ", "ü", "при", "вет", "мир"]
    extras = ["don't", "we'll", "I'M", "it's", "3.14159", "2024", "1234567", "東京", "你好", "😀", "¿qué?", "(x)", "--",
              "\t", "  ", "\r\n", "\u0301", "a\u200bb"]
    words = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.12:
            words.append(rng.choice(extras))
        else:
            w = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
            words.append(w.capitalize() if rng.random() < 0.2 else w)
        if rng.random() < 0.08:
            words.append(rng.choice([".\n", ",", "!\n\n", ";"]))
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus():
    return [synthetic_text(seed, 4000) for seed in range(6)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    path = train_tokenizer(corpus, N_RANKS, tmp_path_factory.mktemp("bpe") / "tokenizer.model")
    return path, load_tokenizer(path)


# -- special ids ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """A 128,000-rank file like Meta's: 256 single bytes, then synthetic 3-byte tokens."""
    tokens = byte_tokens() + [i.to_bytes(3, "big") for i in range(256, 128_000)]
    return write_model(tmp_path_factory.mktemp("full") / "tokenizer.model", tokens)


def test_full_size_special_ids_match_meta(full_size):
    tok = load_tokenizer(full_size)
    assert (tok.n_ranks, tok.n_words) == (128_000, 128_256)
    sp = tok.special_tokens
    assert len(sp) == 256 and sorted(sp.values()) == list(range(128_000, 128_256))
    meta = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
            "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004, "<|step_id|>": 128005,
            "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
            "<|python_tag|>": 128010, "<|image|>": 128011,
            # Meta's numbering of the reserved slots continues unchanged after our four renamed ones
            "<|reserved_special_token_6|>": 128016, "<|reserved_special_token_245|>": 128255}
    assert {k: sp[k] for k in meta} == meta
    ours = {"<|video|>": 128012, "<|speech_start|>": 128013, "<|speech|>": 128014, "<|speech_end|>": 128015}
    assert {k: sp[k] for k in ours} == ours
    for renamed in range(2, 6):
        assert f"<|reserved_special_token_{renamed}|>" not in sp
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.start_header_id, tok.end_header_id) == (128000, 128001, 128004, 128006, 128007)
    assert (tok.eom_id, tok.eot_id, tok.python_tag_id, tok.image_id) == (128008, 128009, 128010, 128011)
    assert (tok.video_id, tok.speech_start_id, tok.speech_id, tok.speech_end_id) == (128012, 128013, 128014, 128015)
    assert tok.stop_tokens == {128001, 128008, 128009}
    assert tok.decode([128255, 128014]) == "<|reserved_special_token_245|><|speech|>"
    assert tok.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [128009]


def test_special_token_names_are_unique_and_complete():
    names = special_token_names()
    assert len(names) == len(set(names)) == 256
    assert names[12:17] == ["<|video|>", "<|speech_start|>", "<|speech|>", "<|speech_end|>", "<|reserved_special_token_6|>"]


def test_load_from_folder_and_top_level(full_size):
    assert load_tokenizer(full_size.parent).n_words == 128_256
    assert mm_llama.load_tokenizer(full_size.parent).eot_id == 128_009


# -- split regex -----------------------------------------------------------------------------------

SPLITS = [
    ("I'LL don't we've", ["I", "'LL", " don", "'t", " we", "'ve"]),
    ("1234567 89", ["123", "456", "7", " ", "89"]),
    ("3.14159", ["3", ".", "141", "59"]),
    ("ab12cd", ["ab", "12", "cd"]),
    ("hello  world", ["hello", " ", " world"]),
    ("a\n\n  b", ["a", "\n\n", " ", " b"]),
    ("x\r\n\r\n\ty", ["x", "\r\n\r\n", "\ty"]),
    ("  !!!\n\nok", [" ", " !!!\n\n", "ok"]),
    (" (foo)?", [" (", "foo", ")?"]),
    ("x  ", ["x", "  "]),
]


@pytest.mark.parametrize("text,pieces", SPLITS)
def test_split_regex(text, pieces):
    from tokenizers import Regex, pre_tokenizers

    assert regex.findall(PAT_STR, text) == pieces
    # the HF pre-tokenizer used for training splits identically
    hf = pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated").pre_tokenize_str(text)
    assert [p for p, _ in hf] == pieces


# -- encode / decode --------------------------------------------------------------------------------


def test_special_text_is_plain_text_unless_allowed(trained):
    _, tok = trained
    plain = tok.encode("a<|eot_id|>", bos=True, eos=True)
    assert plain[0] == tok.bos_id and plain[-1] == tok.eos_id
    assert tok.eot_id not in plain and tok.decode(plain[1:-1]) == "a<|eot_id|>"
    assert tok.encode("a<|eot_id|>", bos=False, eos=False, allowed_special=()) == plain[1:-1]
    assert tok.encode("a<|eot_id|>", bos=False, eos=False, allowed_special={"<|eot_id|>"})[-1] == tok.eot_id
    assert tok.encode("a<|eot_id|>", bos=False, eos=False, allowed_special=["<|eot_id|>"])[-1] == tok.eot_id
    with pytest.raises(ValueError):
        tok.encode("a<|eot_id|>", bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError):
        tok.encode("a<|eot_id|>", bos=False, eos=False, disallowed_special=["<|eot_id|>"])


def test_long_runs_are_cut_like_meta():
    pieces = list(_split_long_runs("a" * 60_000 + " b" + " " * 30_000, 25_000))
    assert "".join(pieces) == "a" * 60_000 + " b" + " " * 30_000
    assert [len(p) for p in pieces] == [25_000, 25_000, 35_002, 5_000]


def test_very_long_input_round_trips(trained):
    _, tok = trained
    text = synthetic_text(99, 20_000) * 3 + "x" * 70_000 + "\n" * 30_000
    assert len(text) > 400_000
    ids = tok.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text


def test_decode_rejects_out_of_range(trained):
    _, tok = trained
    with pytest.raises(ValueError, match="token id 856 is out of range"):
        tok.decode([1, 856])


# -- training ------------------------------------------------------------------------------------------


def test_trained_file_has_exactly_n_ranks(trained):
    path, tok = trained
    lines = path.read_text().splitlines()
    assert len(lines) == N_RANKS and [int(l.split()[1]) for l in lines] == list(range(N_RANKS))
    assert [base64.b64decode(l.split()[0]) for l in lines[:256]] == byte_tokens()
    assert tok.n_ranks == N_RANKS and tok.bos_id == N_RANKS and tok.n_words == N_RANKS + 256


def test_trained_round_trip_unicode(trained):
    _, tok = trained
    for text in [synthetic_text(1234, 500), "Ω≈ç√∫ 🤖🦙 \x00\x01\x7f Zalgo: z̷̢a̴l̶g̵o naïve façade 가나다 ﷽ \ufeff", ""]:
        ids = tok.encode(text, bos=False, eos=False)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_trained_ids_equal_hf_bpe_it_was_trained_from(trained, corpus):
    """The conversion to tiktoken ranks is exact: same segmentation as HF BPE on unseen text."""
    _, tok = trained
    hf = train_hf_bpe(corpus, N_RANKS)
    to_byte = {u: b for b, u in _byte_to_unicode().items()}
    rank_of = {tok.model.decode_single_token_bytes(r): r for r in range(tok.n_ranks)}
    n_tokens = n_chars = 0
    for seed in range(100, 106):
        held_out = synthetic_text(seed, 1500) + " Ünïcödé 😀 東京 don't WE'RE 98765\t\r\n"
        expected = [rank_of[bytes(to_byte[c] for c in hf.id_to_token(i))] for i in hf.encode(held_out).ids]
        assert tok.encode(held_out, bos=False, eos=False) == expected
        n_tokens, n_chars = n_tokens + len(expected), n_chars + len(held_out)
    assert n_chars / n_tokens > 2.5  # merges are really used, so the comparison is not byte-for-byte trivial


def test_training_is_deterministic(tmp_path, corpus, trained):
    again = train_tokenizer(corpus, N_RANKS, tmp_path / "again.model")
    assert again.read_bytes() == trained[0].read_bytes()


def test_training_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="n_ranks must be an integer >= 256"):
        train_tokenizer(["abc"], 255, tmp_path / "t.model")
    with pytest.raises(ValueError, match="supports only"):
        train_tokenizer(["ab ab ab"], 400, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def test_train_from_files(tmp_path, corpus):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(corpus[0], encoding="utf-8")
    (tmp_path / "docs" / "b.md").write_text(corpus[1], encoding="utf-8")
    (tmp_path / "docs" / "ignored.bin").write_bytes(b"\xff")
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
        for text in corpus[2:4]:
            f.write(json.dumps({"body": text, "id": 1}) + "\n\n")
    from_files = train_tokenizer_from_files([tmp_path / "docs", tmp_path / "c.jsonl"], 400, tmp_path / "f.model",
                                            text_field="body")
    direct = train_tokenizer(corpus[:4], 400, tmp_path / "d.model")
    assert from_files.read_bytes() == direct.read_bytes()


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("x.jsonl", '{"text": "a"}\n{"text": 3}\n', r"x.jsonl, line 2: field 'text' is int, expected a string"),
        ("x.jsonl", '{"text": "a"}\n{"body": "b"}\n', r"x.jsonl, line 2: no field 'text'"),
        ("x.jsonl", '{"text": "a"}\n{oops\n', r"x.jsonl, line 2: invalid JSON"),
        ("x.txt", b"fine\n\xff\xfe\n", r"x.txt, line 2: not valid UTF-8"),
        ("x.csv", "a,b\n", r"x.csv: unsupported file type '.csv'"),
    ],
)
def test_train_from_files_bad_input(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        train_tokenizer_from_files([path], 300, tmp_path / "t.model")


def test_train_from_files_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer_from_files([tmp_path / "nope.txt"], 300, tmp_path / "t.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no .txt"):
        train_tokenizer_from_files([tmp_path / "empty"], 300, tmp_path / "t.model")


# -- malformed tokenizer files ------------------------------------------------------------------------------


def _lines(tokens):
    return [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(tokens)]


MALFORMED = {
    "bad base64": (lambda l: l[:2] + ["@@notbase64@@ 2"] + l[3:], r"line 3: '@@notbase64@@' is not valid base64"),
    "rank not an integer": (lambda l: l[:4] + [l[4].split()[0] + " four"] + l[5:], r"line 5: rank 'four' is not"),
    "negative rank": (lambda l: l[:4] + [l[4].split()[0] + " -4"] + l[5:], r"line 5: rank '-4' is not"),
    "three fields": (lambda l: l[:1] + [l[1] + " extra"] + l[2:], r"line 2: expected 'base64_token rank'"),
    "duplicate rank": (lambda l: l + [base64.b64encode(b"zz").decode() + " 7"], r"line 257: duplicate rank 7 \(first on line 8\)"),
    "duplicate token": (lambda l: l + [l[65].split()[0] + " 256"], r"line 257: duplicate token b'A' \(first on line 66\)"),
    "gap in ranks": (lambda l: l + [base64.b64encode(b"zz").decode() + " 300"], r"line 257: rank 300 leaves a gap.*rank 256 is missing"),
    "missing byte": (lambda l: l[:-1] + [base64.b64encode(b"zz").decode() + " 255"], r"1 single bytes have no rank \(first: 0xff\)"),
    "empty file": (lambda l: [], r"empty tokenizer file"),
    "only blank lines": (lambda l: ["", "  "], r"empty tokenizer file"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files(tmp_path, case):
    edit, message = MALFORMED[case]
    path = tmp_path / "bad.model"
    path.write_text("\n".join(edit(_lines(byte_tokens()))) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "ok.model"
    path.write_text("\n" + "\n".join(_lines(byte_tokens() + [b"ab"])) + "\n\n")
    tok = load_tokenizer(path)
    assert tok.n_ranks == 257 and tok.encode("ab", bos=False, eos=False) == [256]


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        load_tokenizer(tmp_path / "nothing.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


def test_tokenizer_from_ranks_directly():
    tok = Tokenizer({bytes([b]): b for b in range(256)})
    assert tok.encode("hi", bos=True, eos=False) == [256, ord("h"), ord("i")]
    with pytest.raises(ValueError, match="ranks must be exactly 0..256"):
        Tokenizer({bytes([b]): b for b in range(256)} | {b"ab": 300})


# -- command line ---------------------------------------------------------------------------------------------


def test_cli_tokenizer_train(tmp_path, capsys, corpus):
    (tmp_path / "a.txt").write_text(corpus[0], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": corpus[1]}) + "\n", encoding="utf-8")
    out = tmp_path / "tok" / "tokenizer.model"
    rc = cli_main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                   "--vocab-size", "512", "--out", str(out), "--field", "content"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "BPE ranks:            512" in printed and "special-token base:   512" in printed
    tok = load_tokenizer(out.parent)
    text = corpus[0] + corpus[1]
    ratio = len(text) / len(tok.encode(text, bos=False, eos=False))
    assert f"chars/token (train):  {ratio:.3f}" in printed


def test_cli_tokenizer_train_errors(tmp_path, capsys):
    (tmp_path / "b.jsonl").write_text('{"text": "abc"}\n', encoding="utf-8")
    rc = cli_main(["tokenizer", "train", "--input", str(tmp_path / "b.jsonl"), "--vocab-size", "300",
                   "--out", str(tmp_path / "t.model"), "--field", "body"])
    assert rc == 1 and "b.jsonl, line 1: no field 'body'" in capsys.readouterr().err
    rc = cli_main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                   "--out", str(tmp_path / "t.model")])
    assert rc == 1 and "missing.txt: training text not found" in capsys.readouterr().err
    rc = cli_main(["tokenizer", "train", "--input", str(tmp_path / "b.jsonl"), "--vocab-size", "100",
                   "--out", str(tmp_path / "t.model")])
    assert rc == 1 and "n_ranks must be an integer >= 256" in capsys.readouterr().err
