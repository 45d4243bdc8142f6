"""lrexp: long-sequence ablations with PyTorch Lightning."""
