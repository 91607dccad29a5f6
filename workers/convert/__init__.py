"""`recap convert`: checkpoints in other formats into folders recap's engines load.

`convert_llava`: the original LLaVA repository's format (the paper's own captioner,
`tennant/llava-llama-3-8b-hqedit`) into transformers' `LlavaForConditionalGeneration` in the
hub's key layout, which the transformers and vLLM engines both load.

Importing this package is cheap: torch and transformers are imported when a conversion
runs past its checks of the configs, so a refusal answers at once.
"""

from workers.convert.llava import Converted, convert_llava

__all__ = ["Converted", "convert_llava"]
