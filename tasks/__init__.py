"""Tasks (DESIGN section 7): registered by name, selectable from configs (`task.name`).

`get("arithmetic")`, `get("chat_arithmetic")`, `get("chat_order")`, `get("gsm8k")`, `get("mbpp")`
build the built-in tasks; users add their own with `register("name", factory)` (or `@register("name")`), and
`TaskConfig` accepts them.
"""

from __future__ import annotations

from typing import Any

from mirrorlab.registry import Registry

from .base import REWARD_ERROR, Example, SplitOverlapError, Task, check_disjoint, data_dir, is_reward_error

registry: Registry[Task] = Registry("task")


def register(name: str, factory: Any = None, *, overwrite: bool = False) -> Any:
    """Register a task factory (a `Task` subclass or a function returning one) under `name`."""
    return registry.register(name, factory, overwrite=overwrite)


def get(name: str, **params: Any) -> Task:
    """Build the task registered under `name` with keyword parameters."""
    return registry.get(name, **params)


def names() -> list[str]:
    """Registered task names, sorted."""
    return registry.names()


from .arithmetic import Arithmetic, ChatArithmetic  # noqa: E402
from .gsm8k import GSM8K, extract_prediction  # noqa: E402
from .mbpp import MBPP, extract_code, pass_at_k  # noqa: E402
from .order import ChatOrder  # noqa: E402

register("arithmetic", Arithmetic)
register("chat_arithmetic", ChatArithmetic)
register("gsm8k", GSM8K)
register("mbpp", MBPP)
register("chat_order", ChatOrder)

__all__ = [
    "GSM8K", "MBPP", "REWARD_ERROR", "Arithmetic", "ChatOrder", "Example",
    "SplitOverlapError", "Task", "check_disjoint",
    "data_dir", "is_reward_error",
    "extract_code", "extract_prediction", "pass_at_k",
    "get", "names", "register", "registry",
]
