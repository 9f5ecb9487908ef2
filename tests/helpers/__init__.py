"""Shared test helpers (synthetic checkpoints and LoRA files); see lora_formats.py."""
