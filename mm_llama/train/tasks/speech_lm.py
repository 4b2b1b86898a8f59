"""The speech adapter stage (SPEC §5.5 stage 2), objective `speech_lm`.

The model is `SpeechLM(model.lm, model.speech)`. Where its weights start:
- the LM from `init.from` (a text stage's run dir or any layout `from_pretrained` reads); or, when
  `init.from` holds a composed speech model (`lm.*` keys), every weight of it (continuing this stage);
- the encoder from `train.options.encoder_from`: a BEST-RQ stage (`encoder.*` keys) or a composed
  speech model (`speech_encoder.*`); without it the encoder starts random;
- the adapter random (seeded by `run.seed`).
What trains is `train.trainable`/`train.frozen` (the stage configs freeze the LM and train the encoder and
adapter, as the paper). Each example is one clip in one chat dialog (`mm_llama.data.speech_loader`): ASR
under "Repeat after me in {language}:", AST under "Translate the following sentence into {language}:",
spoken dialogue without a system prompt; the loss covers the assistant's tokens only.

Evaluation: `val_loss` per target token over the held-out dialogs, and on the held-out ASR clips the word
error rate of greedy decoding (KV-cached, up to `eval_max_new_tokens`), `asr_wer`, against the blind
baseline `asr_wer_baseline`: the WER of the best constant transcript, the one held-out reference (or the
empty string) that, said for every clip, errs least.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ...checkpoint.native import MODEL_SAFETENSORS, MODEL_YAML, read_safetensors
from ...config import ConfigError, ModelConfig, load_config
from ...data.speech_loader import SpeechLoader, collate, heldout_speech
from ...model import KVCache, Transformer
from ...model.speech_lm import SpeechLM
from ..losses import IGNORE, labelled_loss_sum, lm_loss_sum
from .base import Task, register
from .bestrq import speech_config
from .text_lm import load_init
from .vision_lm import model_folder


class SpeechLMOptions(BaseModel):
    """`train.options` of the `speech_lm` objective."""

    model_config = ConfigDict(extra="forbid")

    encoder_from: str | None = Field(None, description="a BEST-RQ stage's run dir (or model folder): the encoder's start")
    eval_max_new_tokens: int = Field(32, gt=0, description="greedy decoding length limit for the held-out ASR WER")


def fit_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Loads `state` into `module`, or a ConfigError naming `what` and the keys that do not fit. A composed
    model with tied embeddings may lack `lm.output.weight` (saved once, under the embedding)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    tied = getattr(getattr(module, "args", None), "tie_embeddings", False)
    missing = sorted(k for k in expected.keys() - state.keys() if not (tied and k == "lm.output.weight"))
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if expected[k] != state[k].shape)
    if missing or unexpected or wrong:
        raise ConfigError(f"{what}: does not fit the stage's model (missing {missing[:4]}, unexpected {unexpected[:4]}, "
                          f"other shapes {wrong[:4]})")
    module.load_state_dict(state, strict=not tied)


def load_speech_encoder(model: SpeechLM, source: str | Path) -> None:
    """The Conformer of a BEST-RQ stage (`encoder.*`) or of a composed speech model (`speech_encoder.*`)."""
    path = model_folder(source) / MODEL_SAFETENSORS
    state = read_safetensors(path)
    for prefix in ("speech_encoder.", "encoder."):
        found = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if found:
            fit_state(model.speech_encoder, found, f"train.options.encoder_from {path} ({prefix}* weights; "
                                              "model.speech.encoder must match the BEST-RQ stage's)")
            return
    raise ConfigError(f"train.options.encoder_from {path}: holds no speech encoder ('encoder.*' or 'speech_encoder.*' keys)")


def is_composed_speech(folder: Path) -> bool:
    """Whether a model folder holds a composed speech model (its model.yaml has a `speech:` section and `lm.*` keys)."""
    if not (folder / MODEL_YAML).is_file():
        return False
    cfg = load_config(ModelConfig, folder / MODEL_YAML)
    return cfg.speech is not None and any(k.startswith("lm.") for k in read_safetensors(folder / MODEL_SAFETENSORS))


# ------------------------------------------------------------------------------------ word error rate

def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: what WER compares."""
    return re.findall(r"[\w']+", text.lower())


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions, insertions, deletions; one row of the DP table at a
    time; a few lines, so no package is added for it)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate: total word edits / total reference words."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    n = sum(len(words(r)) for r in references)
    if n == 0:
        raise ValueError("the references hold no words")
    return sum(edit_distance(words(r), words(h)) for r, h in zip(references, hypotheses)) / n


