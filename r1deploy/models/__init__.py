"""Model definitions (pure math, HF parameter names) and the loader that builds them."""
