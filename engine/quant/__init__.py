"""Quantizers: turn float weights into the compact typed weights the backends run."""
