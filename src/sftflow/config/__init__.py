"""Typed run configuration: dataclasses and the YAML/CLI loader."""

from sftflow.config.args import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
from sftflow.config.parser import RunArgs, help_text, load_args

__all__ = [
    "DataArguments",
    "FinetuningArguments",
    "GeneratingArguments",
    "ModelArguments",
    "RunArgs",
    "help_text",
    "load_args",
]
