"""Cluster scaling over EP sizes: all-to-all bandwidth, dispatch overhead and the MoE layer's step
time, under any launcher, with a fitted all-to-all cost model.

Running. Under torchrun (one or several nodes), srun or mpirun every process calls
``benchmarks.cluster.rank.rank_main``, which joins the job through
``moe_parallel.distributed.init_distributed()``
(NCCL with GPUs, gloo on CPU). Run bare (no RANK/WORLD_SIZE, OMPI_*, PMI_* or SLURM_PROCID in the
environment) it spawns ``--nproc`` (4) local processes itself, each with RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT set, which run the same
``rank_main`` over gloo; ``--nproc 1`` runs in this process (world 1: the layer at ep 1
only, no all-to-all). Torch threads per rank: 1 on CPU unless ``--threads``.

    python -m benchmarks cluster --nproc 4                      # this machine, 4 gloo ranks
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m benchmarks cluster                                   # 2 nodes x 8 GPUs
    sbatch launch/slurm_bench.sbatch                            # the same under srun

EP sizes: ``--ep-sizes``, else every power of 2 from 2 up to the world that divides it; each
is ``ParallelState.build(ep=ep)``: EP groups of ``ep`` consecutive ranks, the rest EDP/DP (all
groups run at once, as in training). Ranks per node ``G``: ``--ranks-per-node``, else the ranks
sharing a node, a node being a distinct (hostname, launcher node index: torchrun's GROUP_RANK,
SLURM_NODEID) pair; ``nodes = world / G``.

What is measured (each part on every EP size; the variants of one table interleaved round by
round; a figure is the slowest rank's: per round every rank runs ``iters`` calls after a
barrier, ``t_round = max_ranks(elapsed) / iters``; reported: the median over ``--rounds`` rounds,
with min, max and the inter-quartile range over the rounds):

* ``sweep``: one ``dist.all_to_all_single`` over the EP group with even splits, per send-buffer
  size ``S`` in ``--sweep-bytes`` (default 4 KiB .. 32 MiB on CPU, .. 256 MiB on CUDA) plus the
  dispatch's balanced volume ``T·k·H·b``, below 1 MiB with more calls per round
  (:func:`.sweep.sweep_iters`, up to 10 x ``--iters``); these points fit the cost model (below).
* ``dispatch``: ``build_dispatcher(E, ps, kind)`` per kind in ``--dispatchers`` (default: every
  all-to-all-like kind of ``moe_parallel.dispatch.DISPATCHERS``, the hierarchical
  ``"alltoall_hierarchical"`` included once it is there; it gets
  ``ParallelState.build(ep=ep, ranks_per_node=G)``, and is reported "not available" while
  either is missing), identity experts: ``combine(dispatch(x, routing))`` forward (autograd
  recording) and forward+backward (``y.backward(g)``), ``T = --tokens`` per rank, top-``k``
  over ``E`` experts, against the raw ``all_to_all_single`` calls moving the same bytes with
  the same splits (counts, rows there and back; forward+backward adds the two backward row
  exchanges). ``ratio = ours / raw``. Routings (built as ``Routing`` objects, no router):
  ``balanced`` (token ``t`` takes experts ``(t·k + j) mod E``: every rank sends the same rows to
  each expert), ``zipf`` (popularity of the expert of popularity rank ``i`` ∝ ``1/(i+1)^s``,
  ``s = --zipf-s``, ranks a fixed permutation of the experts, top-k sampled without
  replacement, seed ``--seed`` + rank), ``single_hot`` (every token's first choice is expert 0,
  the others round-robin over the rest: worst case, EP rank 0 receives ``T`` rows from
  everyone).
* ``layer``: ``MoELayer(MoEConfig(--layer-hidden, --layer-ffn, E, k), parallel_state=ps)``
  forward + backward of ``y.sum()`` (its own router; no gradient all-reduce), ep = 1 (every
  expert local, no exchange) and every EP size. Weak scaling: ``--layer-tokens`` per rank,
  efficiency ``t_1 / t_ep``; strong scaling: ``--global-tokens`` per EP group split over its
  ``ep`` ranks, efficiency ``t_1 / (ep · t_ep)``. tokens/s per rank = tokens per rank / step.
* ``overlap``: the same layer with one shared expert (its width ``--layer-ffn``), weak scaling,
  at ep = 1 and every EP size, in the variants of :data:`.layer.OVERLAP_VARIANTS`: none,
  ``shared_expert_overlap`` (shared experts while the dispatch exchange is in flight),
  ``overlap_chunks`` 2 and 4 (routed tokens pipelined in chunks), both; step time and its ratio
  to ``none`` at the same EP size (below 1: the overlap pays), printed beside the chunked
  model's prediction.
* ``train`` (``--train-model``): ``moe_parallel.train``'s model (``build_model``, its flags via
  ``--train-args``) at the largest EP size, one ``train_step`` (forward, backward, gradient
  sync, clip, AdamW) per call: tokens/s per rank and model FLOPs utilisation
  ``MFU = tokens/s per rank · F / peak``, ``F = 6·N_active + 12·L·H·S`` FLOPs per token
  (:func:`.train.model_flops_per_token`, PaLM's count), the peak from ``--peak-tflops``,
  else :data:`.train.PEAK_TFLOPS` by GPU name (bf16 dense); on CPU MFU is null with the reason.

Bandwidth, in nccl-tests' conventions for all-to-all: ``S`` = one rank's send buffer (its own
chunk included, as nccl-tests' ``size``), ``algbw = S / t``, ``busbw = algbw · (n - 1)/n`` (n =
EP group size), GB/s = 1e9 B/s. With uneven routing ``S`` is the mean over the ranks (the total
moved / world) and ``t`` the slowest rank's; a dispatch forward moves ``2·S`` (there and back),
forward+backward ``4·S`` (the counts exchange is not counted). ``busbw`` is then the
off-rank bytes per rank per second for even splits; ``offrank_bytes`` is recorded apart.

Cost model (``benchmarks.cost_model``): :func:`~benchmarks.cost_model.fit_alltoall` fits
``t = call + latency·(ep - 1) + V_intra/B_intra + V_inter/B_inter`` to the sweep (volumes per
rank from the real layout), and the report prints the fitted values, each fitted point with
the model's prediction and error, the flat and hierarchical
(:func:`~benchmarks.cost_model.all_to_all_hierarchical_seconds`) predictions up to
``--predict-ep-max`` (256) at the dispatch volume with the fitted G (inter-node bandwidth: the
fitted one, else ``--predict-inter-gbps``, else the intra-node one, flagged ASSUMED), and
where each wins; and the chunked-overlap estimate
(:func:`~benchmarks.cost_model.pipelined_step_seconds`) for the largest EP size's layer
step, exposed communication taken as ``t_ep - t_1`` (weak scaling).

Output (rank 0): the tables on stdout, JSON via ``benchmarks.record.save_result`` (default
``benchmarks/results/cluster_<backend>_<date>.json``, ``--out``) holding the config, topology
(nodes, ranks per node, hostnames, backend, NCCL/gloo and torch versions, every rank's device,
and ``benchmarks.machine.machine_info()`` of local rank 0 of every node: ``node_machines``;
``machine`` is rank 0's), every part's rows, the fit and the predictions; a PNG beside it
(``--plot``; skipped with a message without matplotlib).

Modules, one idea each: :mod:`.cli` (options, the plan for a world size), :mod:`.routings`
(the synthetic routings), :mod:`.topology` (nodes, ranks per node, per-rank volumes),
:mod:`.sweep`, :mod:`.dispatch`, :mod:`.layer` (layer scaling and overlap), :mod:`.train`
(MFU), :mod:`.rank` (one rank: every part in turn), :mod:`.report` (fit, predictions and the
tables), :mod:`.plot` (the PNG), :mod:`.main` (``python -m benchmarks cluster``: launcher or
self-spawn). Timing and spawning: ``benchmarks.harness``.
"""
