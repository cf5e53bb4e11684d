"""The main job: train a small decoder-only MoE transformer language model on generated data or
on a file of token ids.

Data (``data``, the default): a random Markov source over ``vocab`` tokens: each token has a
fixed table of 4 successors drawn with probabilities (0.55, 0.25, 0.15, 0.05). Its conditional
entropy (the lowest reachable cross-entropy) is printed beside the loss. With ``--data PATH``
(``token_file``): a flat file of uint16/uint32 token ids (``--data-dtype``; nanoGPT's
``train.bin``), memory-mapped; each global batch is ``--batch-size · dp`` windows of
``--seq-len + 1`` tokens in a seeded per-epoch order, each data-parallel rank reading only its
own; the samples consumed are the checkpoint's data position; the file's unigram entropy is
printed beside the loss. ``--vocab`` must exceed every id in the file (checked when it opens).

Every FFN is an ``MoELayer`` (``model``); the layers' aux losses reach the router through the
output's autograd graph (``set_aux_loss_scale``).

Parallel layout (under torchrun / mpirun / srun; ``dp`` is derived): experts over EP (and ETP);
the dense part is replicated and data-parallel. With ``--tp`` > 1 each TP rank of a data shard
sees the same batch and hands the MoE layers its 1/tp slice of the sequence (sequence
parallelism), gathering their outputs back; its loss is then the shard's loss / tp and the
replicated parameters' gradients are summed over TP (``distributed.sync_gradients``).

With ``--expert-bias`` every layer balances its load without an aux loss (DeepSeek-V3): after
each optimizer step ``distributed.update_expert_biases`` sums the routed counts of all ranks and
nudges each layer's selection bias toward balance.

With ``--shard experts`` the model is sharded with FSDP2 over the data-parallel replicas
(``distributed.shard_model``: each layer's routed experts over EDP, the blocks and the rest over
DP), weights, gradients and optimizer state alike; with ``--shard optimizer`` only the AdamW
state is (``distributed.ShardedOptimizer``). Either trains as ``--shard none`` does.

With ``--tensorboard DIR`` / ``--metrics-jsonl FILE`` (/ ``--wandb-project``) every
``--log-every`` step writes each MoE layer's router metrics, summed over the ranks by one
collective, on rank 0 (``moe_parallel.observe``).

With ``--deepspeed CONFIG.json`` the model trains under the DeepSpeed engine
(``integrations.deepspeed``: ZeRO 0/1/2, expert gradients reduced over EDP, clipping by the
global norm); ``--local_rank``, which the ``deepspeed`` launcher passes, is accepted (the rank
comes from the environment). The config's ``optimizer``/``scheduler`` sections, when present,
replace the AdamW and the warm-up/cosine schedule; ``gradient_clipping`` and
``train_micro_batch_size_per_gpu`` default to ``--clip`` and ``--batch-size``.

Modules: ``args`` (the flags, by group, and their checks, all applied before any process group
or model exists), ``data``, ``token_file``, ``model``, ``step`` (one optimizer step, the
schedule, DeepSpeed), ``progress`` (live bar on a terminal, plain lines in logs; the log lines),
``job`` (``main``: the stages).

    python -m moe_parallel.train --steps 150 --experts 8 --top-k 2 --capacity-factor 1.25
    torchrun --nproc-per-node 4 -m moe_parallel.train --ep 2 --tp 2
    launch/deepspeed.sh 4 ds_config.json --ep 2
"""

from .args import _parse as _parse  # the parser and parse + check, for tests and benchmarks
from .args import _parser as _parser
from .args import check_flags, check_world
from .data import SUCCESSOR_PROBS, MarkovSource, local_batch
from .job import main
from .merge import average_models, merge_dense_models, router_parameters
from .model import (
    Block,
    HFCausalLM,
    MoETransformerLM,
    build_config,
    build_model,
    shard_for_memory,
)
from .step import (
    backward_step,
    build_optimizer,
    deepspeed_engine,
    engine_train_step,
    lm_loss,
    lr_lambda,
    optimizer_step,
    train_step,
)
from .token_file import DATA_DTYPES, TokenFile, token_count

__all__ = [
    "DATA_DTYPES",
    "SUCCESSOR_PROBS",
    "Block",
    "HFCausalLM",
    "MarkovSource",
    "MoETransformerLM",
    "TokenFile",
    "average_models",
    "backward_step",
    "build_config",
    "build_model",
    "build_optimizer",
    "check_flags",
    "check_world",
    "deepspeed_engine",
    "engine_train_step",
    "lm_loss",
    "local_batch",
    "lr_lambda",
    "main",
    "merge_dense_models",
    "optimizer_step",
    "router_parameters",
    "shard_for_memory",
    "token_count",
    "train_step",
]
