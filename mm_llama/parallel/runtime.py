"""What the training engine needs from a parallel layout: forward/backward, loss reduction, clipping.

`ParallelRun.setup` parallelizes a freshly built `Transformer` in the order TP → CP → (activation
checkpointing, compile) → FSDP, or cuts it into pipeline stages first. `ParallelRun.setup_task` does
the same for the model of any other objective (composed image/speech models, encoders, reward and
post-training LMs) with TP → CP (per-token objectives only: `CP_OBJECTIVES`) → (checkpointing,
compile) → FSDP, the task computing the loss on the batch with its labels cut to this CP rank's rows; or
cuts it into pipeline stages (`PP_OBJECTIVES`), each split by TP, the last computing the task's loss of every
micro-batch (the LM's per labelled token, or the preference objectives' per pair: `PREFERENCE_OBJECTIVES`). The loss
of every rank is a sum over its loss units (labelled tokens, pairs, masked frames) divided by the
unit count of the whole global batch, and FSDP sums gradients, so one optimizer step equals the
single-process step on the same global batch (for CLIP: on the same micro-batches, each contrasted
within itself, as gradient accumulation does).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from ..config import ConfigError
from ..config.stage import StageConfig
from ..model import Transformer
from ..model.multimodal import MultimodalModel
from ..model.reward import RewardModel
from ..model.speech_lm import SpeechLM
from ..train.losses import lm_loss_sum
from .blocks import shard_units
from .context_parallel import ComposedCP, apply_cp, apply_cp_composed, shard_sequence
from .fsdp import apply_fsdp, shard_frozen
from .mesh import ParallelDims, build_mesh, fsdp_mesh
from .pipeline import (PipelineShape, RewardStage, StagePart, StageModule, build_schedule, build_stages,
                       ready_for_backward, split_layers)
from .pipeline_media import MultimodalStage, SpeechStage, VideoStage
from .tensor_parallel import apply_tp, apply_tp_composed

# objectives besides 'lm' whose loss is a sum over token positions (labels `[batch, seq]` aligned with the
# tokens), so that each CP rank's share is the loss of its own rows
CP_OBJECTIVES = ("vision_lm", "video_lm", "speech_lm", "sft")
# objectives whose loss compares the responses of a ranking: under pipeline parallelism every ranking stays inside
# one micro-batch (`task.pipeline_batch`) and the last stage computes the task's pair loss (`task.pipeline_loss`)
PREFERENCE_OBJECTIVES = ("reward_model", "dpo")
# objectives besides 'lm' that pipeline parallelism cuts (the LM's loss per labelled token, or the preference
# objectives' per pair): the stage class of each (`_pipeline_stage`)
PP_OBJECTIVES = ("vision_lm", "video_lm", "speech_lm", "sft", *PREFERENCE_OBJECTIVES)


class StateView(nn.Module):
    """This rank's pipeline stages under the whole model's names (`layers.{i}`, `lm.layers.{i}`,
    `cross_attention.{i}`, `vision`, ...), so checkpoint keys are the same at every layout."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        for s in stages:
            _merge(self, s)


def _merge(view: nn.Module, stage: nn.Module) -> None:
    """Add `stage`'s modules to `view` under their names; ModuleDicts and stage containers are merged."""
    for name, child in stage.named_children():
        if isinstance(child, (nn.ModuleDict, StagePart)):
            if name not in view._modules:
                view.add_module(name, nn.ModuleDict() if isinstance(child, nn.ModuleDict) else nn.Module())
            if isinstance(child, nn.ModuleDict):
                view._modules[name].update(child)
            else:
                _merge(view._modules[name], child)
        else:
            view.add_module(name, child)


