"""Data: tokenizers, the Qwen2.5-VL processor, test images (readers and pipelines land with the stages)."""
