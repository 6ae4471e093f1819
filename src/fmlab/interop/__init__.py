"""Hugging Face interop: one module per family (`hf_gpt2`, `hf_bert`, `hf_vit`) maps our state dicts and configs to
the `transformers` layout and back; `export` writes a checkpoint as a `from_pretrained` folder."""
