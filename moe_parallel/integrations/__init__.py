"""Bridges to other training stacks; each imports its library only when used.

* ``megatron``: Megatron-Core trainers host the layer (``MoEMLP`` and a layer spec, the
  ``TransformerConfig`` translation, Megatron's losses, dist-checkpointing), and
  ``parallel_state_from_megatron`` adopts the process groups of an initialised Megatron-Core
  ``parallel_state`` as a ``ParallelState``.
* ``hf``: Hugging Face transformers MoE models in and out.
"""
