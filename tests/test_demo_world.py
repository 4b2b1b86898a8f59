"""The demo world's text (mm_llama.data.demo) and `format: chat` sources in the text loader."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from mm_llama.data import DataConfig, TextLoader, heldout_batches
from mm_llama.data.config import SourceConfig
from mm_llama.data.demo import DIALOG_KINDS, world_dialog, world_dialogs, world_documents
from mm_llama.data.demo_speech import LANGUAGE, TRANSLATION_LANGUAGE, pig_latin, questions, sentences
from mm_llama.data.demo_video import ANSWERS as VIDEO_ANSWERS
from mm_llama.data.demo_vision import ANSWERS, QUESTION_TYPES, draw_question
from mm_llama.data.demo_vision import questions as vision_questions
from mm_llama.data.speech import system_prompt
from mm_llama.text import ChatFormat, Tokenizer
from test_data_shards import write_shard

BYTES = Tokenizer({bytes([b]): b for b in range(256)})  # byte ranks: every id is predictable
CHAT = ChatFormat(BYTES)
VOCAB = {w for s in sentences() for w in s.split()} | {w for q, a in questions() for w in (*q.split(), a)}
VOCAB |= {w for answers in (*ANSWERS.values(), *VIDEO_ANSWERS.values()) for a in answers for w in a.split()}


def test_world_text_is_deterministic_split_and_of_the_world():
    train, again, val = world_documents("train"), world_documents("train"), world_documents("val")
    assert [d.text for d in train] == [d.text for d in again]
    assert not {d.text for d in train} & {d.text for d in val}
    assert len({d.key for d in train + val}) == len(train) + len(val)
    assert all("." not in d.key for d in train)
    words = {w for d in train[:20] for w in d.text.lower().replace(".", " ").replace("?", " ").split()}
    grammar = VOCAB | {"a", "in", "the", "what", "colour", "is", "are", "shape", "shapes", "image", "how", "many",
                       "there", "where", "circles", "squares", "triangles", "moving", "which", "way", "direction",
                       "does", "move"}
    assert words <= grammar, words - grammar


def test_world_dialogs_are_the_adapter_stages_turns():
    seen = Counter()
    rng = random.Random(0)
    for _ in range(600):
        messages = world_dialog(rng)
        roles = [m["role"] for m in messages]
        assert roles[-1] == "assistant"
        if roles == ["user", "assistant"] and isinstance(messages[0]["content"], list):
            media, question = messages[0]["content"]  # vision_lm's / video_lm's turn: the media, then the question
            assert media["type"] in ("image", "video") and question["type"] == "text"
            answers = (ANSWERS if media["type"] == "image" else VIDEO_ANSWERS).values()
            assert any(messages[1]["content"] in a for a in answers)
            seen[media["type"]] += 1
        elif roles == ["user", "assistant"]:
            assert (messages[0]["content"], messages[1]["content"]) in questions()
            seen["dialogue"] += 1
        else:
            prompt, sentence, target = (m["content"] for m in messages)
            assert sentence in sentences()
            if target == sentence:
                assert prompt == system_prompt("asr", LANGUAGE)
                seen["asr"] += 1
            else:
                assert prompt == system_prompt("ast", TRANSLATION_LANGUAGE) and target == pig_latin(sentence)
                seen["ast"] += 1
    assert set(seen) == set(DIALOG_KINDS)
    share = {k: seen[k] / 600 for k in seen}
    expected = {k: w / sum(DIALOG_KINDS.values()) for k, w in DIALOG_KINDS.items()}
    assert all(abs(share[k] - expected[k]) < 0.06 for k in expected), (share, expected)


def test_every_image_question_type_is_asked_equally_often_and_about_its_scene():
    # position needs a one-shape scene, a quarter of them: drawn uniformly from scenes, it was 1 question in 13
    # and the frozen LM's output row for a turn-initial "top" never trained (p ≤ 0.014 from any hidden state)
    rng = random.Random(0)
    drawn = [draw_question(rng) for _ in range(2000)]
    share = Counter(qa["type"] for _, qa in drawn)
    assert set(share) == set(QUESTION_TYPES)
    assert all(abs(n / 2000 - 1 / len(QUESTION_TYPES)) < 0.03 for n in share.values()), share
    assert all(qa in vision_questions(scene) for scene, qa in drawn)
    again = random.Random(0)
    assert [draw_question(again) for _ in range(50)] == drawn[:50]


@pytest.mark.parametrize("media", ["image", "video"])
def test_media_dialog_encodes_to_the_adapter_example(media):
    from mm_llama.train.tasks.vision_lm import ChatExamples

    messages = next(d["json"]["messages"] for d in world_dialogs("val")
                    if isinstance(d["json"]["messages"][0]["content"], list)
                    and d["json"]["messages"][0]["content"][0]["type"] == media)
    question, answer = messages[0]["content"][1]["text"], messages[1]["content"]
    example = ChatExamples(BYTES, ["qa"], max_len=512, media=media)._example(None, "colour", question, answer)
    assert CHAT.encode_dialog(messages).tokens == example.tokens


DIALOGS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}],
]


def chat_source(tmp_path, samples, **kw):
    write_shard(tmp_path / "chat-000000.tar", samples)
    return SourceConfig(name="chat", shards="chat-*.tar", format="chat", **kw)


def test_a_chat_source_trains_on_the_encoded_dialogs(tmp_path):
    samples = [{"__key__": f"d{i}", "json": {"messages": m}} for i, m in enumerate(DIALOGS)]
    cfg = DataConfig(root=str(tmp_path), sources=[chat_source(tmp_path, samples)], shuffle=False)
    stream = [CHAT.encode_dialog(m).tokens for m in DIALOGS]
    flat = [t for ids in stream for t in ids]
    assert BYTES.start_header_id in flat and BYTES.eot_id in flat
    seq = len(flat) - 1
    batch = next(iter(TextLoader(cfg, BYTES, seq_len=seq, batch_size=1, seed=0)))
    assert batch.tokens[0].tolist() == flat[:seq]
    labels = flat[1 : seq + 1]
    labels[len(stream[0]) - 1] = -100  # a document's last token does not predict the next one's begin_of_text
    assert batch.labels[0].tolist() == labels
    held = DataConfig(root=str(tmp_path), sources=cfg.sources, heldout=cfg.sources)
    [heldout] = heldout_batches(held, BYTES, seq_len=seq, batch_size=1, max_batches=1)
    assert heldout.tokens[0].tolist() == flat[:seq]


def test_bad_chat_samples_are_skipped_and_counted(tmp_path):
    good = {"__key__": "good", "json": {"messages": DIALOGS[0]}}
    bad = [
        {"__key__": "role", "json": {"messages": [{"role": "robot", "content": "x"}]}},
        {"__key__": "none", "json": {"text": "no messages"}},
        {"__key__": "empty", "json": {"messages": []}},
        {"__key__": "nojson", "txt": "plain"},
        {"__key__": "broken", "json": b"{not json"},
    ]
    cfg = DataConfig(root=str(tmp_path), sources=[chat_source(tmp_path, [*bad, good])], shuffle=False)
    flat = CHAT.encode_dialog(DIALOGS[0]).tokens
    loader = TextLoader(cfg, BYTES, seq_len=len(flat) - 1, batch_size=1, seed=0)
    batch = next(iter(loader))
    assert batch.tokens[0].tolist() == flat[:-1]
    assert loader.stats()["skipped_samples"] == len(bad)


def test_a_chat_source_of_only_bad_dialogs_is_an_error_naming_it(tmp_path):
    from mm_llama.data import DataError

    bad = [{"__key__": "r", "json": {"messages": [{"role": "robot", "content": "x"}]}}]
    cfg = DataConfig(root=str(tmp_path), sources=[chat_source(tmp_path, bad)], shuffle=False)
    with pytest.raises(DataError, match="'chat'.*role"):
        next(iter(TextLoader(cfg, BYTES, seq_len=8, batch_size=1, seed=0)))


def test_a_text_source_keeps_special_token_names_as_text(tmp_path):
    write_shard(tmp_path / "t-000000.tar", [{"__key__": "a", "txt": "<|eot_id|>", "json": {"messages": DIALOGS[0]}}])
    cfg = DataConfig(root=str(tmp_path), sources=[SourceConfig(name="t", shards="t-*.tar")], shuffle=False)
    text = BYTES.encode("<|eot_id|>", bos=True, eos=True)
    batch = next(iter(TextLoader(cfg, BYTES, seq_len=len(text) - 1, batch_size=1, seed=0)))
    assert batch.tokens[0].tolist() == text[:-1] and BYTES.eot_id not in batch.tokens[0].tolist()


def test_unknown_source_format_is_rejected():
    with pytest.raises(ValidationError, match="format"):
        SourceConfig(name="x", shards="x.tar", format="dialog")


def test_the_text_stages_read_the_written_world_and_chat_shards(demo_data):
    from mm_llama.config import load_config
    from mm_llama.text import load_tokenizer
    from mm_llama.config.stage import StageConfig

    tokenizer = load_tokenizer(demo_data / "tokenizer.model")
    for stage in ("text_pretrain", "long_context", "anneal"):
        cfg = load_config(StageConfig, f"configs/stages/tiny/{stage}.yaml", [f"data.root={demo_data}"])
        assert {s.format for s in cfg.data.sources} == {"text", "chat"}
    chat = cfg.data.model_copy(update={"heldout": [s for s in cfg.data.heldout if s.format == "chat"]})
    [held] = heldout_batches(chat, tokenizer, seq_len=64, batch_size=4, max_batches=1)
    row = held.tokens[0].tolist()
    assert row[0] == tokenizer.bos_id and row[1] == tokenizer.start_header_id and tokenizer.eot_id in row


def test_the_demo_tokenizer_has_every_answer_word_as_one_token(demo_data):
    """The tokenizer learns from the chat turns' messages too: an answer opens its turn without a leading space,
    a form the documents rarely have ("bottom" split into "b" + "ottom" before)."""
    from mm_llama.text import load_tokenizer

    tokenizer = load_tokenizer(demo_data)
    words = {w for answers in (*ANSWERS.values(), *VIDEO_ANSWERS.values()) for a in answers for w in a.split()}
    split = {w: [tokenizer.decode([t]) for t in tokenizer.encode(w, bos=False, eos=False)] for w in sorted(words)}
    assert {w: parts for w, parts in split.items() if len(parts) > 1} == {}


@pytest.mark.parametrize("stamp", [None, "1"], ids=["no-version", "older-version"])
def test_make_demo_rewrites_data_of_an_older_version_and_trains_afresh(tmp_path, monkeypatch, stamp):
    from mm_llama import demo
    from mm_llama.data.demo import DATA_VERSION

    monkeypatch.chdir(tmp_path)
    old_data, old_runs = tmp_path / "data" / "demo", tmp_path / "runs" / "demo"
    for folder in (old_data, old_runs / "text_pretrain"):
        folder.mkdir(parents=True)
    (old_data / "tokenizer.model").write_text("old")
    if stamp:
        (old_data / "VERSION").write_text(stamp)
    calls = []

    def fake_cli(argv):  # stands in for the data writer and the pipeline; stops the demo at the pipeline
        calls.append(argv[0])
        if argv[0] == "data":
            old_data.mkdir(parents=True)
            (old_data / "VERSION").write_text(f"{DATA_VERSION}\n")
        return 0 if argv[0] == "data" else 1

    monkeypatch.setattr(demo, "cli", fake_cli)
    assert demo.main(["runs/demo"]) == 1
    assert calls == ["data", "pipeline"]
    assert not (old_data / "tokenizer.model").exists() and not old_runs.exists()
    # the current version is kept: no rewrite the second time
    calls.clear()
    (old_data / "tokenizer.model").write_text("current")
    assert demo.main(["runs/demo"]) == 1 and calls == ["pipeline"]
