"""Post-training on dialogs that carry audio and video: schema, token layout, packing, masks, SFT and DPO runs."""
import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds

from mm_llama.config import ConfigError, load_config
from mm_llama.config.stage import StageConfig
from mm_llama.data.config import DataConfig
from mm_llama.data.demo_dialog import spoken_answers, write_dialog
from mm_llama.data.demo_speech import clips, read_assets
from mm_llama.data.dialog import IGNORE, AudioPart, MediaParts, Record, SFTLoader, UnsupportedMedia
from mm_llama.data.speech_loader import frames_for
from mm_llama.data.text_stream import SkipSample
from mm_llama.model.multimodal import MultimodalModel
from mm_llama.model.speech_lm import SpeechLM
from mm_llama.post.average import read_model
from mm_llama.train.engine import train_stage
from mm_llama.train.losses import lm_loss_sum
from mm_llama.train.tasks import task_for
from mm_llama.train.tasks.dpo import sequence_logps
from mm_llama.train.tasks.sft import own_videos_mask, video_groups

LM = ["model.lm.dim=32", "model.lm.n_layers=2", "model.lm.n_heads=4", "model.lm.n_kv_heads=2",
      "model.lm.multiple_of=16"]
SPEECH = [*LM, "model.speech.encoder.dim=32", "model.speech.encoder.n_layers=1", "model.speech.encoder.ffn_dim=64",
          "model.speech.adapter.dim=32", "model.speech.adapter.ffn_dim=64"]
VIDEO = [*LM, "model.vision.encoder.width=32", "model.vision.encoder.layers=2", "model.vision.encoder.tile_size=28",
         "model.vision.encoder.max_num_tiles=1", "model.vision.encoder.intermediate_layers=[1,2]",
         "model.vision.encoder.n_global_layers=1", "model.vision.n_cross_attention_layers=1",
         "model.video.max_frames=4", "model.video.frames_per_group=4", "model.video.n_latents=4"]
QUIET = ["train.eval_batches=2", "run.log_every=1000", "init.from=null"]


@pytest.fixture(scope="module")
def root(demo_data):
    write_dialog(demo_data)
    return demo_data


def stage(name, root, *overrides, out="unused"):
    fast = SPEECH if name.startswith("speech") else VIDEO
    return load_config(StageConfig, f"configs/stages/tiny/{name}.yaml",
                       [*fast, *QUIET, f"data.root={root}", f"run.out_dir={out}", *overrides])


def open_gates(model):
    """Open the zero-initialised gates so that the media change the logits."""
    with torch.no_grad():
        for blocks in (model.cross_attention, model.video_cross_attention):
            for block in blocks.values():
                block.gate_attn.fill_(1.0)
                block.gate_ffwd.fill_(1.0)
    return model


