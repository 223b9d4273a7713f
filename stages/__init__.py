"""The three MusicLM stages: one transformer, three sequence layouts, one training loop."""
