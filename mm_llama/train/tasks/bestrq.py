"""BEST-RQ pre-training of the speech encoder (SPEC §5.3), objective `bestrq`.

The model is `encoders.speech.BestRQ`: the Conformer of `model.speech.encoder`, the frozen random-projection
quantiser and the softmax heads of `model.speech.bestrq`. Batches are normalised log-mels of the
`data.sources` audio, cropped to `train.seq_len` frames (the paper's 6K). Each batch carries a mask
seed: `count` draws the span masks from it to know the target frames before the forward pass, and the
forward pass draws the same masks again, so the loss units are known up front and a resumed run masks
identically. Loss units are target (fully masked) encoder frames; a unit's loss is the mean over codebooks.

Held-out metrics: `val_loss`, `val_accuracy` (masked frames, all codebooks) and `val_code_perplexity`,
the perplexity of the codes the quantiser assigns to every held-out frame, averaged over codebooks: near
min(frames, codebook_size) when the features are well normalised, near 1 when they collapse onto a few
codes (the failure the BEST-RQ paper warns of). Only `speech_encoder` matters downstream; the speech
adapter stage reads the `encoder.*` weights of this stage's model (`train.options.encoder_from`).
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from encoders.speech.bestrq import BestRQ, code_perplexity, span_mask, target_mask
from encoders.speech.conformer import ConformerEncoder, encoder_lengths, valid_mask

from ...checkpoint.native import MODEL_SAFETENSORS, read_safetensors
from ...config import ConfigError
from ...data import check_sources
from ...data.speech_loader import SpeechLoader, collate, heldout_speech
from ...data.text_stream import derive_seed
from .base import Task, register
from .vision_lm import model_folder


class BestRQOptions(BaseModel):
    """`train.options` of the `bestrq` objective: none yet (shapes live in `model.speech`)."""

    model_config = ConfigDict(extra="forbid")


def speech_config(cfg):
    """`model.speech` of a stage, or a ConfigError naming what is missing."""
    if cfg.model.speech is None:
        raise ConfigError(f"stage '{cfg.name}': train.objective '{cfg.train.objective}' needs a model with a "
                          f"'speech:' section (e.g. model: speech_tiny); model '{cfg.model.name}' has none")
    return cfg.model.speech


def mask_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@register("bestrq")
class BestRQTask(Task):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.opts = self.options(BestRQOptions)
        self.speech = speech_config(cfg)

    def check(self) -> None:
        check_sources(self.cfg.data)

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed)
            model = BestRQ(ConformerEncoder(self.speech.encoder), self.speech.bestrq)
        if self.cfg.init.from_ is not None:  # continue from an earlier BEST-RQ model
            path = model_folder(self.cfg.init.from_) / MODEL_SAFETENSORS
            state = read_safetensors(path)
            expected = {k: v.shape for k, v in model.state_dict().items()}
            found = {k: v.shape for k, v in state.items()}
            if found != expected:
                raise ConfigError(f"init.from {path}: not a BEST-RQ model of this shape (missing "
                                  f"{sorted(expected.keys() - found.keys())[:4]}, unexpected "
                                  f"{sorted(found.keys() - expected.keys())[:4]})")
            model.load_state_dict(state)
        return model

    def blocks(self, model: BestRQ) -> list[nn.Module]:
        return list(model.encoder.layers)

    def loader(self, seq_len, batch_size, rank, world_size):
        return SpeechLoader(self.cfg.data, self.speech, batch_size, self.cfg.run.seed, rank, world_size,
                            max_frames=seq_len)

    def targets(self, batch) -> torch.Tensor:
        """bool `[batch, frames // stack]`: the batch's target frames, from its mask seed."""
        stack = self.speech.encoder.stack
        mask = span_mask(batch.feat_lengths, batch.feats.shape[1], self.speech.bestrq, stack, mask_generator(batch.mask_seed))
        return target_mask(mask, batch.feat_lengths, stack)

    def count(self, batch) -> int:
        return int(self.targets(batch).sum())

    def loss(self, model, batch, device) -> torch.Tensor:
        out = model(batch.feats.to(device), batch.feat_lengths.to(device), generator=mask_generator(batch.mask_seed))
        return out.loss * out.targets.sum()

    def batch_tokens(self, batch) -> int:
        return int(batch.feat_lengths.sum())

    def heldout(self, seq_len, batch_size) -> list:
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        utterances = heldout_speech(self.cfg.data, self.speech, batch_size * self.cfg.train.eval_batches, max_frames=seq_len)
        return [collate(utterances[i:i + batch_size], 0, derive_seed(self.cfg.run.seed, "heldout", i))
                for i in range(0, len(utterances), batch_size)]

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total = correct = 0.0
        units = 0
        labels = []
        with torch.no_grad():
            for b in batches:
                feats, lengths = b.feats.to(device), b.feat_lengths.to(device)
                with autocast():
                    out = model(feats, lengths, generator=mask_generator(b.mask_seed))
                n = int(out.targets.sum())
                total += float(out.loss) * n
                correct += float(out.metrics["accuracy"]) * n
                units += n
                valid = valid_mask(encoder_lengths(lengths, model.encoder.args.stack), out.labels.shape[1])
                labels.append(out.labels[valid])
        model.train(was_training)
        books = code_perplexity(torch.cat(labels), self.speech.bestrq.codebook_size)
        return {"val_loss": total / max(units, 1), "val_accuracy": correct / max(units, 1),
                "val_code_perplexity": float(books.mean())}

