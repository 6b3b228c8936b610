"""Keeping transformers quiet: its own progress bars and advice would break the one-line
error contract on stderr (the environment variables set by the CLI act only if they are set
before transformers is first imported)."""

from __future__ import annotations


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
