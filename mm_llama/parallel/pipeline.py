"""Pipeline parallelism with `torch.distributed.pipelining` (SPEC §2.4).

The model is cut into `pp · v` stages (v = 1, or `pp_virtual_stages` for the interleaved schedule;
rank r holds stages r, r+pp, ...). As in the paper the embedding and the output projection (with
the loss) each count as one layer when balancing, so the first stage holds one layer fewer beside
the embedding and the last one layer fewer beside the output. A stage keeps the Transformer's
attribute names (`tok_embeddings`, `layers.{i}`, `norm`, `output`), so state-dict keys match the
whole model's and a checkpoint loads at any other layout.

The image–text model (`MultimodalStage`) is cut along its LM layers the same way; a gated
cross-attention block travels with the LM layer it runs before. The image encoder and the `<|image|>`
embedding row live on the first stage only, which sends the encoder's output (the image tokens, in
the LM's width) down the pipeline beside the hidden state; each stage computes the K/V of its own
cross-attention blocks from them. Why not the paper's choice (the encoder replicated on every stage,
SPEC §4.1 "Load balancing")? With one owner every encoder weight has one gradient, one optimizer state
and one checkpoint entry, as at every other layout, and the encoder runs once per micro-batch instead
of once per stage; the price is the image tokens' traffic (at the paper's 2,308 image tokens against
192 text tokens, about 13× the hidden state's) and the encoder's work on the first stage, which the
layer split does not weigh. Every rank reads the batch, so the integer inputs every stage needs
(tokens for the masks and positions, aspect ratios) are queued locally, as the document ids are.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..config import ConfigError
from ..model import Transformer
from ..model.multimodal import MultimodalModel
from ..train.losses import IGNORE


class StagePart(nn.Module):
    """A container a stage builds to keep the whole model's names (`lm` of a composed stage); merged, not
    copied, when the stages of a rank are viewed as one model (`runtime.StateView`)."""


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Layer ids of each stage, balancing `n_layers + 2` units (embedding and output count as one layer each).

    >>> split_layers(6, 2)
    [[0, 1, 2], [3, 4, 5]]
    >>> split_layers(4, 3)
    [[0], [1, 2], [3]]
    """
    if n_stages > n_layers + 2 or n_stages < 1:
        raise ConfigError(f"{n_stages} pipeline stages cannot split {n_layers} layers plus the embedding and output")
    units = n_layers + 2
    bounds = [round(units * s / n_stages) for s in range(n_stages + 1)]
    # unit 0 is the embedding, unit n_layers+1 the output; unit u in between is layer u-1
    return [[u - 1 for u in range(bounds[s], bounds[s + 1]) if 1 <= u <= n_layers] for s in range(n_stages)]


