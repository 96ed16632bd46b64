"""The errors the CLI turns into one line each: what a user got wrong (exit 2) and the failures it can explain."""

from __future__ import annotations


class UsageError(Exception):
    """A bad flag or input: exit code 2, nothing written."""


class DecodeError(RuntimeError):
    """The VAE decode failed after a finished denoising loop; `latents` (what it was decoding) are kept."""

    def __init__(self, message: str, result):  # result: the family pipeline's Result, latents included
        super().__init__(message)
        self.result = result


def one_line(message: object) -> str:
    """Library messages can span lines (PyAV, safetensors); the CLI promises one line per error."""
    return "; ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())
