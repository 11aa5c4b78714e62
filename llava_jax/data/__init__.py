"""Data: LLaVA conversations, templates, tokenisation, images and input pipelines."""
