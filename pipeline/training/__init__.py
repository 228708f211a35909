"""Training and evaluation: degradations, the Ray Train loop, the one-GPU trainer, adaptation to an
archive, evaluation, and checkpoint tools."""
