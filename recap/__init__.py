"""recap: re-caption web-scale image datasets with LLaMA-3 vision-language models."""

__version__ = "0.1.0"
