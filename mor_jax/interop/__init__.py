"""Moving weights between mor-jax and other formats (PyTorch reference, Hugging Face)."""
