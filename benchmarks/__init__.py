"""moe_parallel benchmarks: ``python -m benchmarks <name>``.

Every benchmark process (the main one and the ranks it spawns, which import this package)
keeps freed host memory for reuse, as ``moe_parallel.train`` does on CPU
(``moe_parallel.cpu_memory``); ``MOE_PARALLEL_HEAP_REUSE=0`` turns that off for comparison.
Results record which way it ran (``machine.heap_reuse``).
"""

from moe_parallel.cpu_memory import reuse_freed_memory

reuse_freed_memory()
