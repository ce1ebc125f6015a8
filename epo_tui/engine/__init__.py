"""Everything that touches JAX, model weights or sae-lens. Never imports the UI."""
