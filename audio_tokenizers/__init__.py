"""Acoustic codec, semantic tokenizer and MuLan (not `tokenizers/`: that would shadow
Hugging Face's `tokenizers`, which transformers imports)."""
