"""Interoperability with other checkpoints: hf_gpt2 (Hugging Face GPT-2 safetensors import/export)."""
