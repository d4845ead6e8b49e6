"""Bi-temporal datasets returning aligned before/after tensors, a change mask and captions."""
