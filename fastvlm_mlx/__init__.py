"""FastVLM on MLX."""
