"""Batched, KV-cached generation for the LM and the composed image–text model.

Prompts of different lengths are left-padded into one batch: each row keeps its own rotary positions
(its first real token is position 0) and a padding-aware mask hides the padding slots, so a row's
tokens are exactly those it would get alone. The KV cache is allocated once per call for prompt +
new tokens. Images are tiled and encoded once; their cross-attention keys/values are reused by every
decoding step. Audio clips are encoded once by the speech model's encoder and adapter, and their frames
(or precomputed speech-adapter outputs) replace the embeddings of the `<|speech|>` placeholders.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from encoders.vision.transform import stack_images, tile_image
from ..model import Transformer
from ..model.masks import AttentionMask
from ..model.multimodal import MultimodalModel
from ..model.speech_lm import SpeechLM
from ..text import Tokenizer
from ..text.tokenizer import NUM_SPECIAL_TOKENS, PROJECT_SPECIAL_TOKENS, special_token_names
from .decoder import CrossInputs, Decoder, padded_attention_mask
from .sampling import SamplingConfig, sample_next
from .speech import splice_rows
from .text_stream import TextStream


class ContextLengthError(ValueError):
    """A prompt that leaves no room in the model's context for even one new token."""


@dataclass
class Prompt:
    """One request's inputs.

    tokens: the prompt ids (one `<|image|>` per image, `<|speech|>` placeholders per speech frame).
    images: PIL images or uint8 `[3, H, W]` tensors, in the order of their `<|image|>` tokens.
    audio: waveforms `[n_samples]` at the speech front end's rate (`speech.prepare_audio`), one per
        `<|speech_start|> <|speech|>×L <|speech_end|>` span, in order (a `SpeechLM` encodes them).
    speech: `[n_frames, dim]` speech-adapter outputs, one row per `<|speech|>` placeholder, in order
        (instead of `audio`, for any model).
    videos: sampled, tiled clips (`mm_llama.data.video.frames_from_folder`), one per `<|video|>` token, in order.
    """

    tokens: list[int]
    images: list = field(default_factory=list)
    speech: torch.Tensor | None = None
    audio: list = field(default_factory=list)
    videos: list = field(default_factory=list)


@dataclass
class Completion:
    """tokens: the new ids without the stop token (a stop string's tokens stay); text: the reply cut
    before any stop string (None without a tokenizer); finish_reason: "stop" (stop token or string), "length" or "cancelled"."""

    tokens: list[int]
    text: str | None
    finish_reason: str
    prompt_tokens: int


@dataclass
class TokenEvent:
    """Passed to `on_token` for every generated token of row `row`; `text` is the newly final text.

    After the last token, text still held back (an incomplete character, a tail that did not become a
    stop string) comes in one more event with `token` None.
    """

    row: int
    token: int | None
    text: str


# With a compiled decode step the cache length is rounded up to a multiple of this, so that prompts of
# nearby lengths share one compiled graph.
COMPILED_CACHE_MULTIPLE = 64


