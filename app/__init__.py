"""The HiPP-Prune REST API (FastAPI). Never imports torch or transformers."""
