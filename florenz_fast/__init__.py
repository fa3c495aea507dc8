"""florenz-fast: a performance engine for Florenz-style encoder-decoder vision-language models."""

__version__ = "0.1.0"
