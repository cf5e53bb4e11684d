"""Bridges to other training stacks; each imports its library only when used.

* ``megatron.py``: ``parallel_state_from_megatron`` adopts the process groups of an initialised
  Megatron-Core ``parallel_state`` as a ``ParallelState``.
"""
