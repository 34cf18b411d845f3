"""Placement and streaming of layer weights across disk, host and device (a later issue)."""
