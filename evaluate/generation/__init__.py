"""Sampling text from a checkpoint (`archbench generate`), batched without padding any state."""
