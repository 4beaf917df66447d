"""Plumbing every command shares: one-line errors, command lines, tiny local models, decoding."""
