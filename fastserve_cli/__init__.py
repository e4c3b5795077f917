"""fastserve: raw text to a served causal LM, one pipeline stage per command."""

__version__ = "0.1.0"
