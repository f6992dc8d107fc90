"""Synthetic visual tasks with exact answers, for training tiny models and gating exports on accuracy.

Each task module is torch-free (numpy + Pillow) so that `mmexport verify --task NAME` can import it
on a runtime-only install. `shapes` is the first: coloured shapes, questions, short answers.
"""
