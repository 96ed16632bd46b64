"""usp-infer: LTX-style video generation sharded over GPUs with USP."""

__version__ = "0.1.0"
