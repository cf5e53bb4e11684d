#!/usr/bin/env bash
# The image's default CXX (a wrapper linking its own libstdc++ statically) makes C++ exceptions
# crash inside the extension, so the system compiler is forced.
# One lent-GPU session: build the extension there, run the CUDA tests, memcheck the kernel tests,
# time the ops, the grouped GEMM backends and the layer. Writes logs and JSON under $OUT
# (default ./device_out). The device has no PyPI: run `make cutlass-headers` here first and pass
# build/cutlass_include in the device call's carry, or the 'cutlass' backend is left out.
# SKIP_TESTS=1 skips the tests and memcheck, SKIP_MEMCHECK=1 the memcheck, SKIP_BENCH=1 the
# benchmarks (a 10-minute device call fits the build+tests or the benchmarks, not both).
# The built extension is copied to $OUT/so/; SKIP_BUILD=1 uses a carried moe_parallel/_C*.so.
# MEGABLOCKS=1 also builds MegaBlocks from the sdists and wheels carried in build/megablocks
# (`make megablocks-carry` here; benchmarks/megablocks_install.sh there, ~3-5 min, kept in
# build/megablocks/site while the machine stays warm) and times it against the layer on both
# shapes, after the tests and before the benchmarks: SKIP_BUILD=1 (or a built extension)
# SKIP_TESTS=1 SKIP_BENCH=1 MEGABLOCKS=1 for a call of its own.
# PACK=file.tgz packs everything written under $OUT into that one file on exit (the device tool
# returns at most 8 files): OUT=/tmp/ds PACK=$OUT_OF_THE_TOOL/device_session.tgz bash ...
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
[ -n "${PACK:-}" ] && trap 'tar czf "$PACK" -C "$OUT" .' EXIT
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/device.txt"
t0=$(date +%s)
[ -f build/cutlass_include/cutlass/cutlass.h ] && export MOE_PARALLEL_CUTLASS_INCLUDE=$PWD/build/cutlass_include
if [ -z "${SKIP_BUILD:-}" ]; then
  CXX=/usr/bin/g++ CC=/usr/bin/gcc TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=16 $PY setup.py -q build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
  mkdir -p "$OUT/so" && cp moe_parallel/_C*.so "$OUT/so/"
fi
if [ -z "${SKIP_TESTS:-}" ]; then
  $PY -m pytest -q -p no:cacheprovider tests/test_cuda_layer.py tests/ops/test_cuda_ops.py \
    tests/ops/test_cuda_grouped_gemm.py tests/test_cuda_graphs.py \
    2>&1 | tee "$OUT/cuda_tests.log" | tail -15
  if [ -z "${SKIP_MEMCHECK:-}" ]; then
    MOE_PARALLEL_UNDER_SANITIZER=1 timeout ${MEMCHECK_TIMEOUT:-240} compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -x -p no:cacheprovider \
      tests/ops/test_cuda_ops.py tests/ops/test_cuda_grouped_gemm.py \
      -k "${MEMCHECK_K:-(bfloat16 or hopper) and not large and not bad_input}" > "$OUT/memcheck.log" 2>&1
    echo "memcheck rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/memcheck.log" | tail -2 | tr '\n' ' ')"
  fi
fi
if [ -n "${MEGABLOCKS:-}" ]; then
  t1=$(date +%s)
  if PY=$PY bash benchmarks/megablocks_install.sh > "$OUT/megablocks_install.log" 2>&1; then
    grep "^megablocks_install" "$OUT/megablocks_install.log"
    echo "megablocks install: $(( $(date +%s) - t1 )) s"
    for shape in "4096 14336 8 2 mixtral" "2048 1408 64 6 finegrained"; do
      set -- $shape
      PYTHONPATH=$PWD/build/megablocks/site${PYTHONPATH:+:$PYTHONPATH} $PY -m benchmarks.layer_bench \
        --device cuda --dtype bfloat16 --tokens 16384 --hidden $1 --ffn $2 --experts $3 --top-k $4 \
        --repeats 10 --contenders grouped hf_loop megablocks \
        --out "$OUT/layer_${5}_megablocks_bf16.json" > "$OUT/layer_${5}_megablocks_bf16.txt" 2>&1
      echo "megablocks $5 rc=$?"; grep -E "relative error" "$OUT/layer_${5}_megablocks_bf16.txt" | head -1
      grep -A6 "^contender" "$OUT/layer_${5}_megablocks_bf16.txt" || tail -20 "$OUT/layer_${5}_megablocks_bf16.txt"
    done
  else
    tail -40 "$OUT/megablocks_install.log"; echo "megablocks install FAILED"
  fi
fi
[ -z "${SKIP_BENCH:-}" ] || exit 0
# The cluster benchmark's single-GPU baseline (world 1, NCCL: the layer at ep 1; one GPU cannot
# host two NCCL ranks), with the main job's MFU.
$PY -m benchmarks cluster --nproc 1 --dtype bfloat16 --layer-tokens 16384 --layer-hidden 4096 \
  --layer-ffn 14336 --rounds 7 --train-model --out "$OUT/cluster_world1_bf16.json" \
  > "$OUT/cluster_world1_bf16.txt" 2>&1; tail -20 "$OUT/cluster_world1_bf16.txt"
$PY -m benchmarks cuda_graph --out "$OUT/cuda_graph_bf16.json" 2>&1 | tee "$OUT/cuda_graph.txt" | tail -6
$PY benchmarks/cuda_ops_bench.py --out "$OUT/cuda_ops.json" 2>&1 | tee "$OUT/cuda_ops.txt" | tail -20
$PY benchmarks/grouped_gemm_bench.py --out "$OUT/grouped_gemm.json" 2>&1 | tee "$OUT/grouped_gemm.txt" | tail -24
$PY -m benchmarks.layer_bench --device cuda --dtype bfloat16 --tokens 16384 --hidden 4096 \
  --ffn 14336 --experts 8 --top-k 2 --repeats 10 --out "$OUT/layer_mixtral_bf16.json" 2>&1 | tail -6
$PY -m benchmarks.layer_bench --device cuda --dtype bfloat16 --tokens 16384 --hidden 2048 \
  --ffn 1408 --experts 64 --top-k 6 --repeats 10 --out "$OUT/layer_finegrained_bf16.json" 2>&1 | tail -6
# Every grouped GEMM backend in the layer, and a profile of the default's step.
for shape in "4096 14336 8 2 mixtral" "2048 1408 64 6 finegrained"; do
  set -- $shape
  $PY -m benchmarks.layer_bench --device cuda --dtype bfloat16 --tokens 16384 --hidden $1 \
    --ffn $2 --experts $3 --top-k $4 --repeats 10 --no-memory --profile \
    --contenders grouped grouped_streams grouped_cublas grouped_torch grouped_cutlass \
    --out "$OUT/layer_${5}_backends_bf16.json" > "$OUT/layer_${5}_backends_bf16.txt" 2>&1
  grep -A9 "^contender" "$OUT/layer_${5}_backends_bf16.txt"; grep "GPU busy" "$OUT/layer_${5}_backends_bf16.txt"
done
