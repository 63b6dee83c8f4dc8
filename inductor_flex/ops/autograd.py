"""Autograd rule for the forward operator (filled in by the operator work)."""
