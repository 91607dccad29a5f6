"""Caption engines: the contract the pipeline uses (`protocol`), the transformers and vLLM
engines, and the choice between them (`RECAP_ENGINE`: `check_engine_choice` at start,
`load_engine` to build the one chosen).

Importing this package is cheap: torch, transformers and vLLM are imported when an engine
is built, so the pipeline and the CLI can name `CaptionEngine` without paying for them.
"""

from workers.engine.choice import EngineChoice, check_engine_choice, choose_engine, load_engine
from workers.engine.failures import is_oom
from workers.engine.protocol import CaptionEngine, EngineFatalError, FaultInjector
from workers.engine.transformers_engine import TransformersEngine
from workers.engine.vllm_engine import VllmEngine

__all__ = [
    "CaptionEngine",
    "EngineChoice",
    "EngineFatalError",
    "FaultInjector",
    "TransformersEngine",
    "VllmEngine",
    "check_engine_choice",
    "choose_engine",
    "is_oom",
    "load_engine",
]
