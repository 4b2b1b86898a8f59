"""Training tasks: what each `train.objective` builds, streams and minimises."""
from .base import TASKS, Task, register, task_for

__all__ = ["TASKS", "Task", "register", "task_for"]
