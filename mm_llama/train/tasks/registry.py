"""Modules that define training tasks; `task_for` imports them so their `@register` runs."""
TASK_MODULES = ("text_lm", "clip", "vision_lm", "video_lm", "bestrq", "speech_lm", "sft", "reward", "dpo")
