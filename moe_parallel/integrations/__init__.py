"""Bridges to other training stacks; each imports its library only when used.

* ``megatron``: Megatron-Core trainers host the layer (``MoEMLP`` and a layer spec, the
  ``TransformerConfig`` translation, Megatron's losses, dist-checkpointing), and
  ``parallel_state_from_megatron`` adopts the process groups of an initialised Megatron-Core
  ``parallel_state`` as a ``ParallelState``.
* ``hf``: Hugging Face transformers MoE models in and out.
* ``deepspeed``: the DeepSpeed engine hosts the layers (ZeRO 0/1/2: expert parameters tagged
  ``allreduce=False`` / ``group_name`` and reduced over EDP, MoE optimizer param groups, the
  global-norm clipping).
"""
