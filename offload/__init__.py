"""Placement and streaming of layer weights across disk -> host RAM -> device.

placement.py decides, from byte counts and budgets, where each decoder layer lives;
streaming.py serves layers that live on disk through reusable host buffers, reading the
next layer on a thread while the current one computes; device_stream.py copies layers kept
in pinned host RAM (or read from disk) into reusable GPU buffers on a second CUDA stream
while the current one computes. None knows weight formats or the model: engine/ describes
layers as tensors and byte ranges, and builds its typed weights from the arrays streamed
back.
"""
