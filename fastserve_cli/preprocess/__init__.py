"""`fastserve preprocess`: raw text to a tokenizer and a tokenized, packed dataset."""

from fastserve_cli.preprocess.stage import run_preprocess

__all__ = ["run_preprocess"]
