"""casa-lora core library: LoRA transfer to distilled video models (CASA, ProLoRA, direct)."""

__version__ = "0.1.0"
