"""deltaproxy: offset unlearning (δ-unlearning, arXiv 2404.11045) for black-box LLMs, as an OpenAI-compatible proxy."""

__version__ = "0.1.0"
