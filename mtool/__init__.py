"""mtool: turn Hugging Face LLM checkpoints into verified release artifacts."""

__version__ = "0.1.0"
