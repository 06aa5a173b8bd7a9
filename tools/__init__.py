"""Operator commands behind the one console script, ``sketchstream <command>``."""
