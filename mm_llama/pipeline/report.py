"""A pipeline's closing report: `eval.json` (flat metrics of the final models, each with its blind baseline
where one exists and the stage's starting weights' value where the stage measured it) and `summary.md` (a
table per stage and the training curves)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import load_config, read_yaml
from ..config.stage import StageConfig

# metric in a stage's summary -> (name in eval.json, the summary metric that is its baseline)
ALIASES = [
    (re.compile(r"val_acc_(\w+)"), r"image_qa_accuracy_\1", r"val_majority_\1"),
    (re.compile(r"val_video_acc_(\w+)"), r"video_qa_accuracy_\1", r"val_video_majority_\1"),
    (re.compile(r"val_retrieval_(i2t|t2i)"), r"retrieval_\1", "val_retrieval_chance"),
]
SKIP = re.compile(r"val_(video_)?(majority|chance)_\w+|val_retrieval_chance|steps")
# objective -> its preference accuracies: a pair ranked blind (a coin) is right half the time
PREFERENCE_ACCURACIES = {"reward_model": ("val_accuracy", "val_accuracy_chosen_rejected"), "dpo": ("val_reward_accuracy",)}
UNTRAINED = "untrained_"
REFERENCE_SUFFIXES = ("_baseline", "_untrained")


def objective(run_dir: Path) -> str:
    return read_yaml(run_dir / "config.yaml").get("train", {}).get("objective", "lm")


def evaluate_text_stage(run_dir: Path) -> dict[str, float]:
    """Held-out metrics of one text stage's final model, with the unigram baseline."""
    from ..checkpoint import from_pretrained
    from ..evaluate.text import text_metrics
    from ..text import load_tokenizer

    cfg = load_config(StageConfig, run_dir / "config.yaml")
    model = from_pretrained(run_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    return text_metrics(model, cfg.data, tokenizer, seq_len=min(256, cfg.model.lm.max_seq_len))


def stage_metrics(stage: str, summary: dict, objective: str = "") -> dict[str, float]:
    """A stage's final metrics under flat names `<stage>.<metric>`, blind baselines as `<metric>_baseline`, the
    starting weights' values (`untrained_<metric>` in the summary) as `<metric>_untrained`."""
    out = {}
    for key, value in summary.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key.startswith(UNTRAINED) \
                or SKIP.fullmatch(key):
            continue
        name, base = key, 0.5 if key in PREFERENCE_ACCURACIES.get(objective, ()) else None
        for pattern, alias, baseline in ALIASES:
            if pattern.fullmatch(key):
                name, base = pattern.sub(alias, key), summary.get(pattern.sub(baseline, key))
        if base is not None:
            out[f"{stage}.{name}_baseline"] = base
        out[f"{stage}.{name}"] = value
        if summary.get(f"{UNTRAINED}{key}") is not None and not key.endswith("_baseline"):
            out[f"{stage}.{name}_untrained"] = summary[f"{UNTRAINED}{key}"]
    return out


def collect(out: Path, order: list[str]) -> dict[str, float]:
    """Text metrics of the last text stage, then every finished stage's own final metrics."""
    metrics: dict[str, float] = {}
    text_stages = [s for s in order if (out / s / "final").exists() and objective(out / s) == "lm"]
    if text_stages:
        metrics.update(evaluate_text_stage(out / text_stages[-1]))
    for stage in order:
        summary = out / stage / "final" / "summary.json"
        if summary.exists():
            metrics.update(stage_metrics(stage, json.loads(summary.read_text()), objective(out / stage)))
    return metrics


def write_report(out: Path, name: str, order: list[str], metrics: dict[str, float]) -> None:
    (out / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lines = [f"# Pipeline `{name}`", "", "Every number below was measured by this run.", "",
             "Baseline: blind (unigram text model, majority answer, chance, best constant transcript, a coin for "
             "preferences); untrained: the stage's starting weights, evaluated before its first step.", "",
             "| metric | value | baseline | untrained |", "|---|---|---|---|"]
    for key, value in metrics.items():
        if not key.endswith(REFERENCE_SUFFIXES):
            refs = [metrics.get(f"{key}{suffix}") for suffix in REFERENCE_SUFFIXES]
            lines.append(f"| {key} | {value:.4f} | " + " | ".join('-' if r is None else f'{r:.4f}' for r in refs) + " |")
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    if timings:
        lines += ["", "## Time per stage", "", "| stage | wall s | CPU s (incl. loader workers) |", "|---|---|---|"]
        lines += [f"| {s} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} |" for s, t in timings.items() if s in order]
    lines += ["", "## Training curves", ""]
    lines += [f"### {s}\n\n![{s}]({s}/plots/loss.png)\n" for s in order if (out / s / "plots" / "loss.png").exists()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