def constant_wer(references: list[str]) -> tuple[float, str]:
    """The blind baseline: the lowest WER of one transcript said for every clip, over the references
    themselves and the empty string; returns (WER, that transcript)."""
    return min((wer(references, [c] * len(references)), c) for c in sorted(set(references)) + [""])


@torch.no_grad()
def greedy_decode(model: SpeechLM, prompt: list[int], speech: tuple[torch.Tensor, torch.Tensor], stop: set[int],
                  max_new_tokens: int, device) -> list[int]:
    """Generate after `prompt` (its one clip's adapter frames in `speech`) by argmax, with a KV cache."""
    args = model.args
    dtype = model.lm.tok_embeddings.weight.dtype
    caches = [KVCache(1, args.kv_heads, len(prompt) + max_new_tokens, args.head_dim, dtype, device)
              for _ in range(args.n_layers)]
    logits = model(torch.tensor([prompt], device=device), speech=speech, caches=caches)
    out: list[int] = []
    for pos in range(len(prompt), len(prompt) + max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in stop:
            break
        out.append(token)
        logits = model(torch.tensor([[token]], device=device), caches=caches, start_pos=pos)
    return out


@register("speech_lm")
class SpeechLMTask(Task):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.opts = self.options(SpeechLMOptions)
        self.speech = speech_config(cfg)

    def check(self) -> None:
        self.check_data()
        tok, vocab = self.tokenizer, self.cfg.model.lm.vocab_size
        ids = self.speech.token_ids_for(vocab)
        mine = (tok.speech_start_id, tok.speech_id, tok.speech_end_id)
        if tuple(ids) != mine:
            raise ConfigError(f"model.speech token ids {tuple(ids)} differ from the tokenizer's <|speech_start|>, "
                              f"<|speech|>, <|speech_end|> {mine} ({self.cfg.data.tokenizer_path})")

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed)
            model = SpeechLM(Transformer(self.cfg.model.lm), self.speech)
        source = self.cfg.init.from_
        if source is not None:
            folder = Path(source)
            if folder.is_dir() and is_composed_speech(model_folder(folder)):
                path = model_folder(folder) / MODEL_SAFETENSORS
                fit_state(model, read_safetensors(path), f"init.from {path}")
            else:
                load_init(model.lm, source)
        if self.opts.encoder_from is not None:
            load_speech_encoder(model, self.opts.encoder_from)
        return model

    def blocks(self, model: SpeechLM) -> list[nn.Module]:
        return [*model.lm.layers, *model.speech_encoder.layers]

    def loader(self, seq_len, batch_size, rank, world_size):
        return SpeechLoader(self.cfg.data, self.speech, batch_size, self.cfg.run.seed, rank, world_size,
                            tokenizer=self.tokenizer, max_tokens=seq_len)

    def count(self, batch) -> int:
        return int((batch.labels != IGNORE).sum())

    def loss(self, model, batch, device) -> torch.Tensor:
        return labelled_loss_sum(model, batch.tokens.to(device), batch.labels.to(device),
                                 speech_feats=batch.feats.to(device), speech_lengths=batch.feat_lengths.to(device))

    def batch_tokens(self, batch) -> int:
        return batch.tokens.numel()

    def heldout(self, seq_len, batch_size) -> list:
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        utterances = heldout_speech(self.cfg.data, self.speech, batch_size * self.cfg.train.eval_batches,
                                    tokenizer=self.tokenizer, max_tokens=seq_len)
        return [collate(utterances[i:i + batch_size], self.tokenizer.pad_id) for i in range(0, len(utterances), batch_size)]

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total, units = 0.0, 0
        references, hypotheses = [], []
        stop = self.tokenizer.stop_tokens
        with torch.no_grad():
            for b in batches:
                feats, lengths = b.feats.to(device), b.feat_lengths.to(device)
                with autocast():
                    frames, frame_lengths = model.encode_speech(feats, lengths)
                    logits = model(b.tokens.to(device), speech=(frames, frame_lengths))
                    total += float(lm_loss_sum(logits, b.labels.to(device)))
                units += int((b.labels != IGNORE).sum())
                for i, task in enumerate(b.tasks):
                    if task != "asr":
                        continue
                    clip = (frames[i:i + 1, :int(frame_lengths[i])], frame_lengths[i:i + 1])
                    with autocast():
                        ids = greedy_decode(model, b.prompts[i], clip, stop, self.opts.eval_max_new_tokens, device)
                    references.append(b.references[i])
                    hypotheses.append(self.tokenizer.decode(ids))
        model.train(was_training)
        out = {"val_loss": total / max(units, 1)}
        if references:
            out["asr_wer"] = wer(references, hypotheses)
            out["asr_wer_baseline"] = constant_wer(references)[0]
            out["asr_utterances"] = float(len(references))
        return out
