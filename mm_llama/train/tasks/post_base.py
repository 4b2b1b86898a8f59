"""What the post-training tasks (SFT, reward model, DPO) share: the chat format, starting weights, options.

A stage whose model config has a `vision:` section trains the composed image–text model
(`MultimodalModel`, with its video adapter when there is also a `video:` section): its dialogs keep their
images and videos (`MediaParts` tiles them for the encoder) and `init.from` is a composed model (e.g. the
vision annealing or a video stage; from an image model the video parts start fresh, gates at zero) or, for
fresh vision parts, an LM. With a `speech:` section it trains `SpeechLM`: dialogs keep their audio
(log-mels; each clip's adapter frames replace its `<|speech|>` placeholders) and `init.from` is a composed
speech model (e.g. the speech adapter stage) or an LM (fresh speech parts).
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ...config import ConfigError
from ...data.dialog import STRENGTHS, MediaParts
from ...model import Transformer, init_weights
from ...model.multimodal import MultimodalModel
from ...model.speech_lm import SpeechLM
from ...text import ChatFormat
from .base import Task


def lm_from_state(args, state: dict | None, seed: int) -> Transformer:
    """A `Transformer` holding `state` (an LM's Meta keys), or freshly initialised when None."""
    model = Transformer(args)
    if state is None:
        init_weights(model, torch.Generator().manual_seed(seed))
    else:
        model.load_state_dict(state, strict=not args.tie_embeddings)
    return model


def composed_from_state(model_cfg, state: dict | None, seed: int, source: str | None) -> MultimodalModel:
    """A `MultimodalModel` holding `state`: a composed model's keys (every weight; the encoder's positional
    tables resized to this tile size), or an LM's (the vision parts new, the `<|image|>` row from the LM's);
    None: fresh (the LM as `init_weights` draws it, seeded). `source` names where `state` came from, in errors."""
    from .vision_lm import load_composed

    torch.manual_seed(seed)
    model = MultimodalModel(model_cfg.lm, model_cfg.vision, model_cfg.video)
    if state is not None and any(k.startswith("vision.") for k in state):
        fresh = ()
        if model_cfg.video is not None:  # an image model's video parts start fresh; a video model's time tables fit
            from adapters.video import resize_time_embedding

            from .video_lm import TIME_TABLES, VIDEO_PARTS

            fresh = VIDEO_PARTS
            state = {k: resize_time_embedding(v, model_cfg.video.max_frames) if k in TIME_TABLES else v
                     for k, v in state.items()}
        load_composed(model, Path(str(source)), fresh=fresh, state=state)
    else:
        model.lm.load_state_dict(lm_from_state(model_cfg.lm, state, seed).state_dict())
        with torch.no_grad():
            model.image_embedding.weight[0].copy_(model.lm.tok_embeddings.weight[model.image_token_id])
    return model


def speech_from_state(model_cfg, state: dict | None, seed: int, source: str | None) -> SpeechLM:
    """A `SpeechLM` holding `state`: a composed speech model's keys (every weight), or an LM's (the speech
    encoder and adapter new, seeded); None: fresh. `source` names where `state` came from, in errors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SpeechLM(Transformer(model_cfg.lm), model_cfg.speech)
    if state is not None and any(k.startswith("speech_encoder.") for k in state):
        from .speech_lm import fit_state

        fit_state(model, state, f"init.from {source}")
    else:
        model.lm.load_state_dict(lm_from_state(model_cfg.lm, state, seed).state_dict())
    return model


def lm_blocks(model: nn.Module) -> list[nn.Module]:
    """The LM's layers: what activation checkpointing and compilation wrap, text or composed model."""
    if isinstance(model, (MultimodalModel, SpeechLM)):
        return list(model.lm.layers)
    return list(getattr(model, "layers", []))


class PostOptions(BaseModel):
    """`train.options` every post-training stage accepts.

    `average_with`: more models of the architecture of `init.from`; the stage starts from the average of
    all of them (SPEC §3.5), weighted by `average_weights` (one per model, `init.from` first; default uniform).
    """

    model_config = ConfigDict(extra="forbid")

    average_with: list[str] = Field(default_factory=list)
    average_weights: list[float] | None = None

    @model_validator(mode="after")
    def _weights(self):
        if self.average_weights is not None and len(self.average_weights) != 1 + len(self.average_with):
            raise ValueError(f"average_weights needs {1 + len(self.average_with)} weights (init.from first, then "
                             f"average_with), got {len(self.average_weights)}")
        return self


class PreferenceOptions(PostOptions):
    """`strengths`: the preference ratings kept (paper: only "significantly better" and "better")."""

    strengths: list[str] = Field(default_factory=lambda: list(STRENGTHS[:2]))

    @model_validator(mode="after")
    def _strengths(self):
        bad = [s for s in self.strengths if s not in STRENGTHS]
        if bad or not self.strengths:
            raise ValueError(f"strengths must list some of {', '.join(STRENGTHS)}, got {self.strengths}")
        return self


class PostTask(Task):
    """A task on dialogs: tokenizer + chat format from `data.tokenizer`, start weights from `init.from`."""

    option_schema = PostOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.opts = self.options(self.option_schema)
        self._chat = None
        if cfg.model.speech is not None and cfg.model.vision is not None:
            raise ConfigError(f"stage '{cfg.name}': post-training composes one encoder family, vision (+ video) or "
                              "speech; the model has both a vision: and a speech: section")
        if self.opts.average_with and cfg.init.from_ is None:
            raise ConfigError(f"stage '{cfg.name}': train.options.average_with needs init.from (the first model)")

    @property
    def chat(self) -> ChatFormat:
        if self._chat is None:
            self._chat = ChatFormat(self.tokenizer)
        return self._chat

    @property
    def max_tiles(self) -> int:
        """Tile slots of the vision encoder (0: no vision encoder)."""
        return self.cfg.model.vision.encoder.max_num_tiles if self.cfg.model.vision is not None else 0

    @property
    def frames_per_group(self) -> int:
        """Frames the video aggregator merges into one (1: no video adapter)."""
        return self.cfg.model.video.frames_per_group if self.cfg.model.video is not None else 1

    def media_parts(self, refuse: tuple[str, ...] = ()) -> MediaParts | None:
        """The loaders' `decode_media` for the stage's model: images and videos for the vision encoder, audio
        for the speech encoder, or None (a text model skips dialogs with media). `refuse`: kinds that stop the
        stage with an error instead of being skipped."""
        model = self.cfg.model
        if model.vision is None and model.speech is None:
            return MediaParts(refuse=refuse) if refuse else None
        encoder = model.vision.encoder if model.vision is not None else None
        return MediaParts(tile_size=encoder.tile_size if encoder else 0, max_tiles=self.max_tiles,
                          max_frames=model.video.max_frames if model.video is not None else 0, speech=model.speech,
                          refuse=refuse)

    def model_from_state(self, state: dict | None, source: str | None = None) -> nn.Module:
        """The stage's model holding `state`: an LM, the composed image–text(–video) model (`vision:`), or the
        speech model (`speech:`)."""
        if self.cfg.model.speech is not None:
            return speech_from_state(self.cfg.model, state, self.cfg.run.seed, source or self.cfg.init.from_)
        if self.cfg.model.vision is None:
            return lm_from_state(self.cfg.model.lm, state, self.cfg.run.seed)
        return composed_from_state(self.cfg.model, state, self.cfg.run.seed, source or self.cfg.init.from_)

    def check(self) -> None:
        self.check_data()
        model, vocab, tok = self.cfg.model, self.cfg.model.lm.vocab_size, self.tokenizer
        where = f"({self.cfg.data.tokenizer_path})"
        if model.vision is not None and model.vision.image_token_for(vocab) != tok.image_id:
            raise ConfigError(f"model.vision.image_token_id is {model.vision.image_token_for(vocab)} "
                              f"but the tokenizer's <|image|> is {tok.image_id} {where}")
        if model.video is not None and model.video.video_token_for(vocab) != tok.video_id:
            raise ConfigError(f"model.video.video_token_id is {model.video.video_token_for(vocab)} but the "
                              f"tokenizer's <|video|> is {tok.video_id} {where}")
        if model.speech is not None:
            ids = tuple(model.speech.token_ids_for(vocab))
            mine = (tok.speech_start_id, tok.speech_id, tok.speech_end_id)
            if ids != mine:
                raise ConfigError(f"model.speech token ids {ids} differ from the tokenizer's <|speech_start|>, "
                                  f"<|speech|>, <|speech_end|> {mine} {where}")

    def start_state(self) -> dict | None:
        """The starting weights: `init.from`, or its average with `average_with`; None: random init."""
        if self.cfg.init.from_ is None:
            return None
        from ...post.average import average_models

        paths = [self.cfg.init.from_, *self.opts.average_with]
        state, config = average_models(paths, self.opts.average_weights)
        keys = ["dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "vocab_size"]
        diff = [k for k in keys if getattr(config.lm, k) != getattr(self.cfg.model.lm, k)]
        if diff:
            raise ConfigError(f"init.from {self.cfg.init.from_}: its model differs from model.lm in {diff}")
        return state

    def batch_tokens(self, batch) -> int:
        return batch.tokens.numel()
