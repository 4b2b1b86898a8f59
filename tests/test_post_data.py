"""Dialog/preference shards, the SFT loss mask and packing, resumable loaders, the demo dialog data."""
import json

import pytest
import torch
import webdataset as wds

from mm_llama.data import DataConfig
from mm_llama.data.demo_dialog import is_heldout_question, preference_records, sft_records, write_dialog
from mm_llama.data.dialog import (
    IGNORE,
    PreferenceLoader,
    SFTLoader,
    encode_ranking,
    parse_ranking,
    sft_heldout,
)
from mm_llama.model import Transformer
from mm_llama.text import ChatFormat, load_tokenizer


@pytest.fixture(scope="module")
def chat(demo_data):
    return ChatFormat(load_tokenizer(demo_data / "tokenizer.model"))


@pytest.fixture(scope="module")
def dialog_root(demo_data):
    write_dialog(demo_data)
    return demo_data


def write(path, records):
    with wds.TarWriter(str(path)) as sink:
        for i, r in enumerate(records):
            sink.write({"__key__": f"r{i:04d}", "json": r})  # a dict is written as JSON, bytes as they are
    return path


def cfg(root, shards, heldout=None):
    return DataConfig(root=str(root), sources=[{"name": "s", "shards": shards}],
                      heldout=[{"name": "h", "shards": heldout}] if heldout else [], shuffle_buffer=8)


def test_sft_loss_mask_covers_assistant_content_and_terminator_only(chat, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Shape?"},
                {"role": "assistant", "content": "Round."}]
    write(tmp_path / "a.tar", [{"messages": messages}])
    loader = SFTLoader(cfg(tmp_path, "a.tar"), 0, chat=chat, seq_len=64, batch_size=1)
    batch = next(iter(loader))
    tok = chat.tokenizer
    targets = [t for t, lab in zip(batch.tokens[0, 1:].tolist() + [None], batch.labels[0].tolist()) if lab != IGNORE]
    text = lambda s: tok.encode(s, bos=False, eos=False)  # noqa: E731
    assert batch.labels[0][batch.labels[0] != IGNORE].tolist() == text("Red.") + [tok.eot_id] + text("Round.") + [tok.eot_id]
    assert len(targets) == len(text("Red.") + text("Round.")) + 2
    # labels are the next tokens: input at i predicts label i
    n = int((batch.doc_ids[0] == 0).sum())
    full = chat.encode_dialog(messages)
    assert batch.tokens[0, :n].tolist() == full.tokens[:-1]


def test_sft_packing_keeps_dialogs_apart(chat, tmp_path):
    dialogs = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
               for i in range(12)]
    write(tmp_path / "a.tar", dialogs)
    loader = SFTLoader(cfg(tmp_path, "a.tar").model_copy(update={"shuffle": False}), 0, chat=chat, seq_len=90, batch_size=2)
    batch = next(iter(loader))
    assert (batch.doc_ids[:, 0] == 0).all() and int(batch.doc_ids[0].max()) >= 2  # several dialogs per row
    # packed logits equal each dialog alone: no attention across dialogs, positions restart
    model = Transformer(_args(chat)).eval()
    with torch.no_grad():
        packed = model(batch.tokens, doc_ids=batch.doc_ids)
        for d in range(int(batch.doc_ids[0].max())):  # the last id is padding
            where = (batch.doc_ids[0] == d).nonzero().squeeze(1)
            alone = model(batch.tokens[:1, where])
            torch.testing.assert_close(packed[0, where], alone[0], atol=1e-4, rtol=1e-4)
    pad = batch.doc_ids[0] == batch.doc_ids[0].max()
    assert (batch.labels[0][pad] == IGNORE).all()


def _args(chat):
    from mm_llama.model import LlamaArgs

    return LlamaArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=chat.tokenizer.n_words, multiple_of=16)


def test_sft_loader_resumes_exactly_and_counts_bad_records(chat, tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]}
    records = [good, b"{not json", {"messages": [{"role": "user", "content": "no reply"}]},
               {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}] + [good] * 30
    write(tmp_path / "a.tar", records)
    c = cfg(tmp_path, "a.tar")
    loader = SFTLoader(c, 3, chat=chat, seq_len=40, batch_size=2)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    after = [next(it) for _ in range(4)]
    resumed = SFTLoader(c, 3, chat=chat, seq_len=40, batch_size=2)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for a in after:
        b = next(again)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    assert loader.stats()["skipped_samples"] == 3
    assert first[0].tokens.shape == (2, 40)
    other = SFTLoader(c, 4, chat=chat, seq_len=40, batch_size=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_ranking_schema_errors_name_the_problem():
    from mm_llama.data.text_stream import SkipSample

    with pytest.raises(SkipSample, match="2 or 3 responses"):
        parse_ranking({"prompt": [{"role": "user", "content": "q"}], "responses": ["only one"]})
    with pytest.raises(SkipSample, match="ends with an assistant"):
        parse_ranking({"prompt": [{"role": "assistant", "content": "q"}], "responses": ["a", "b"]})
    with pytest.raises(SkipSample, match="strength"):
        parse_ranking({"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"], "strength": "huge"})
    with pytest.raises(SkipSample, match="media"):
        parse_ranking({"prompt": [{"role": "user", "content": [{"type": "image"}]}], "responses": ["a", "b"]})


