"""The speech stages: the speech loader, the composed model, BEST-RQ and speech-adapter tasks, WER, the engine."""
import json
import shutil
from contextlib import nullcontext

import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from mm_llama.config import ConfigError, load_config
from mm_llama.config.stage import StageConfig
from mm_llama.data.demo_speech import write_speech
from mm_llama.data.shards import DataError
from mm_llama.data.speech_loader import IGNORE, frames_for
from mm_llama.model import Transformer, init_weights
from mm_llama.text import load_tokenizer
from mm_llama.train.tasks import task_for
from mm_llama.train.tasks.speech_lm import constant_wer, edit_distance, greedy_decode, wer

CPU = torch.device("cpu")
# the tiny stages, smaller: a 2-layer LM of width 64, 4 utterances a batch, a few steps
FAST = ["model.lm.dim=64", "model.lm.n_layers=2", "model.lm.n_heads=4", "model.lm.n_kv_heads=2",
        "train.micro_batch=4", "train.eval_batches=1", "run.log_every=1000", "train.eval_every=0"]


@pytest.fixture(scope="module")
def speech_root(tmp_path_factory, demo_data):
    """Demo tokenizer + the demo speech shards (from the committed clips)."""
    root = tmp_path_factory.mktemp("speech_demo")
    shutil.copy(demo_data / "tokenizer.model", root / "tokenizer.model")
    write_speech(root, source="assets")
    return root


