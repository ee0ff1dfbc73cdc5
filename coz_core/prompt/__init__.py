"""Prompt sources behind the PromptSource protocol (see base.py)."""
