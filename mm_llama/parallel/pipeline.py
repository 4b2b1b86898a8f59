"""Pipeline parallelism with `torch.distributed.pipelining` (SPEC §2.4).

The model is cut into `pp · v` stages (v = 1, or `pp_virtual_stages` for the interleaved schedule;
rank r holds stages r, r+pp, ...). As in the paper the embedding and the output projection (with
the loss) each count as one layer when balancing, so the first stage holds one layer fewer beside
the embedding and the last one layer fewer beside the output. A stage keeps the Transformer's
attribute names (`tok_embeddings`, `layers.{i}`, `norm`, `output`), so state-dict keys match the
whole model's and a checkpoint loads at any other layout.
"""
from __future__ import annotations

from collections import deque

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..config import ConfigError
from ..model import Transformer


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


class StageModule(nn.Module):
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
        self.args = model.args
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


def build_stages(model: Transformer, mesh: DeviceMesh, schedule: str, virtual: int) -> list[tuple[int, StageModule]]:
    """(stage index, module) of the stages this rank holds, in order."""
    pp, rank = mesh.size(), mesh.get_local_rank()
    per_rank = virtual if schedule == "interleaved_1f1b" else 1
    if model.args.tie_embeddings:
        raise ConfigError("parallel.pp > 1 needs untied embeddings: the first and last stage would share one matrix")
    n_stages = pp * per_rank
    layers = split_layers(model.args.n_layers, n_stages)
    chosen = [rank + k * pp for k in range(per_rank)]
    return [(s, StageModule(model, layers[s], s == 0, s == n_stages - 1)) for s in chosen]


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