def audio_dialog(question="What colour did I say?", member="flac"):
    return json.dumps({"messages": [
        {"role": "user", "content": [{"type": "audio", "member": member}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": "Blue."}]})


def video_dialog(member="clip"):
    return json.dumps({"messages": [
        {"role": "user", "content": [{"type": "video", "member": member},
                                     {"type": "text", "text": "Which colour is the moving shape?"}]},
        {"role": "assistant", "content": "Red."}]})


def demo_clip_bytes(n=2):
    audio = read_assets()
    return [audio[c.key] for c in clips() if c.split == "train" and c.kind == "sentence"][:n]


# ------------------------------------------------------------------------------ audio dialogs


def test_audio_dialog_token_layout_and_loss_mask(root):
    task = task_for(stage("speech_sft", root))
    speech, tok = task.cfg.model.speech, task.tokenizer
    flac = demo_clip_bytes(1)[0]
    n_samples = sf.info(io.BytesIO(flac)).frames  # the committed clips are 16 kHz mono
    frames = speech.adapter_frames(n_samples)
    example = task.loader(256, 1, 0, 1).encode(Record(audio_dialog(), {"flac": flac}), 0)
    (part,) = example.media
    assert isinstance(part, AudioPart) and part.frames == frames > 5
    assert part.feats.shape == (speech.frontend.num_frames(n_samples), speech.frontend.n_mels)
    assert frames == frames_for(speech)(part.feats.shape[0])  # the speech stage's count
    # exactly: bos, user header, <|speech_start|> <|speech|>×L <|speech_end|>, the question, eot, assistant header…
    text = lambda s: tok.encode(s, bos=False, eos=False)  # noqa: E731
    header = lambda r: [tok.start_header_id, *text(r), tok.end_header_id, *text("\n\n")]  # noqa: E731
    expected = [tok.bos_id, *header("user"), tok.speech_start_id, *[tok.speech_id] * frames, tok.speech_end_id,
                *text("What colour did I say?"), tok.eot_id, *header("assistant"), *text("Blue."), tok.eot_id]
    assert example.inputs == expected[:-1]
    answer = len(expected) - 1 - len(text("Blue.")) - 1  # the first answer token's position in the targets
    assert example.labels == [IGNORE] * answer + expected[answer + 1:]
    # the adapter really produces L frames for this clip
    model = task.build_model()
    _, lengths = model.encode_speech(part.feats[None], torch.tensor([part.feats.shape[0]]))
    assert int(lengths[0]) == frames


def test_spliced_frames_land_between_the_speech_tokens_and_packed_dialogs_keep_their_own_audio(root, tmp_path):
    path = tmp_path / "a.tar"
    first, second = demo_clip_bytes(2)
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "one", "json": audio_dialog(), "flac": first})
        sink.write({"__key__": "two", "json": audio_dialog("What shape did I say?", "voice.flac"),
                    "voice.flac": second})
    cfg = stage("speech_sft", root, f"data.root={tmp_path}", f"data.tokenizer={root / 'tokenizer.model'}",
                "data.shuffle=false",
                "data.sources=[{name: a, shards: a.tar}]", "data.heldout=[]")
    task = task_for(cfg)
    records = [Record(audio_dialog(), {"flac": first}), Record(audio_dialog("What shape did I say?", "voice.flac"),
                                                               {"voice.flac": second})]
    width = sum(len(task.loader(512, 1, 0, 1).encode(r, 0).inputs) for r in records) + 1  # room for these two only
    batch = next(iter(task.loader(width, 1, 0, 1)))
    tok = task.tokenizer
    assert int(batch.doc_ids[0].max()) == 2 and batch.speech_docs.tolist() == [0, 1]  # both dialogs in one row
    model = task.build_model().eval()
    with torch.no_grad():
        frames, lengths = model.encode_speech(batch.speech_feats, batch.speech_lengths)
        h = model.embed(batch.tokens, (frames, lengths))
        plain = model.lm.tok_embeddings(batch.tokens)
        is_speech = batch.tokens[0] == tok.speech_id
        for d in range(2):
            span = (is_speech & (batch.doc_ids[0] == d)).nonzero().squeeze(1)
            assert len(span) == int(lengths[d]) and int(span[-1] - span[0]) == len(span) - 1  # one contiguous span
            assert batch.tokens[0, span[0] - 1] == tok.speech_start_id
            assert batch.tokens[0, span[-1] + 1] == tok.speech_end_id
            torch.testing.assert_close(h[0, span], frames[d, :len(span)])
        torch.testing.assert_close(h[0, ~is_speech], plain[0, ~is_speech])
        # each dialog, packed, gives the logits it gives alone with its own clip
        packed = model(batch.tokens, doc_ids=batch.doc_ids, speech_feats=batch.speech_feats,
                       speech_lengths=batch.speech_lengths)
        loss = task.loss(model, batch, "cpu")
        alone_loss = 0.0
        for d in range(2):
            where = (batch.doc_ids[0] == d).nonzero().squeeze(1)
            n = int(batch.speech_lengths[d])
            alone = model(batch.tokens[:, where], speech_feats=batch.speech_feats[d:d + 1, :n],
                          speech_lengths=batch.speech_lengths[d:d + 1])
            torch.testing.assert_close(packed[0, where], alone[0], atol=1e-4, rtol=1e-4)
            alone_loss += float(lm_loss_sum(alone, batch.labels[:, where]))
        assert float(loss) == pytest.approx(alone_loss, abs=1e-3)
        # the answer tokens and their terminators carry the loss, nothing else
        targets = batch.labels[0][batch.labels[0] != IGNORE].tolist()
        assert tok.decode(targets) == "Blue.<|eot_id|>Blue.<|eot_id|>" and task.count(batch) == len(targets)


def test_corrupt_audio_and_missing_frames_are_skipped_and_counted(root, tmp_path):
    flac, = demo_clip_bytes(1)
    frame = sample_video_frame()
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "good", "json": audio_dialog(), "flac": flac})
        sink.write({"__key__": "corrupt", "json": audio_dialog(), "flac": b"fLaC not really"})
        sink.write({"__key__": "short", "json": audio_dialog(), "flac": short_flac()})
        sink.write({"__key__": "missing", "json": audio_dialog(member="wav"), "flac": flac})
        sink.write({"__key__": "video", "json": video_dialog(), "clip.000.jpg": frame})  # no video model
        sink.write({"__key__": "good2", "json": audio_dialog(), "flac": flac})
    data = DataConfig(root=str(tmp_path), sources=[{"name": "s", "shards": "bad.tar"}], shuffle=False)
    task = task_for(stage("speech_sft", root))
    width = len(task.loader(512, 1, 0, 1).encode(Record(audio_dialog(), {"flac": flac}), 0).inputs) + 1
    loader = SFTLoader(data, 0, chat=task.chat, seq_len=width, batch_size=1, decode_media=task.media_parts())
    batch = next(iter(loader))  # one dialog a row; the look-ahead reads past the four bad records to good2
    assert batch.speech_feats.shape[0] == 1 and loader.stats()["documents"] == 1
    stats = loader.stats()
    assert stats["skipped_samples"] == 4
    assert {k: v for k, v in stats.items() if k.startswith("skipped_media")} == {
        "skipped_media_audio_bad_header": 1, "skipped_media_audio_too_short": 1,
        "skipped_media_missing_member": 1, "skipped_media_unsupported_video": 1}
    # video: a clip without frames is skipped, a clip with a corrupt frame keeps the rest and counts the frame
    vtask = task_for(stage("video_dialog_sft", root))
    path = tmp_path / "v.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "noframes", "json": video_dialog(), "clip.000.jpg": b"\xff\xd8broken"})
        sink.write({"__key__": "nomember", "json": video_dialog("other"), "clip.000.jpg": frame})
        sink.write({"__key__": "partial", "json": video_dialog(), "clip.000.jpg": frame, "clip.001.jpg": b"",
                    "clip.002.jpg": frame})
        sink.write({"__key__": "whole", "json": video_dialog(), "clip.000.jpg": frame, "clip.001.jpg": frame})
    data = DataConfig(root=str(tmp_path), sources=[{"name": "s", "shards": "v.tar"}], shuffle=False)
    width = len(vtask.loader(512, 1, 0, 1).encode(Record(video_dialog(), {"clip.000.jpg": frame}), 0).inputs) + 1
    loader = SFTLoader(data, 0, chat=vtask.chat, seq_len=width, batch_size=1, decode_media=vtask.media_parts(),
                       max_tiles=1, frames_per_group=4)
    batch = next(iter(loader))
    assert batch.frame_mask[0, 0].tolist() == [True, True, False, False]  # 2 usable of 3 stored frames, padded to 4
    assert {k: v for k, v in loader.stats().items() if k.startswith("skipped_media")} == {
        "skipped_media_video_no_frames": 1, "skipped_media_missing_member": 1, "skipped_media_frame_empty": 1}
    state = loader.state_dict()
    again = SFTLoader(data, 0, chat=vtask.chat, seq_len=width, batch_size=1, decode_media=vtask.media_parts(),
                      max_tiles=1, frames_per_group=4)
    again.load_state_dict(state)
    assert again.stats() == loader.stats()  # the counts ride in the loader state


def sample_video_frame():
    from mm_llama.data.demo_video import make_motion, render_frames
    from mm_llama.data.demo_vision import jpeg_bytes

    return jpeg_bytes(render_frames(make_motion(0))[0])


def short_flac():
    buf = io.BytesIO()
    sf.write(buf, np.zeros(100, dtype=np.float32), 16000, format="FLAC")
    return buf.getvalue()


# ------------------------------------------------------------------------------ video dialogs


def test_video_dialogs_are_packed_apart_each_seeing_its_own_video(root):
    task = task_for(stage("video_dialog_sft", root))
    model = open_gates(task.build_model()).eval()
    assert isinstance(model, MultimodalModel) and model.video_config.max_frames == 4
    batch = next(iter(task.loader(64, 1, 0, 1)))
    tok = task.tokenizer
    assert batch.videos.shape[:5] == (1, 2, 4, 1, 3) and batch.video_docs.tolist() == [[0, 1]]
    assert int(batch.doc_ids[0].max()) == 2  # two dialogs and the padding
    with torch.no_grad():
        context = model.encode_videos(batch.videos, batch.video_aspect_ratios, batch.frame_mask)
        assert torch.equal(video_groups(batch, 4), context.group_mask)  # the mask is known before the forward pass
        mask = own_videos_mask(batch, tok.video_id, 4)
        for d in range(2):
            rows = batch.doc_ids[0] == d
            after = rows & (torch.cumsum(batch.tokens[0] == tok.video_id, 0) > d)  # from the dialog's <|video|> on
            assert mask[0, after, d].all() and not mask[0, rows, 1 - d].any()  # its own video only
            assert not mask[0, rows & ~after].any()  # nothing before its <|video|>
        leak = model.video_mask(batch.tokens, context.group_mask)
        assert leak[0, batch.doc_ids[0] == 1, 0].any()  # without the own-dialog rule dialog 1 would see video 0
        packed = model(batch.tokens, doc_ids=batch.doc_ids, video_context=context, video_mask=mask)
        loss = task.loss(model, batch, "cpu")
        alone_loss = 0.0
        for d in range(2):
            where = (batch.doc_ids[0] == d).nonzero().squeeze(1)
            alone = model(batch.tokens[:, where], videos=batch.videos[:, d:d + 1],
                          video_aspect_ratios=batch.video_aspect_ratios[:, d:d + 1],
                          frame_mask=batch.frame_mask[:, d:d + 1])
            torch.testing.assert_close(packed[0, where], alone[0], atol=1e-4, rtol=1e-4)
            alone_loss += float(lm_loss_sum(alone, batch.labels[:, where]))
        assert float(loss) == pytest.approx(alone_loss, abs=1e-3)
        swapped = batch.to("cpu")
        swapped.videos = batch.videos.flip(1)
        assert abs(float(task.loss(model, swapped, "cpu")) - float(loss)) > 1e-4  # the videos matter
    targets = batch.labels[0][batch.labels[0] != IGNORE].tolist()
    assert tok.decode(targets).count("<|eot_id|>") == 2 and task.count(batch) == len(targets)


# ------------------------------------------------------------------------------ stages through the engine


def changed(start: dict, trained: dict, prefix: str) -> list[str]:
    return [k for k in trained if k.startswith(prefix) and not torch.equal(trained[k], start[k])]


@pytest.fixture(scope="module")
def speech_sft_run(root, tmp_path_factory):
    """A few steps of speech SFT on the demo's spoken dialogs, from a fresh model (its run directory)."""
    cfg = stage("speech_sft", root, "train.steps=3", "train.micro_batch=2", "train.seq_len=96", "optim.lr=1.0e-2",
                "optim.warmup_steps=0", out=tmp_path_factory.mktemp("runs") / "speech_sft")
    start = task_for(cfg).build_model().state_dict()
    return train_stage(cfg), start


def test_speech_sft_trains_the_encoder_and_adapter_on_spoken_dialogs(speech_sft_run):
    run, start = speech_sft_run
    trained, config = read_model(run)
    assert config.speech is not None
    assert changed(start, trained, "speech_adapter.") and changed(start, trained, "speech_encoder.")
    assert not changed(start, trained, "lm.")  # the LM is frozen
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["skipped_samples"] == 0
    summary = json.loads((run / "final" / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"])


def test_video_sft_trains_the_video_adapter_on_video_dialogs(root, tmp_path):
    cfg = stage("video_dialog_sft", root, "train.steps=2", "train.micro_batch=1", "train.seq_len=64",
                "optim.lr=1.0e-2", "optim.warmup_steps=0", out=tmp_path / "video_sft")
    start = task_for(cfg).build_model().state_dict()
    run = train_stage(cfg)
    trained = read_model(run)[0]
    assert changed(start, trained, "video_aggregator.") and changed(start, trained, "video_cross_attention.")
    assert not changed(start, trained, "lm.") and not changed(start, trained, "vision.")
    assert not changed(start, trained, "cross_attention.")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_speech_dpo_from_the_sft_run_scores_responses_with_their_clip(root, speech_sft_run, tmp_path):
    sft, _ = speech_sft_run
    cfg = stage("speech_dpo", root, f"init.from={sft}", "train.options.nll_weight=0.0", "train.steps=2",
                "train.micro_batch=2", "optim.lr=1.0e-2", "optim.warmup_steps=0", out=tmp_path / "dpo")
    task = task_for(cfg)
    policy = task.build_model()
    assert isinstance(policy, SpeechLM)
    torch.testing.assert_close(policy.state_dict(), read_model(sft)[0])  # init.from the finished speech SFT
    batch = next(iter(task.loader(96, 2, 0, 1)))
    assert batch.speech_feats.shape[0] == 4 and batch.better.tolist() == [0, 2]  # each response row has its clip
    torch.testing.assert_close(batch.speech_feats[0], batch.speech_feats[1])
    with torch.no_grad():
        loss = float(task.loss(policy, batch, "cpu"))
        assert loss / task.count(batch) == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at the start
        for p in policy.speech_adapter.parameters():  # move the policy off its reference
            p.add_(0.1 * torch.randn_like(p))
        logps, _ = sequence_logps(policy(batch.tokens, **batch.media_inputs("cpu")), batch.labels)
        for row in range(4):  # each row scored alone with its own clip gives the same log-prob
            n = int(batch.speech_lengths[row])
            alone = policy(batch.tokens[row:row + 1], speech_feats=batch.speech_feats[row:row + 1, :n],
                           speech_lengths=batch.speech_lengths[row:row + 1])
            alone_logp = float(sequence_logps(alone, batch.labels[row:row + 1])[0][0])
            assert alone_logp == pytest.approx(float(logps[row]), abs=1e-4)
        silent = batch.__class__(**{**batch.__dict__, "speech_feats": torch.zeros_like(batch.speech_feats)})
        assert not torch.allclose(task.terms(policy, silent, "cpu")["loss"], task.terms(policy, batch, "cpu")["loss"])
    start = task.build_model().state_dict()
    run = train_stage(cfg)
    trained = read_model(run)[0]
    assert changed(start, trained, "speech_adapter.") and not changed(start, trained, "lm.")
    summary = json.loads((run / "final" / "summary.json").read_text())
    assert 0 <= summary["val_reward_accuracy"] <= 1 and math.isfinite(summary["val_loss"])


def test_video_dpo_runs_with_each_rows_clip(root, tmp_path):
    cfg = stage("video_dialog_dpo", root, "init.from=null", "train.options.reference_from=null", "train.steps=1",
                "train.micro_batch=1", out=tmp_path / "vdpo")
    with pytest.raises(ConfigError, match="reference"):
        task_for(cfg)
    models = tmp_path / "models"
    task = task_for(stage("video_dialog_sft", root))
    from mm_llama.train.checkpointing import write_model

    (models / "v").mkdir(parents=True)
    write_model(open_gates(task.build_model()), task.cfg.model, models / "v")
    cfg = stage("video_dialog_dpo", root, f"init.from={models / 'v'}", "train.steps=2", "train.micro_batch=1",
                "optim.lr=1.0e-2", "optim.warmup_steps=0", out=tmp_path / "vdpo")
    dpo = task_for(cfg)
    batch = next(iter(dpo.loader(48, 1, 0, 1)))
    assert batch.videos.shape[:3] == (2, 1, 4) and torch.equal(batch.videos[0], batch.videos[1])
    start = dpo.build_model().state_dict()
    run = train_stage(cfg)
    trained = read_model(run)[0]
    assert changed(start, trained, "video_cross_attention.") and not changed(start, trained, "lm.")
    summary = json.loads((run / "final" / "summary.json").read_text())
    assert 0 <= summary["val_reward_accuracy"] <= 1


def test_reward_model_refuses_audio_and_video_with_a_clear_error(root, tmp_path):
    with pytest.raises(ConfigError, match="no speech reward model.*audio"):
        task_for(stage("speech_sft", root, "train.objective=reward_model", "train.options={}", "train.trainable=[]"))
    text_rm = task_for(load_config(StageConfig, "configs/stages/tiny/reward_model.yaml", [f"data.root={root}"]))
    loader = text_rm.loader(256, 1, 0, 1)
    flac, = demo_clip_bytes(1)
    ranking = json.dumps({"prompt": [{"role": "user", "content": [{"type": "audio", "member": "flac"}]}],
                          "responses": ["Red.", "Blue."]})
    with pytest.raises(UnsupportedMedia, match="audio parts"):
        loader.encode(Record(ranking, {"flac": flac}), 0)
    image = ranking.replace('"audio", "member": "flac"', '"image", "member": "jpg"')
    with pytest.raises(SkipSample, match="image parts need a model"):  # images: skipped and counted, as before
        loader.encode(Record(image, {"jpg": sample_video_frame()}), 0)


def test_demo_media_dialogs_answer_from_the_media(root):
    from mm_llama.data.shards import read_shard

    spoken = {c.key: c.text for c in clips()}
    audio = {v: k for k, v in read_assets().items()}
    for sample in read_shard(str(root / "dialog" / "speech-sft-val-000000.tar"), pytest.fail):
        record = json.loads(sample["json"])
        text = spoken[audio[sample["flac"]]]  # the held-out clip this dialog holds
        kind = record["kind"].removeprefix("speech_")
        assert record["messages"][-1]["content"] == f"{spoken_answers(text)[kind].capitalize()}."
        assert {c.split for c in clips() if c.text == text} == {"val"}
    rows = list(read_shard(str(root / "dialog" / "video-pref-train-000000.tar"), pytest.fail))
    assert len(rows) == 240 and all(sorted(k for k in r if k.startswith("clip.")) ==
                                    [f"clip.{i:03d}.jpg" for i in range(8)] for r in rows)
    parts = MediaParts(tile_size=56, max_tiles=1, max_frames=8)
    for r in rows[:4]:
        record = json.loads(r["json"])
        clip = parts("video", "clip", {k[5:]: v for k, v in r.items() if k.startswith("clip.")}).clip
        assert len(clip.frames) == 8 and record["responses"][0] != record["responses"][1]


def test_video_sft_from_an_image_model_starts_the_video_parts_fresh(root, tmp_path):
    from mm_llama.config import ModelConfig
    from mm_llama.train.checkpointing import write_model

    video_cfg = stage("video_dialog_sft", root).model
    image_cfg = ModelConfig(name="image", lm=video_cfg.lm, vision=video_cfg.vision)
    torch.manual_seed(5)
    image_model = MultimodalModel(image_cfg.lm, image_cfg.vision)
    (tmp_path / "image").mkdir()
    write_model(image_model, image_cfg, tmp_path / "image")
    model = task_for(stage("video_dialog_sft", root, f"init.from={tmp_path / 'image'}")).build_model()
    for key, value in image_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert not model.video_cross_attention["1"].gate_attn.detach().any()  # closed gates: exactly the image model


def test_speech_sft_from_a_speech_run_loads_every_weight_and_refuses_a_misfit(root, speech_sft_run):
    from mm_llama.config import ConfigError

    run, _ = speech_sft_run
    trained, _ = read_model(run)
    task = task_for(stage("speech_sft", root, f"init.from={run}"))
    model = task.model_from_state(dict(trained))
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items() if k in trained)
    bad = dict(trained)
    key = next(k for k in bad if k.startswith("speech_adapter."))
    bad[key] = torch.zeros(3)
    with pytest.raises(ConfigError, match=f"does not fit.*other shapes \\['{key}'"):
        task.model_from_state(bad)