def stage(name, root, out, *overrides):
    return load_config(StageConfig, f"configs/stages/tiny/{name}.yaml",
                       [*FAST, f"data.root={root}", f"run.out_dir={out}", *overrides])


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A random tiny LM (the FAST shape) saved natively, standing in for the text stage."""
    from mm_llama.checkpoint.native import save_native
    from mm_llama.config import ModelConfig

    cfg = load_config(StageConfig, "configs/stages/tiny/speech_adapter.yaml", FAST)
    lm = Transformer(cfg.model.lm)
    init_weights(lm, torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("lm") / "final"
    save_native(lm, ModelConfig(name="tiny_lm", lm=cfg.model.lm), folder)
    return folder


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a, b):
    assert torch.equal(a.feats, b.feats) and torch.equal(a.feat_lengths, b.feat_lengths) and a.mask_seed == b.mask_seed
    assert (a.tokens is None and b.tokens is None) or (torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels))


@pytest.mark.parametrize("name", ["speech_encoder_pretrain", "speech_adapter"])
def test_loader_is_deterministic_and_resumes_exactly(speech_root, tmp_path, name):
    task = task_for(stage(name, speech_root, tmp_path))
    first = batches(task.loader(128, 3, 0, 1), 4)
    again = task.loader(128, 3, 0, 1)
    for a, b in zip(first, batches(again, 4)):
        same(a, b)
    loader = task.loader(128, 3, 0, 1)
    batches(loader, 2)
    state = loader.state_dict()
    resumed = task.loader(128, 3, 0, 1)
    resumed.load_state_dict(state)
    for a, b in zip(first[2:], batches(resumed, 2)):
        same(a, b)
    assert resumed.stats()["utterances"] == 12 and resumed.stats()["skipped_samples"] == 0
    other = task.loader(128, 4, 0, 1)
    with pytest.raises(ValueError, match="batch_size: saved 3, now 4"):
        other.load_state_dict(state)


def test_bestrq_crops_to_seq_len(speech_root, tmp_path):
    task = task_for(stage("speech_encoder_pretrain", speech_root, tmp_path))
    b = batches(task.loader(40, 4, 0, 1), 1)[0]
    assert b.feats.shape == (4, 40, 80) and b.tokens is None and b.feat_lengths.tolist() == [40] * 4


# the demo stage leaves AST out (its frozen LM cannot say Pig Latin); the loader still builds AST dialogs
WITH_AST = ('data.sources=[{name: asr, shards: "speech/asr-train-*.tar", weight: 0.4}, '
            '{name: ast, shards: "speech/ast-train-*.tar", weight: 0.4}, '
            '{name: dialogue, shards: "speech/dialogue-train-*.tar", weight: 0.2}]')


@pytest.mark.parametrize("overrides, tasks", [((), {"asr", "dialogue"}), ((WITH_AST,), {"asr", "ast", "dialogue"})])
def test_adapter_batches_hold_the_papers_dialogs(speech_root, tmp_path, overrides, tasks):
    cfg = stage("speech_adapter", speech_root, tmp_path, *overrides)
    task = task_for(cfg)
    tok = load_tokenizer(speech_root / "tokenizer.model")
    seen = set()
    for b in batches(task.loader(128, 4, 0, 1), 6):
        for row in range(4):
            ids = b.tokens[row].tolist()
            n_speech = ids.count(tok.speech_id)
            assert n_speech == frames_for(cfg.model.speech)(int(b.feat_lengths[row]))
            start = ids.index(tok.speech_start_id)
            assert ids[start + n_speech + 1] == tok.speech_end_id
            text = tok.decode([t for t in ids if t < tok.n_ranks])
            target = [t for t in b.labels[row].tolist() if t != IGNORE]
            assert tok.decode(target[:-1]) == b.references[row] and target[-1] == tok.eot_id
            task_name = b.tasks[row]
            seen.add(task_name)
            if task_name == "asr":
                assert "Repeat after me in English:" in text
            elif task_name == "ast":
                assert "Translate the following sentence into Pig Latin:" in text
            else:
                assert "system" not in text and tok.decode(ids).count("<|start_header_id|>") == 2
            assert b.prompts[row] == ids[:len(b.prompts[row])] and ids[len(b.prompts[row]) - 1] == tok.encode("\n\n", bos=False, eos=False)[-1]
    assert seen == tasks


def test_overlong_dialogs_are_skipped_and_counted(speech_root, tmp_path):
    task = task_for(stage("speech_adapter", speech_root, tmp_path))
    loader = task.loader(50, 2, 0, 1)  # most demo ASR dialogs are longer than 51 tokens, the spoken questions not
    for b in batches(loader, 3):
        assert b.tokens.shape[1] <= 50
    assert loader.stats()["skipped_samples"] > 0
    with pytest.raises(DataError, match="none of its 2 shards gives a usable speech sample"):
        batches(task.loader(10, 2, 0, 1), 1)


def test_corrupt_audio_is_skipped_by_reason(speech_root, tmp_path):
    good = next(iter(wds.WebDataset(str(speech_root / "speech" / "asr-val-000000.tar"), shardshuffle=False)))
    shard = tmp_path / "mixed.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "broken", "flac": b"not audio at all", "json": good["json"]})
        sink.write({"__key__": "good", "flac": good["flac"], "json": good["json"]})
        sink.write({"__key__": "good2", "flac": good["flac"], "json": good["json"]})
    cfg = stage("speech_encoder_pretrain", speech_root, tmp_path, f"data.sources=[{{name: m, shards: '{shard}'}}]",
                "data.shuffle=false")
    loader = task_for(cfg).loader(600, 2, 0, 1)
    assert sorted(k.rsplit(":", 1)[1] for k in batches(loader, 1)[0].keys) == ["good", "good2"]
    assert loader.stats()["skipped_bad_header"] == 1 and loader.stats()["skipped_samples"] == 1


def test_bestrq_counts_the_targets_its_loss_sums(speech_root, tmp_path):
    task = task_for(stage("speech_encoder_pretrain", speech_root, tmp_path))
    model = task.build_model()
    b = batches(task.loader(600, 4, 0, 1), 1)[0]
    n = task.count(b)
    loss = task.loss(model, b, CPU)
    out = model(b.feats, b.feat_lengths, generator=torch.Generator().manual_seed(b.mask_seed))
    assert int(out.targets.sum()) == n > 0
    assert torch.allclose(loss, out.loss * n)
    # fresh heads: about ln(codebook_size) per target frame
    assert abs(float(loss.detach()) / n - torch.log(torch.tensor(256.0))) < 0.5
    metrics = task.evaluate(model, task.heldout(600, 4), CPU, nullcontext)
    assert set(metrics) == {"val_loss", "val_accuracy", "val_code_perplexity"}
    assert 10 < metrics["val_code_perplexity"] <= 256 and 0 <= metrics["val_accuracy"] < 0.2


def test_word_error_rate():
    assert edit_distance("a b c".split(), "a c".split()) == 1
    assert edit_distance("a b".split(), "c d e".split()) == 3
    assert wer(["The cat sat."], ["the cat sat down"]) == pytest.approx(1 / 3)
    assert wer(["a b", "c d"], ["a b", ""]) == pytest.approx(0.5)
    assert constant_wer(["a b", "a c", "a b"]) == (pytest.approx(1 / 6), "a b")
    assert constant_wer(["x", "y"])[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no words"):
        wer([""], ["a"])


def test_composed_model_keeps_lm_keys_and_splices_speech(speech_root, tmp_path):
    cfg = stage("speech_adapter", speech_root, tmp_path, "init.from=null", "train.options.encoder_from=null")
    model = task_for(cfg).build_model().eval()
    lm_keys = {f"lm.{k}" for k in Transformer(cfg.model.lm).state_dict()}
    assert lm_keys <= set(model.state_dict())
    assert {k.split(".")[0] for k in model.state_dict()} == {"lm", "speech_encoder", "speech_adapter"}
    text = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(text), model.lm(text))  # no speech: exactly the LM
    b = batches(task_for(cfg).loader(128, 2, 0, 1), 1)[0]
    with torch.no_grad():
        logits = model(b.tokens, speech_feats=b.feats, speech_lengths=b.feat_lengths)
        other = model(b.tokens, speech_feats=torch.randn_like(b.feats), speech_lengths=b.feat_lengths)
    first = int((b.tokens[0] == model.speech_ids.speech).nonzero()[0])
    assert torch.equal(logits[0, :first], other[0, :first])  # causal: text before the clip cannot see it
    assert not torch.allclose(logits[0, first:], other[0, first:])


def test_greedy_decode_with_cache_matches_full_recompute(speech_root, tmp_path):
    cfg = stage("speech_adapter", speech_root, tmp_path, "init.from=null", "train.options.encoder_from=null")
    task = task_for(cfg)
    model = task.build_model().eval()
    b = task.heldout(128, 4)[0]
    with torch.no_grad():
        frames, lengths = model.encode_speech(b.feats, b.feat_lengths)
        clip = (frames[:1, :int(lengths[0])], lengths[:1])
        got = greedy_decode(model, b.prompts[0], clip, set(), 6, CPU)
        ids = list(b.prompts[0])
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]), speech=clip)[0, -1].argmax()))
    assert got == ids[len(b.prompts[0]):]


def test_task_errors_name_the_setting(speech_root, tmp_path, lm_dir):
    text_only = stage("speech_encoder_pretrain", speech_root, tmp_path)
    text_only.model.speech = None
    with pytest.raises(ConfigError, match="needs a model with a 'speech:' section"):
        task_for(text_only)
    with pytest.raises(ConfigError, match="train.options"):
        task_for(stage("speech_adapter", speech_root, tmp_path, "train.options.encoder=x"))
    bad_encoder = tmp_path / "enc"
    run = stage("speech_encoder_pretrain", speech_root, bad_encoder, "train.steps=1", "model.speech.encoder.dim=32",
                "model.speech.encoder.ffn_dim=64", "train.eval_batches=0")
    from mm_llama.train.engine import train_stage

    train_stage(run)
    cfg = stage("speech_adapter", speech_root, tmp_path / "a", f"init.from={lm_dir}", f"train.options.encoder_from={bad_encoder}")
    with pytest.raises(ConfigError, match="model.speech.encoder must match"):
        task_for(cfg).build_model()


def test_speech_chain_through_the_engine_resumes_exactly(speech_root, tmp_path, lm_dir, capsys):
    from mm_llama.train.engine import train_stage

    enc = train_stage(stage("speech_encoder_pretrain", speech_root, tmp_path / "enc", "train.steps=2"))
    summary = (enc / "final" / "summary.json").read_text()
    assert "val_code_perplexity" in summary

    def adapter(out, steps, *extra):
        return stage("speech_adapter", speech_root, tmp_path / out, f"train.steps={steps}", f"init.from={lm_dir}",
                     f"train.options.encoder_from={enc}", "train.options.eval_max_new_tokens=4", *extra)

    run = train_stage(adapter("run", 4, "run.checkpoint_every=1"))
    a = load_file(run / "final" / "model.safetensors")
    # as if killed after step 3: its last checkpoint and final/ gone; the rerun resumes at step 3
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    train_stage(adapter("run", 4, "run.checkpoint_every=1"))
    b = load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lm = load_file(lm_dir / "model.safetensors")
    assert all(torch.equal(a[f"lm.{k}"], v) for k, v in lm.items())  # the LM stayed frozen
    encoder = load_file(enc / "final" / "model.safetensors")
    assert not torch.equal(a["speech_encoder.input_proj.weight"], encoder["encoder.input_proj.weight"])  # it trained
    final = json.loads((run / "final" / "summary.json").read_text())
    assert {"val_loss", "asr_wer", "asr_wer_baseline"} <= set(final) and final["asr_wer_baseline"] <= 1.0
    from mm_llama.cli import main  # `mm-llama eval --task asr`: the stage's own held-out evaluation

    capsys.readouterr()
    assert main(["eval", str(run), "--task", "asr", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["asr.asr_wer"] == final["asr_wer"]
