"""Layers built from specs: the block, the recurrent cell, feedback, kNN memory."""