def test_formatting_tokens_are_masked(chat):
    tok = chat.tokenizer
    ranking = parse_ranking({"prompt": [{"role": "user", "content": "q"}], "responses": ["Good one.", "Bad."]})
    masked = encode_ranking(chat, ranking, mask_formatting=True)
    kept = encode_ranking(chat, ranking, mask_formatting=False)
    content = tok.encode("Good one.", bos=False, eos=False)
    assert masked.responses[0] == content + [tok.eot_id]
    assert masked.loss_masks[0] == [True] * len(content) + [False]
    assert kept.loss_masks[0] == [True] * (len(content) + 1)
    assert masked.prompt[-4:] == chat.encode_header("assistant")[-4:]  # the prompt ends with the assistant header
    header = set(chat.encode_header("assistant")) & {tok.start_header_id, tok.end_header_id}
    assert all(t not in header for t in masked.responses[0])


def test_preference_loader_filters_strengths_and_resumes(chat, tmp_path):
    recs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "responses": [f"right {i}", f"wrong {i}"],
             "strength": "slightly_better" if i % 4 == 0 else "better"} for i in range(40)]
    write(tmp_path / "p.tar", recs)
    c = cfg(tmp_path, "p.tar")
    make = lambda: PreferenceLoader(c, 1, chat=chat, batch_size=3, strengths=("significantly_better", "better"))  # noqa: E731
    loader = make()
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    assert loader.stats()["filtered"] >= 2 and loader.stats()["skipped_samples"] == 0
    state = loader.state_dict()
    nxt = [next(it) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(state)
    again = iter(resumed)
    for a in nxt:
        assert [e.responses for e in a] == [e.responses for e in next(again)]
    assert all(len(b) == 3 for b in batches)


def test_demo_dialog_split_and_checkable_answers(dialog_root, chat):
    pref = preference_records(200, 3, False)
    val = preference_records(100, 4, True)
    train_questions = {r["prompt"][-1]["content"] for r in pref}
    assert not train_questions & {r["prompt"][-1]["content"] for r in val}
    assert all(is_heldout_question(r["prompt"][-1]["content"]) for r in val)
    assert {len(r["responses"]) for r in pref} == {2, 3}
    for r in pref:
        if r["strength"] != "slightly_better":
            assert r["responses"][0] != r["responses"][-1]
    colour = next(r for r in pref if r["kind"] == "colour")
    q = colour["prompt"][-1]["content"]
    asked = q.split("the ")[-1].rstrip("?")
    right_colour = q.split("I see a ")[1].split()[0]
    assert colour["responses"][0] == f"The {asked} is {right_colour}."
    assert not any(r["kind"] == "arithmetic" for r in pref)  # held-out sums are facts training never shows
    repeat = [r for r in sft_records(400, 1, False) if r["kind"] == "repeat"]
    assert 0.3 < len(repeat) / 400 < 0.5  # the copy skill the speech adapter stage's frozen LM needs
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in repeat)
    assert all(r["messages"][0]["content"] == "Repeat after me in English:" for r in repeat)
    assert all(r["messages"][1]["content"] == r["messages"][2]["content"] for r in repeat)
    from mm_llama.data.demo_speech import clips

    heldout_spoken = {c.text for c in clips() if c.split == "val"}
    assert not heldout_spoken & {r["messages"][1]["content"] for r in repeat}  # never a held-out transcript
    sft = sft_records(50, 1, False)
    assert all(m["role"] in ("system", "user", "assistant") for r in sft for m in r["messages"])
    batches = sft_heldout(DataConfig(root=str(dialog_root), sources=[{"name": "s", "shards": "dialog/sft-train-*.tar"}],
                                     heldout=[{"name": "v", "shards": "dialog/sft-val-*.tar"}]), chat, 160, 4, 2)
    assert len(batches) == 2 and batches[0].tokens.shape == (4, 160)
    rec = json.loads(next(iter(wds.WebDataset(str(dialog_root / "dialog/prompts-000000.tar"), shardshuffle=False)))["json"])
    assert rec["messages"][-1]["role"] == "user" and rec["answer"]
