"""A pipeline's closing report: `eval.json` (flat metrics of the final models) and `summary.md`."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import load_config
from ..config.stage import StageConfig


def evaluate_text_stage(run_dir: Path) -> dict[str, float]:
    """Held-out metrics of one text stage's final model, with the unigram baseline."""
    from ..checkpoint import from_pretrained
    from ..evaluate.text import text_metrics
    from ..text import load_tokenizer

    cfg = load_config(StageConfig, run_dir / "config.yaml")
    model = from_pretrained(run_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    return text_metrics(model, cfg.data, tokenizer, seq_len=min(256, cfg.model.lm.max_seq_len))


def write_report(out: Path, name: str, order: list[str], metrics: dict[str, float]) -> None:
    (out / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lines = [f"# Pipeline `{name}`", "", "| stage | steps | final held-out loss |", "|---|---|---|"]
    for stage in order:
        summary = out / stage / "final" / "summary.json"
        s = json.loads(summary.read_text()) if summary.exists() else {}
        val = f"{s['val_loss']:.4f}" if "val_loss" in s else "-"
        lines.append(f"| {stage} | {s.get('steps', '-')} | {val} |")
    lines += ["", "## Evaluation of the final model", "", "| metric | value | baseline |", "|---|---|---|"]
    for key, value in metrics.items():
        if not key.endswith("_baseline"):
            base = metrics.get(f"{key}_baseline")
            lines.append(f"| {key} | {value:.4f} | {'-' if base is None else f'{base:.4f}'} |")
    lines += ["", "## Training curves", ""]
    lines += [f"### {s}\n\n![{s}]({s}/plots/loss.png)\n" for s in order if (out / s / "plots" / "loss.png").exists()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
