"""Pair engines (multi-index hashing, FAISS) and compiled kernels."""
