"""Caption engines: the contract the pipeline uses (`protocol`), the transformers engine,
and `load_engine`, which builds the one a worker runs.

Importing this package is cheap: torch and transformers are imported when an engine is
built, so the pipeline and the CLI can name `CaptionEngine` without paying 5-7 s of imports.
"""

from workers.engine.choice import load_engine
from workers.engine.failures import is_oom
from workers.engine.protocol import CaptionEngine, EngineFatalError, FaultInjector
from workers.engine.transformers_engine import TransformersEngine

__all__ = [
    "CaptionEngine",
    "EngineFatalError",
    "FaultInjector",
    "TransformersEngine",
    "is_oom",
    "load_engine",
]