class StageModule(StagePart):
    """One pipeline stage of a `Transformer`: `[batch, seq]` tokens (first stage) or `[batch, seq, dim]` hidden in,
    hidden out, or logits `[batch, seq, vocab]` on the last stage.

    Every rank of a pipeline reads the same batch, so each stage takes the document ids of the
    micro-batch it runs from `doc_ids` (filled by `queue_doc_ids` before each step) instead of
    receiving integers over the pipeline; a stage runs its micro-batches' forwards in order.
    """

    rotary = Transformer.rotary
    prepare = Transformer.prepare

    def __init__(self, model: Transformer, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.args, self.first, self.last = model.args, first, last
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.doc_ids: deque[torch.Tensor] = deque()
        self.evaluating = False  # set while a forward-only (held-out) pass runs

    def queue_doc_ids(self, doc_ids: torch.Tensor, microbatches: int) -> None:
        """doc_ids `[batch, seq]` of one step, split as the schedule splits the batch."""
        self.doc_ids = deque(doc_ids.tensor_split(microbatches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        # the schedule's one-time shape inference (first training step, under no_grad) must not use up a micro-batch
        inferring = not torch.is_grad_enabled() and not self.evaluating
        doc_ids = self.doc_ids[0] if inferring else self.doc_ids.popleft()
        (cos, sin), mask = self.prepare(doc_ids, doc_ids)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        if self.output is None:
            return h
        return self.output(self.norm(h)).float()


class MultimodalStage(nn.Module):
    """One pipeline stage of an image–text `MultimodalModel` (no video): the first takes tokens `[batch, seq]` and
    images `[batch, n_images, tiles, 3, S, S]`; every stage but the last returns the hidden state `[batch, seq, dim]`
    and the image tokens `[batch, n_images, tiles, tokens_per_tile, dim]` (see the module docstring); the last
    returns logits `[batch, seq, vocab]`. Names as the whole model's: `lm.layers.{i}`, `cross_attention.{i}`,
    `vision`, `image_embedding`. Tokens and aspect ratios come from `queue_inputs` (every rank reads the batch)."""

    embed = MultimodalModel.embed

    def __init__(self, model: MultimodalModel, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.args, self.first, self.last = model.args, first, last
        self.image_token_id, self.max_tiles = model.image_token_id, model.config.encoder.max_num_tiles
        self.lm = StageModule(model.lm, layer_ids, first, last)
        self.cross_attention = nn.ModuleDict({str(i): model.cross_attention[str(i)] for i in layer_ids
                                              if str(i) in model.cross_attention})
        self.vision = model.vision if first else None
        self.image_embedding = model.image_embedding if first else None
        self.inputs: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self.evaluating = False

    def queue_inputs(self, tokens: torch.Tensor, aspect_ratios: torch.Tensor, microbatches: int) -> None:
        """tokens `[batch, seq]`, aspect_ratios `[batch, n_images, 2]` of one step, split as the schedule splits."""
        self.inputs = deque(zip(tokens.tensor_split(microbatches), aspect_ratios.tensor_split(microbatches)))

    def forward(self, x: torch.Tensor, media: torch.Tensor):
        from adapters.cross_attention import cross_attention_bias, vision_mask

        inferring = not torch.is_grad_enabled() and not self.evaluating  # as in `StageModule.forward`
        tokens, ratios = self.inputs[0] if inferring else self.inputs.popleft()
        if self.first:
            h, image_tokens = self.embed(tokens), self.vision(media, ratios)
        else:
            h, image_tokens = x, media
        (cos, sin), mask = self.lm.prepare(tokens)
        allowed = vision_mask(tokens, self.image_token_id, ratios, self.max_tiles)
        bias, rows = cross_attention_bias(allowed, image_tokens.shape[3], h.dtype)
        flat = image_tokens.flatten(1, 3)
        for i, layer in self.lm.layers.items():
            if i in self.cross_attention:
                block = self.cross_attention[i]
                h = block(h, block.kv(flat), bias, rows)
            h = layer(h, cos, sin, mask)
        if self.last:
            return self.lm.output(self.lm.norm(h)).float()
        return h, image_tokens


def build_stages(model: Transformer | MultimodalModel, mesh: DeviceMesh, schedule: str, virtual: int
                 ) -> list[tuple[int, nn.Module]]:
    """(stage index, module) of the stages this rank holds, in order: `StageModule`s of a `Transformer`,
    `MultimodalStage`s of an image–text model."""
    pp, rank = mesh.size(), mesh.get_local_rank()
    per_rank = virtual if schedule == "interleaved_1f1b" else 1
    if model.args.tie_embeddings:
        raise ConfigError("parallel.pp > 1 needs untied embeddings: the first and last stage would share one matrix")
    stage = StageModule
    if isinstance(model, MultimodalModel):
        if model.video_config is not None:
            raise ConfigError("parallel.pp > 1 cuts the image–text model only, not a model with a video: section; "
                              "use parallel.dp_shard, parallel.tp and parallel.cp")
        stage = MultimodalStage
    n_stages = pp * per_rank
    layers = split_layers(model.args.n_layers, n_stages)
    chosen = [rank + k * pp for k in range(per_rank)]
    return [(s, stage(model, layers[s], s == 0, s == n_stages - 1)) for s in chosen]


def build_schedule(stages: list[tuple[int, nn.Module]], n_stages: int, mesh: DeviceMesh, device: torch.device,
                   schedule: str, microbatches: int, loss_fn):
    """The pipelining schedule over this rank's stages; gradients are not rescaled (the loss is already normalised)."""
    pipe = [PipelineStage(m, s, n_stages, device, group=mesh.get_group()) for s, m in stages]
    if schedule == "interleaved_1f1b":
        if microbatches % mesh.size():
            raise ConfigError(f"parallel.pp_microbatches ({microbatches}) must be a multiple of parallel.pp "
                              f"({mesh.size()}) for interleaved_1f1b")
        return ScheduleInterleaved1F1B(pipe, microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    return cls(pipe[0], microbatches, loss_fn=loss_fn, scale_grads=False)


def fixed_media_batch(batch, seq_len: int, slots: int, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """An image–text batch (`tokens`, `labels` `[batch, seq]`, `media_inputs`) padded to the one shape the pipeline's
    buffers have for the whole run: tokens (pad token) and labels (no label) to `seq_len` at the end, where causal
    attention keeps them from every real row; images to `slots` empty slots (aspect ratio (0, 0), seen by no token).
    Returns tokens, labels `[batch, seq_len]`, images `[batch, slots, tiles, 3, S, S]`, aspect_ratios `[batch, slots, 2]`."""
    media = batch.media_inputs(device)
    tokens, labels = batch.tokens.to(device), batch.labels.to(device)
    images, ratios = media["images"], media["aspect_ratios"]
    t, n = tokens.shape[1], images.shape[1]
    if t > seq_len or n > slots:
        raise ValueError(f"a batch of {t} tokens and {n} images per row does not fit the pipeline's "
                         f"train.seq_len ({seq_len}) and {slots} image slots")
    tokens = F.pad(tokens, (0, seq_len - t), value=pad_id)
    labels = F.pad(labels, (0, seq_len - t), value=IGNORE)
    images = F.pad(images, (0, 0) * (images.ndim - 2) + (0, slots - n))
    ratios = F.pad(ratios, (0, 0, 0, slots - n))
    return tokens, labels, images, ratios
