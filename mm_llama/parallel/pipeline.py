"""Pipeline parallelism with `torch.distributed.pipelining` (SPEC §2.4).

The model is cut into `pp · v` stages (v = 1, or `pp_virtual_stages` for the interleaved schedule;
rank r holds stages r, r+pp, ...). As in the paper the embedding and the output projection (with
the loss) each count as one layer when balancing, so the first stage holds one layer fewer beside
the embedding and the last one layer fewer beside the output. A stage keeps the Transformer's
attribute names (`tok_embeddings`, `layers.{i}`, `norm`, `output`), so state-dict keys match the
whole model's and a checkpoint loads at any other layout.

Only floating tensors travel between stages. Every rank of a pipeline reads the same batch, so what a
stage needs beside its input (document ids, tokens for the masks, the media the first stage encodes) is
queued on each stage before a step, one entry per micro-batch (`queue`), and taken in order by the
stage's forwards. The pipeline's buffers have one shape for the whole run, so every batch is padded to
`PipelineShape` first (`step_inputs`). `RewardStage` cuts the text reward model (the value head on the last
stage, the response mask queued); DPO's policy and frozen reference are cut by `StageModule`. The stages of the
composed models are in `pipeline_media.py`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..config import ConfigError
from ..model import Transformer
from ..model.masks import AttentionMask
from ..model.reward import RewardModel
from ..train.losses import IGNORE


@dataclass(frozen=True)
class PipelineShape:
    """What every batch is padded to: `rows` (train.micro_batch) × `seq_len` (train.seq_len) tokens, the
    padding being `pad_id` tokens without labels, and `image_slots` images per row (image–text model)."""

    seq_len: int
    rows: int
    pad_id: int
    image_slots: int = 1


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`[n, ...]` → `[rows, ...]`, the last row repeated (a short held-out batch; its copies carry no labels)."""
    if t.shape[0] > rows:
        raise ValueError(f"a batch of {t.shape[0]} rows does not fit the pipeline's train.micro_batch ({rows})")
    return torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


def fixed_tokens(tokens: torch.Tensor, labels: torch.Tensor, shape: PipelineShape) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, labels `[n, t]` → `[rows, seq_len]`: pad tokens at the end of each row, where causal attention keeps
    them from every real position, and repeated rows; neither has a label."""
    n, t = tokens.shape
    if t > shape.seq_len:
        raise ValueError(f"a batch of {t} tokens per row does not fit the pipeline's train.seq_len ({shape.seq_len})")
    tokens = pad_rows(F.pad(tokens, (0, shape.seq_len - t), value=shape.pad_id), shape.rows)
    labels = F.pad(labels, (0, shape.seq_len - t, 0, shape.rows - n), value=IGNORE)
    return tokens, labels


def fixed_doc_ids(doc_ids: torch.Tensor, shape: PipelineShape) -> torch.Tensor:
    """doc_ids `[n, t]` → `[rows, seq_len]`, the padding joining each row's last document (causal: unseen)."""
    return pad_rows(torch.cat([doc_ids, doc_ids[:, -1:].expand(-1, shape.seq_len - doc_ids.shape[1])], 1), shape.rows)


