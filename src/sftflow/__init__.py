"""sftflow: supervised fine-tuning of LLMs in one command."""

__version__ = "0.1.0"
