"""dalle-space: DALL·E mini / mega in JAX with parallel super-conditioning (see README.md)."""