class Generator:
    """Continues prompts with a model; `tokenizer` (optional) gives stop tokens, stop strings and text.

    `on_token(event)` may return False to end that row ("cancelled"), e.g. when a client went away.
    `compile=True` decodes with `torch.compile`d steps of fixed shapes (`Decoder.static_step`; compiled
    once per batch size and rounded cache length, at the first call that needs it) except while images are
    attended.
    """

    def __init__(self, model: Transformer | MultimodalModel | SpeechLM, tokenizer: Tokenizer | None = None,
                 compile: bool = False):
        self.model = model.eval()
        self.decoder = Decoder(model)
        self.compile = compile
        self.tokenizer = tokenizer
        vocab = self.decoder.args.vocab_size
        if tokenizer is not None and tokenizer.n_words > vocab:
            raise ValueError(f"the tokenizer has {tokenizer.n_words} tokens but the model's vocabulary only {vocab}")
        base = vocab - NUM_SPECIAL_TOKENS if tokenizer is None else tokenizer.n_ranks
        names = special_token_names()
        self.speech_token_id = base + names.index("<|speech|>")
        # Media placeholders are inputs only: a sampled one would ask for an image or speech that is not there.
        banned = {base + names.index(n) for n in ("<|image|>", *PROJECT_SPECIAL_TOKENS)}
        if isinstance(model, MultimodalModel):
            banned.add(model.image_token_id)
        if isinstance(model, SpeechLM):
            self.speech_token_id = model.speech_ids.speech
            banned |= set(model.speech_ids)
        banned |= set(range(tokenizer.n_words if tokenizer is not None else vocab, vocab))
        self.banned = torch.tensor(sorted(t for t in banned if t < vocab), dtype=torch.long, device=self.decoder.device)
        self.stop_tokens = frozenset(tokenizer.stop_tokens) if tokenizer is not None else frozenset()

    @property
    def max_seq_len(self) -> int:
        return self.decoder.args.max_seq_len

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], config: SamplingConfig,
                 on_token: Callable[[TokenEvent], bool | None] | None = None) -> list[Completion]:
        """Continue every prompt; rows finish independently. Returns one `Completion` per prompt."""
        if not prompts:
            return []
        if config.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (Generator(model, tokenizer))")
        dev = self.decoder.device
        lengths = [len(p.tokens) for p in prompts]
        for i, n in enumerate(lengths):
            if n == 0:
                raise ValueError(f"prompt {i} is empty")
            if n >= self.max_seq_len:
                raise ContextLengthError(f"prompt {i} has {n} tokens; the model's context length is "
                                         f"{self.max_seq_len} (max_seq_len), leaving no room to generate")
        b, width = len(prompts), max(lengths)
        new_tokens = min(config.max_new_tokens, self.max_seq_len - width)
        pad = torch.tensor([width - n for n in lengths], device=dev)
        tokens = torch.zeros(b, width, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            tokens[i, width - lengths[i]:] = torch.tensor(p.tokens, dtype=torch.long)
        cache_len = width + new_tokens
        if self.compile:
            cache_len = min(-(-cache_len // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE, self.max_seq_len)
        valid = torch.arange(cache_len, device=dev)[None, :] >= pad[:, None]  # [batch, cache_len]
        padded = bool(pad.any())

        h = self._speech_inputs(self.decoder.embed(tokens), tokens, prompts)
        cross, cross_step = self._image_inputs(tokens, prompts)
        video, video_step = self._video_inputs(tokens, prompts)
        media = cross is not None or video is not None
        caches = self.decoder.caches(b, cache_len)
        positions = (torch.arange(width, device=dev)[None, :] - pad[:, None]).clamp(min=0)
        mask = padded_attention_mask(valid, 0, width) if padded else AttentionMask()
        logits = self.decoder(h, positions, mask, caches, 0, cross, video) if media else \
            self.decoder.step(h, positions, mask, caches, 0)

        stop_tokens = self.stop_tokens if config.stop_tokens is None else config.stop_tokens
        generator = torch.Generator(device=dev).manual_seed(config.seed) if config.seed is not None else None
        streams = [TextStream(self.tokenizer, config.stop) if self.tokenizer is not None else None for _ in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * b
        next_pos = torch.tensor(lengths, device=dev)[:, None]
        for step in range(new_tokens):
            if self.banned.numel():
                logits[:, self.banned] = float("-inf")
            chosen = sample_next(logits, config.temperature, config.top_k, config.top_p, generator)
            for i, token in enumerate(chosen.tolist()):
                if finish[i] is not None:
                    continue
                if token in stop_tokens:
                    finish[i] = "stop"
                    continue
                out[i].append(token)
                text = streams[i].push(token) if streams[i] is not None else ""
                if streams[i] is not None and streams[i].stopped:
                    finish[i] = "stop"
                if on_token is not None and on_token(TokenEvent(i, token, text)) is False:
                    finish[i] = "cancelled"
            if all(f is not None for f in finish) or step == new_tokens - 1:
                break
            slot = width + step
            if self.compile and not media:
                logits = self.decoder.compiled_step()(chosen[:, None], next_pos + step, valid, [c.k for c in caches],
                                                      [c.v for c in caches], torch.tensor([slot], device=dev))
                continue
            mask = padded_attention_mask(valid, slot, 1) if padded else AttentionMask()
            h = self.decoder.embed(chosen[:, None])
            if media:
                logits = self.decoder(h, next_pos + step, mask, caches, slot, cross_step, video_step)
            else:
                logits = self.decoder.step(h, next_pos + step, mask, caches, slot)

        completions = []
        for i, stream in enumerate(streams):
            text = None
            if stream is not None:
                rest = stream.finish()
                if rest and on_token is not None and finish[i] != "cancelled":
                    on_token(TokenEvent(i, None, rest))
                text = stream.text
            completions.append(Completion(out[i], text, finish[i] or "length", lengths[i]))
        return completions

    # -- inputs beyond text --------------------------------------------------------------------
    def _speech_inputs(self, h: torch.Tensor, tokens: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        """Replace the embeddings at `<|speech|>` positions: audio clips through the speech encoder and
        adapter (all clips of the batch encoded together), or each prompt's precomputed speech frames."""
        if any(p.audio for p in prompts):
            model = self.decoder.speech
            if model is None:
                raise ValueError("this model has no speech encoder; it cannot take audio")
            for i, p in enumerate(prompts):
                if p.audio and p.speech is not None:
                    raise ValueError(f"prompt {i}: give audio or precomputed speech frames, not both")
            h = splice_rows(model, h, tokens, [p.audio for p in prompts])
        for i, p in enumerate(prompts):
            if p.audio:
                continue
            where = (tokens[i] == self.speech_token_id).nonzero().squeeze(-1)
            frames = 0 if p.speech is None else p.speech.shape[0]
            if len(where) != frames:
                raise ValueError(f"prompt {i} has {len(where)} <|speech|> placeholders but {frames} speech frames")
            if frames:
                if p.speech.ndim != 2 or p.speech.shape[1] != h.shape[-1]:
                    raise ValueError(f"prompt {i}: speech must be [n_frames, {h.shape[-1]}], got {list(p.speech.shape)}")
                h[i, where] = p.speech.to(h.dtype)
        return h

    def _image_inputs(self, tokens: torch.Tensor, prompts: Sequence[Prompt]
                      ) -> tuple[CrossInputs | None, CrossInputs | None]:
        """Cross-attention inputs for the prompt and for each later token (which sees what the last prompt
        token sees: generated text never contains `<|image|>`)."""
        if not any(p.images for p in prompts):
            return None, None
        model = self.decoder.multimodal
        if model is None:
            raise ValueError("this model has no vision encoder; it cannot take images")
        enc = model.config.encoder
        for i, p in enumerate(prompts):
            n = sum(1 for t in p.tokens if t == model.image_token_id)
            if n != len(p.images):
                raise ValueError(f"prompt {i} has {n} <|image|> tokens but {len(p.images)} images")
        tiles = [[tile_image(im, enc.tile_size, enc.max_num_tiles) for im in p.images] for p in prompts]
        images, ratios = stack_images(tiles, enc.max_num_tiles)
        context = model.encode_images(images.to(self.decoder.device, self.decoder.dtype), ratios.to(self.decoder.device))
        vision_mask = model.vision_mask(tokens, context.aspect_ratios)
        dtype = self.decoder.dtype
        return (CrossInputs.from_mask(context, vision_mask, dtype),
                CrossInputs.from_mask(context, vision_mask[:, -1:], dtype))

    def _video_inputs(self, tokens: torch.Tensor, prompts: Sequence[Prompt]
                      ) -> tuple[CrossInputs | None, CrossInputs | None]:
        """Video cross-attention inputs for the prompt and for each later token, as `_image_inputs`: every
        clip is encoded and aggregated once; prompts with fewer videos get empty (masked) video slots."""
        model = self.decoder.multimodal
        takes_video = model is not None and model.video_config is not None
        if any(p.videos for p in prompts) and not takes_video:
            raise ValueError("this model has no video adapter; it cannot take videos")
        for i, p in enumerate(prompts):
            n = sum(1 for t in p.tokens if t == model.video_token_id) if takes_video else 0
            if n != len(p.videos):
                raise ValueError(f"prompt {i} has {n} <|video|> tokens but {len(p.videos)} videos")
        if not any(p.videos for p in prompts):
            return None, None
        from ..data.video import collate_videos  # the loader's own padding of frames to whole groups

        max_tiles, group = model.config.encoder.max_num_tiles, model.video_config.frames_per_group
        per_prompt = [[collate_videos([clip], max_tiles, group) for clip in p.videos] for p in prompts]
        frames = max(v.shape[2] for row in per_prompt for v, _, _ in row)
        n_videos = max(len(row) for row in per_prompt)
        sample = per_prompt[next(i for i, row in enumerate(per_prompt) if row)][0][0]
        videos = sample.new_zeros(len(prompts), n_videos, frames, *sample.shape[3:])
        ratios = torch.zeros(len(prompts), n_videos, frames, 2, dtype=torch.long)
        frame_mask = torch.zeros(len(prompts), n_videos, frames, dtype=torch.bool)
        for i, row in enumerate(per_prompt):
            for j, (v, r, m) in enumerate(row):
                videos[i, j, : v.shape[2]], ratios[i, j, : v.shape[2]], frame_mask[i, j, : v.shape[2]] = v[0, 0], r[0, 0], m[0, 0]
        dev, dtype = self.decoder.device, self.decoder.dtype
        context = model.encode_videos(videos.to(dev, dtype), ratios.to(dev), frame_mask.to(dev))
        mask = model.video_mask(tokens, context.group_mask)
        return CrossInputs.from_mask(context, mask, dtype), CrossInputs.from_mask(context, mask[:, -1:], dtype)


def generate(model: Transformer | MultimodalModel | SpeechLM, prompt: list[int], max_new_tokens: int,
             stop_tokens: set[int] = frozenset(), temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Continue one prompt; returns the new tokens (without the stop token). `on_token` gets each token.

    New tokens are capped by the context length (`max_seq_len`).
    """
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_tokens=frozenset(stop_tokens), seed=seed)
    callback = (lambda event: on_token(event.token)) if on_token is not None else None
    return Generator(model).generate([Prompt(list(prompt))], config, callback)[0].tokens
