"""Gandalf: a fast, lean LLM gateway."""

__version__ = "0.1.0"