@dataclass
class ParallelRun:
    dims: ParallelDims
    mesh: DeviceMesh
    device: torch.device
    modules: list[nn.Module]  # the modules that run forward: the whole model, or this rank's stages
    state_module: nn.Module  # what checkpoints read and write
    vocab_parallel: bool
    schedule: object = None
    task: object = None  # the objective's `Task` when it computes the loss (every objective but 'lm')
    replicated: list = field(default_factory=list)  # parameters FSDP leaves whole: gradients summed over DP×CP here
    context: ComposedCP | None = None  # context parallelism of a task's model (the switch; None: no CP or 'lm')
    grad_mesh: DeviceMesh | None = None  # the ranks whose gradients are summed (DP, or DP×CP)
    pipeline_shape: PipelineShape | None = None  # what every batch is padded to under pipeline parallelism
    _pending: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- building

    @classmethod
    def setup(cls, model: Transformer, cfg: StageConfig, dims: ParallelDims, device: torch.device,
              dtype: torch.dtype, per_block: Callable[[nn.Module], None]) -> "ParallelRun":
        p = cfg.parallel
        if dims.cp > 1 and dims.pp > 1:
            raise ConfigError("parallel.cp > 1 together with parallel.pp > 1 is not supported in this version")
        mesh = build_mesh(dims, device.type)
        vocab_parallel = dims.tp > 1 and p.vocab_parallel_loss and not model.args.tie_embeddings
        if dims.pp > 1:
            stages = build_stages(model, mesh["pp"], p.pp_schedule, p.pp_virtual_stages)
            modules = [m for _, m in stages]
        else:
            stages, modules = None, [model]
        for m in modules:
            if dims.tp > 1:
                apply_tp(m, mesh["tp"], vocab_parallel)
            if dims.cp > 1:
                apply_cp(m, mesh["cp"])
            for block in (m.layers.values() if isinstance(m.layers, nn.ModuleDict) else m.layers):
                per_block(block)
            if dims.dp * dims.cp > 1:
                apply_fsdp(m, fsdp_mesh(mesh), dtype, p.reshard_after_forward)
        run = cls(dims, mesh, device, modules, StateView(modules) if stages else model, vocab_parallel)
        if stages:
            # padding sits after every real token of its row and has no label: any token id serves
            # the buffers keep one shape: rows as long as the ramp's longest (shorter rows early on are padded)
            run.pipeline_shape = PipelineShape(cfg.train.longest_seq_len, cfg.train.micro_batch, pad_id=0)
            run._attach_schedule(stages, model.args.n_layers, cfg)
        return run

    def _attach_schedule(self, stages: list, n_layers: int, cfg: StageConfig) -> None:
        p = cfg.parallel
        micro = p.pp_microbatches or self.dims.pp
        if cfg.train.micro_batch % micro:
            raise ConfigError(f"parallel.pp_microbatches ({micro}) must divide train.micro_batch ({cfg.train.micro_batch})")
        n_stages = len(split_layers(n_layers, self.dims.pp * len(stages)))
        self.schedule = build_schedule(stages, n_stages, self.mesh["pp"], self.device, p.pp_schedule, micro,
                                       self._pipeline_loss)

    @classmethod
    def setup_task(cls, model: nn.Module, task, cfg: StageConfig, dims: ParallelDims, device: torch.device,
                   dtype: torch.dtype, per_block: Callable[[nn.Module], None]) -> "ParallelRun":
        """Data, tensor and context parallelism for the model of `task` (any objective): TP → CP → per-block → FSDP;
        or pipeline stages (`PP_OBJECTIVES`), then TP → per-block → FSDP on each."""
        if dims.pp > 1:
            return cls._setup_task_pipeline(model, task, cfg, dims, device, dtype, per_block)
        if dims.cp > 1 and task.name not in CP_OBJECTIVES:
            raise ConfigError(f"train.objective '{task.name}': parallel.cp splits the token sequence of a per-token "
                              f"loss and supports the {', '.join(repr(o) for o in ('lm', *CP_OBJECTIVES))} objectives "
                              "only; use parallel.dp_shard and parallel.tp")
        if dims.cp > 1 and getattr(getattr(task, "opts", None), "caption_contrastive", 0):
            raise ConfigError(f"train.objective '{task.name}': parallel.cp > 1 with train.options.caption_contrastive > 0 "
                              "is not supported: the contrastive term is per clip, not per token, and every CP rank "
                              "would count it; set it to 0 or use parallel.dp_shard and parallel.tp")
        mesh = build_mesh(dims, device.type)
        if dims.tp > 1:
            apply_tp_composed(model, mesh["tp"])
        context = apply_cp_composed(model, mesh["cp"], task.tokenizer.pad_id) if dims.cp > 1 else None
        for block in task.blocks(model):
            per_block(block)
        replicated, grad_mesh = [], fsdp_mesh(mesh)
        if dims.dp * dims.cp > 1:
            replicated = apply_fsdp(model, grad_mesh, dtype, cfg.parallel.reshard_after_forward, units=shard_units(model))
        if hasattr(task, "frozen_layout"):  # the task's frozen second model (DPO's reference) is laid out alike
            task.frozen_layout = partial(shard_frozen, tp_mesh=mesh["tp"], dp_mesh=grad_mesh, dtype=dtype)
        return cls(dims, mesh, device, [model], model, vocab_parallel=False, task=task, replicated=replicated,
                   context=context, grad_mesh=grad_mesh)

    @classmethod
    def _setup_task_pipeline(cls, model: nn.Module, task, cfg: StageConfig, dims: ParallelDims, device: torch.device,
                             dtype: torch.dtype, per_block: Callable[[nn.Module], None]) -> "ParallelRun":
        """The task's model cut into pipeline stages (`_pipeline_stage`), each split by the composed TP plan
        (`apply_tp_composed`); the loss is the LM's (per labelled token), as for 'lm', or a preference objective's
        per pair. `per_block` wraps the task's blocks (`task.blocks`) on the stage that holds each; DPO's frozen
        reference is cut alike when the task builds it (`_frozen_pipeline`)."""
        stage = _pipeline_stage(model, task)
        if dims.cp > 1:
            raise ConfigError(f"train.objective '{task.name}': parallel.pp > 1 together with parallel.cp > 1 is not "
                              "supported in this version")
        p = cfg.parallel
        mesh = build_mesh(dims, device.type)
        blocks = {id(b) for b in task.blocks(model)}
        stages = build_stages(model, mesh["pp"], p.pp_schedule, p.pp_virtual_stages, stage)
        modules = [m for _, m in stages]
        replicated = []
        for m in modules:
            if dims.tp > 1:  # the composed plan on the blocks and embeddings this stage holds
                apply_tp_composed(m, mesh["tp"])
            for block in [b for b in m.modules() if id(b) in blocks]:
                per_block(block)
            if dims.dp > 1:
                replicated += apply_fsdp(m, mesh["dp"], dtype, p.reshard_after_forward, units=shard_units(m))
        run = cls(dims, mesh, device, modules, StateView(modules), vocab_parallel=False, task=task,
                  replicated=replicated, grad_mesh=mesh["dp"])
        documents = getattr(task.opts, "documents", None)
        rows = cfg.train.micro_batch * getattr(task, "pipeline_rows", 1)  # DPO: one row per response
        run.pipeline_shape = PipelineShape(cfg.train.longest_seq_len, rows, task.tokenizer.pad_id,
                                           image_slots=task.opts.max_images if documents else 1)
        run._attach_schedule(stages, model.args.n_layers, cfg)
        if hasattr(task, "frozen_layout"):
            task.frozen_layout = partial(run._frozen_pipeline, cfg=cfg, dtype=dtype)
        return run

    def _frozen_pipeline(self, model: nn.Module, cfg: StageConfig, dtype: torch.dtype) -> "PipelineForward":
        """A frozen model of the trained one's architecture (DPO's reference) cut into the same stages: this rank
        keeps its stages' part only (requires_grad off, no optimizer state; the same TP plan and FSDP over DP, as
        `shard_frozen`), run by a forward-only schedule of its own."""
        stages = build_stages(model, self.mesh["pp"], cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages,
                              _pipeline_stage(model, self.task))
        modules = [shard_frozen(m, self.mesh["tp"], self.grad_mesh, dtype) for _, m in stages]
        frozen = ParallelRun(self.dims, self.mesh, self.device, modules, StateView(modules), vocab_parallel=False,
                             pipeline_shape=self.pipeline_shape)
        frozen._attach_schedule(stages, model.args.n_layers, cfg)
        return PipelineForward(frozen)

    # ---------------------------------------------------------------- where this rank sits

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    def _holds_stage(self, first: bool) -> bool:
        return any((s.first if first else s.last) for s in self.modules) if self.schedule else True

    @property
    def counts_loss(self) -> bool:
        """One rank per (dp, cp) coordinate reports the loss: TP rank 0 of the last pipeline stage."""
        return self.mesh["tp"].get_local_rank() == 0 and self._holds_stage(first=False)

    def parameters(self) -> Iterator[nn.Parameter]:
        seen = set()
        for m in self.modules:
            for prm in m.parameters():
                if id(prm) not in seen:
                    seen.add(id(prm))
                    yield prm

    # ---------------------------------------------------------------- one step

    def _loss_context(self):
        return loss_parallel() if self.vocab_parallel else contextlib.nullcontext()

    @property
    def _preference(self) -> bool:
        return self.task is not None and self.task.name in PREFERENCE_OBJECTIVES

    def _pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss of one micro-batch on the last stage: this pass's loss sum, over the global unit count."""
        loss = self._pending["loss"](output, target)
        self._pending["sum"] += _local(loss.detach()).double().cpu()
        return loss / self._pending["n_labels"]

    def _run_schedule(self, args: tuple, target: torch.Tensor, loss: Callable, n_units: int, autocast,
                      backward: bool) -> torch.Tensor:
        """One pass of the schedule over the padded batch (`args` of the first stage); `loss(output, target chunk)` is
        the summed loss of each micro-batch. Returns this rank's loss sum (float64, 0 off the last stage)."""
        self._pending = {"loss": loss, "sum": torch.zeros((), dtype=torch.float64), "n_labels": max(n_units, 1)}
        args = args if self._holds_stage(first=True) else ()
        target = target if self._holds_stage(first=False) else None
        with self._loss_context(), autocast():
            if backward:
                self.schedule.step(*args, target=target)
            else:
                self.schedule.eval(*args, target=target)
                ready_for_backward(self.schedule)
        return self._pending["sum"]

    def forward_backward(self, batch, n_labels: int, autocast, backward: bool = True) -> torch.Tensor:
        """Run one micro-batch `[batch, seq]` (this DP rank's); return this rank's summed loss (float64, 0 if it holds none)."""
        if self.schedule is not None and self._preference:
            # the task lays the batch out (whole rankings per micro-batch; DPO's reference pass runs here) and
            # computes each micro-batch's pair loss from the rows it holds (the target: row ids)
            with autocast():
                batch = self.task.pipeline_batch(batch, self.pipeline_shape.rows, self.device)
            args, _ = self._pipeline_inputs(batch)
            rows = torch.arange(self.pipeline_shape.rows, device=self.device)
            return self._run_schedule(args, rows, partial(self.task.pipeline_loss, batch=batch), n_labels, autocast,
                                      backward)
        if self.schedule is not None:
            args, labels = self._pipeline_inputs(batch)
            return self._run_schedule(args, labels, lm_loss_sum, n_labels, autocast, backward)
        if self.task is not None:
            if self.context is not None:
                batch = self.context.local_batch(batch)
            with autocast():
                loss = self.task.loss(self.modules[0], batch, self.device)
            if backward:
                (loss / max(n_labels, 1)).backward()
            return _local(loss.detach()).double().cpu()
        tokens, labels, doc_ids = (t.to(self.device) for t in (batch.tokens, batch.labels, batch.doc_ids))
        with self._loss_context():
            if self.dims.cp > 1:
                cp, rank = self.dims.cp, self.mesh["cp"].get_local_rank()
                tokens, labels = shard_sequence(tokens, cp, rank), shard_sequence(labels, cp, rank)
            with autocast():
                logits = self.modules[0](tokens, doc_ids=doc_ids)
                loss = lm_loss_sum(logits, labels)
            if backward:
                (loss / max(n_labels, 1)).backward()
            return _local(loss.detach()).double().cpu()

    def _pipeline_inputs(self, batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The first stage's arguments and the last stage's targets (the batch padded to `pipeline_shape`); every
        stage queues what it reads beside its input (`step_inputs`, `queue` of the stage classes)."""
        args, labels, local = self.modules[0].step_inputs(batch, self.pipeline_shape, self.device)
        for m in self.modules:
            m.queue(local, self.schedule._n_microbatches)
        return args, labels

    @torch.no_grad()
    def evaluate(self, batches, autocast) -> float | dict[str, float]:
        """Mean held-out loss per labelled token (a task's own metrics); every DP rank evaluates the same batches."""
        if self.task is not None and self.schedule is None:  # under CP: the whole sequences on every rank
            with self.context.disabled() if self.context is not None else contextlib.nullcontext():
                return self.task.evaluate(self.modules[0], batches, self.device, autocast)
        if self._preference:  # the task's own metrics, its model a forward-only pass of the pipeline
            return self.task.evaluate(PipelineForward(self), batches, self.device, autocast)
        for m in self.modules:
            m.eval()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for b in batches:
            n = int((b.labels != -100).sum())
            total += self.forward_backward(b, n, autocast, backward=False)
            count += n
        for m in self.modules:
            m.train()
        loss = float(self.sum_over_replica(total)) / max(count, 1)
        return loss if self.task is None else {"val_loss": loss}  # a pipelined task: its held-out loss only

    # ---------------------------------------------------------------- reductions

    def sum_over_dp(self, value: float | int) -> float:
        t = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(t, group=self.mesh["dp"].get_group())
        return float(t)

    def sum_losses(self, local: torch.Tensor) -> float:
        """Total loss of the global batch from each rank's local sum (only `counts_loss` ranks contribute)."""
        t = local.clone() if self.counts_loss else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def sum_over_replica(self, local: torch.Tensor) -> float:
        """One model replica's loss (DP rank 0's view): summed over its CP ranks, counted once over TP and PP."""
        t = local.clone() if (self.counts_loss and self.dp_rank == 0) else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def gather_data_states(self, state: dict) -> list[dict]:
        """The data position of every data-parallel rank, in DP order (ranks of one replica read the same data)."""
        pairs = [None] * dist.get_world_size()
        dist.all_gather_object(pairs, (self.dp_rank, state))
        by_rank = dict(pairs)
        return [by_rank[d] for d in range(self.dims.dp)]

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Complete the gradients of the parameters FSDP left replicated (summed over DP), then take the global
        L2 norm of all gradients (sharded by FSDP/TP, split by PP) and scale them down to `max_norm`."""
        for p in self.replicated:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.grad_mesh.get_group())
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        local = torch.zeros((), dtype=torch.float64)
        for g in grads:
            n = torch.linalg.vector_norm(g, dtype=torch.float32)
            local += (n.full_tensor() if isinstance(n, DTensor) else n).double().cpu() ** 2
        if self.dims.pp > 1:
            dist.all_reduce(local, group=self.mesh["pp"].get_group())
        norm = math.sqrt(float(local))
        coef = max_norm / (norm + 1e-6)
        if coef < 1 and math.isfinite(norm):
            for g in grads:
                g.mul_(coef)
        return norm


class PipelineForward:
    """A forward-only pass of a pipelined model whose last stage's results reach every pipeline rank: what a task's
    own code calls as its model (the held-out evaluation of 'reward_model' and 'dpo', DPO's frozen reference), so
    its metrics are computed as in one process. Called, the reward model's logits per token `[batch, seq]`;
    `labelled_logps`, an LM's log-probs of the labelled tokens per row. A batch is padded to the pipeline's shape."""

    def __init__(self, run: ParallelRun):
        self.run = run

    @property
    def training(self) -> bool:
        return self.run.modules[0].training

    def train(self, mode: bool = True) -> "PipelineForward":
        for m in self.run.modules:
            m.train(mode)
        return self

    def eval(self) -> "PipelineForward":
        return self.train(False)

    def __call__(self, tokens: torch.Tensor, *, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Reward logits `[batch, seq]` (`pipeline.RewardStage`)."""
        batch = SimpleNamespace(tokens=tokens.cpu(), mask=mask.cpu(), positions=positions.cpu())
        args, rows = self.run._pipeline_inputs(batch)
        out = self._rows(args, rows, lambda output, r: output, (self.run.pipeline_shape.seq_len,))
        return out[:tokens.shape[0], :tokens.shape[1]]

    def labelled_logps(self, tokens: torch.Tensor, labels: torch.Tensor, **media) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ log p of the labelled tokens `[batch]`, their count `[batch]`), as `dpo.labelled_logps`."""
        from ..train.tasks.dpo import sequence_logps

        if media:
            raise ValueError(f"a pipelined model's log-probs are of text rows; got media {sorted(media)}")
        args, padded = self.run._pipeline_inputs(SimpleNamespace(tokens=tokens.cpu(), labels=labels.cpu()))
        rows = torch.arange(self.run.pipeline_shape.rows, device=self.run.device)
        logps = self._rows(args, rows, lambda output, r: sequence_logps(output, padded[r])[0], ())
        return logps[:tokens.shape[0]], (labels != -100).sum(-1)

    @torch.no_grad()
    def _rows(self, args: tuple, rows: torch.Tensor, result: Callable, tail: tuple) -> torch.Tensor:
        """`result(output, row ids)` `[m, *tail]` (fp32) of every micro-batch, gathered on the last stage and sent to
        every pipeline rank: `[pipeline rows, *tail]`."""
        run, pp = self.run, self.run.mesh["pp"]
        out = torch.zeros((run.pipeline_shape.rows, *tail), device=run.device)

        def keep(output: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            out[r] = result(output, r).float()
            return output.new_zeros(())

        run._run_schedule(args, rows, keep, 1, contextlib.nullcontext, backward=False)
        dist.broadcast(out, group=pp.get_group(), group_src=pp.size() - 1)
        return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _pipeline_stage(model: nn.Module, task) -> type:
    """The stage class that cuts the model of `task` (`PP_OBJECTIVES`), or a ConfigError naming what is refused."""
    supported = ", ".join(repr(o) for o in ("lm", *PP_OBJECTIVES))
    if task.name not in PP_OBJECTIVES:
        raise ConfigError(f"train.objective '{task.name}': parallel.pp cuts a language model and supports the "
                          f"{supported} objectives only (not the encoder pre-training); use parallel.dp_shard, "
                          "parallel.tp and parallel.cp")
    if task.name == "reward_model":
        if isinstance(model, RewardModel):
            return RewardStage
        raise ConfigError("train.objective 'reward_model' with a model.vision section: parallel.pp cuts the text "
                          "reward model only, not the vision RM; use parallel.dp_shard and parallel.tp")
    if task.name == "dpo":
        if isinstance(model, Transformer):
            return StageModule
        raise ConfigError("train.objective 'dpo' with a model.vision or model.speech section: parallel.pp cuts the "
                          "text DPO only, not the composed models'; use parallel.dp_shard and parallel.tp")
    if getattr(task.opts, "caption_contrastive", 0):
        raise ConfigError(f"train.objective '{task.name}': parallel.pp > 1 with train.options.caption_contrastive > 0 "
                          "is not supported: the term compares the aggregated clips of a whole batch on the first "
                          "stage, while the pipeline takes its loss per micro-batch on the last; set it to 0 or use "
                          "parallel.dp_shard, parallel.tp and parallel.cp")
    video = isinstance(model, MultimodalModel) and model.video_config is not None
    if task.name == "video_lm":
        return VideoStage
    if task.name == "vision_lm" and not video:
        return MultimodalStage
    if task.name == "speech_lm" or (task.name == "sft" and isinstance(model, SpeechLM)):
        return SpeechStage
    if task.name == "sft" and isinstance(model, Transformer):
        return StageModule
    raise ConfigError(f"train.objective '{task.name}' with a model.vision section: parallel.pp cuts the image–text "
                      "model for 'vision_lm' (no model.video) and the video model for 'video_lm' only, not image or "
                      "video SFT (each dialog's own-media masks); use parallel.dp_shard, parallel.tp and parallel.cp")
