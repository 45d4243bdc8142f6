"""Corpora, tokenizers, token memmaps, lane schedules and the StreamDataModule."""
