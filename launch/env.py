"""Process-wide defaults for the entry points: see trainer/runtime_env.py (kept there so the
lower layers need not import launch/)."""
from trainer.runtime_env import PROJECT_ROOT, set_runtime_defaults

__all__ = ["PROJECT_ROOT", "set_runtime_defaults"]