def take(stage: nn.Module, queue: deque):
    """The queued inputs of the micro-batch `stage` runs now. A stage's first forward is the schedule's one-time
    shape inference (in its first step or forward-only pass), which runs the first micro-batch's inputs without
    using them up."""
    if not stage.shapes_known:
        stage.shapes_known = True
        return queue[0]
    return queue.popleft()


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
    """One pipeline stage of a `Transformer` (the 'lm' and text 'sft' objectives): `[batch, seq]` tokens (first
    stage) or `[batch, seq, dim]` hidden in, hidden out, or logits `[batch, seq, vocab]` on the last stage.
    The document ids of each micro-batch are queued (`queue`)."""

    rotary = Transformer.rotary
    prepare = Transformer.prepare
    shapes_known = False

    def __init__(self, model: Transformer, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.args, self.first, self.last = model.args, first, last
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.inputs: deque = deque()

    @staticmethod
    def step_inputs(batch, shape: PipelineShape, device) -> tuple[tuple, torch.Tensor, tuple]:
        """A text batch (`tokens`, `labels`, `doc_ids` `[batch, seq]`; no `doc_ids`: causal rows, as DPO's) →
        the first stage's arguments, the last stage's targets, what every stage queues."""
        tokens, labels = fixed_tokens(batch.tokens, batch.labels, shape)
        doc_ids = getattr(batch, "doc_ids", None)
        doc_ids = fixed_doc_ids(doc_ids, shape).to(device) if doc_ids is not None else None
        return (tokens.to(device),), labels.to(device), (doc_ids,)

    def queue(self, local: tuple, microbatches: int) -> None:
        """`step_inputs`' per-stage inputs of one step, split as the schedule splits the batch."""
        (doc_ids,) = local
        self.inputs = deque(doc_ids.tensor_split(microbatches) if doc_ids is not None else [None] * microbatches)

    def run_layers(self, h: torch.Tensor, tokens: torch.Tensor | None, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """This stage's layers on h `[batch, seq, dim]` (tokens None: causal rows; `prepare` reads only the shape
        of h's first channel then); the last stage returns logits `[batch, seq, vocab]`."""
        (cos, sin), mask = self.prepare(tokens if tokens is not None else h[..., 0], doc_ids)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        if self.output is None:
            return h
        return self.output(self.norm(h)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        doc_ids = take(self, self.inputs)
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        return self.run_layers(h, doc_ids, doc_ids)


class RewardStage(StagePart):
    """One pipeline stage of a text `RewardModel` (reward_model): tokens `[batch, seq]` (first stage) or the hidden
    state in; the hidden state out, or on the last stage, which holds the value head, the reward logit of every
    token `[batch, seq]` (fp32). Each micro-batch's attention mask bool `[batch, 1, seq, seq]` (a response sees
    the prompt and itself) and positions `[batch, seq]` are queued."""

    shapes_known = False

    def __init__(self, model: RewardModel, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.args, self.first, self.last = model.args, first, last
        self.lm = StageModule(model.lm, layer_ids, first, last)
        self.value_head = model.value_head if last else None
        self.inputs: deque = deque()

    @staticmethod
    def step_inputs(batch, shape: PipelineShape, device) -> tuple[tuple, torch.Tensor, tuple]:
        """A `RewardBatch` padded to `shape` (a padded position sees itself only; repeated rows) → the first stage's
        tokens, the row ids `[rows]` (the loss reads the batch's own response ends and pairs), what every stage
        queues: mask and positions."""
        t = batch.tokens.shape[1]
        tokens, _ = fixed_tokens(batch.tokens, torch.zeros_like(batch.tokens), shape)
        mask = F.pad(batch.mask, (0, shape.seq_len - t, 0, shape.seq_len - t))
        mask |= torch.eye(shape.seq_len, dtype=torch.bool)  # as `response_mask` lets padding see itself
        positions = F.pad(batch.positions, (0, shape.seq_len - t))
        mask, positions = pad_rows(mask, shape.rows), pad_rows(positions, shape.rows)
        rows = torch.arange(shape.rows, device=device)
        return (tokens.to(device),), rows, (mask.to(device), positions.to(device))

    def queue(self, local: tuple, microbatches: int) -> None:
        self.inputs = deque(zip(*(t.tensor_split(microbatches) for t in local)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask, positions = take(self, self.inputs)
        h = self.lm.tok_embeddings(x) if self.first else x
        (cos, sin), _ = self.lm.prepare(positions, positions=positions)
        attention = AttentionMask(mask)
        for layer in self.lm.layers.values():
            h = layer(h, cos, sin, attention)
        if not self.last:
            return h
        return self.value_head(self.lm.norm(h)).squeeze(-1).float()


def build_stages(model: nn.Module, mesh: DeviceMesh, schedule: str, virtual: int, stage: type = StageModule
                 ) -> list[tuple[int, nn.Module]]:
    """(stage index, module) of the `stage`s this rank holds, in order (`stage(model, layer_ids, first, last)`)."""
    pp, rank = mesh.size(), mesh.get_local_rank()
    per_rank = virtual if schedule == "interleaved_1f1b" else 1
    if model.args.tie_embeddings:
        raise ConfigError("parallel.pp > 1 needs untied embeddings: the first and last stage would share one matrix")
    n_stages = pp * per_rank
    layers = split_layers(model.args.n_layers, n_stages)
    chosen = [rank + k * pp for k in range(per_rank)]
    return [(s, stage(model, layers[s], s == 0, s == n_stages - 1)) for s in chosen]


def ready_for_backward(schedule) -> None:
    """Let the receive buffers of the schedule's stages require grad. torch sizes them at the schedule's first pass
    and marks them only if that pass runs backward; after a forward-only first pass (a held-out evaluation before
    the first step: `train.eval_untrained`) a later stage would compute no input gradient and the first training
    step would wait forever for it."""
    for stage in getattr(schedule, "_stages", None) or [schedule._stage]:
        for infos in getattr(stage, "args_recv_info", {}).values():
            for buffer in (getattr(info, "buffer", None) for info in infos):
                if isinstance(buffer, torch.Tensor) and buffer.is_floating_point() and not buffer.requires_grad:
                    buffer.requires_grad_(True)


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
