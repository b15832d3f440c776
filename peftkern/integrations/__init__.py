"""Wiring peftkern into Hugging Face transformers / peft models."""
