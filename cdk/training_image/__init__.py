"""The release pipeline's training container (Dockerfile and entry point)."""
