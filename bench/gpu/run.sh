#!/usr/bin/env bash
# One GPU-machine pass: install carried wheels, run tests/gpu, then the benchmarks asked for.
# Usage (repo root, on the device): bash bench/gpu/run.sh STAGE...
#   stages: tests kernels kernels-graph attention-new-token moe-kernels quant-moe executor-cost
#   lora quant-kernels l2-prefetch int4-planes quant-decode1 quant-throughput decode1 pdl-decode1
#   switch-decode1 switch-prefill switch-batch switch-throughput ab-decode1 ab-throughput
#   small throughput
#   profile profile-kernels profile-gguf profile-planes profile-steps profile-cpu-ops profile-host imports
#   coldstart serve-sweep structured fleet reliability (.bench-tok: a tokenizer dir).
# Results go to $OUT (or /tmp/out); the tests stage runs TESTS (default tests/gpu) and stops
# after TESTS_TIMEOUT seconds (default 360). The carried .whl/ comes from
# ../shared/tools/device-wheels.sh (with compressed-tensors for its GPU checkpoints), and Ray (for tests/gpu/test_ray_executor_gpu.py) from
# bench/gpu/pack_ray.sh.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
  # Ray, cut to fit the carry (bench/gpu/pack_ray.sh): the Ray executor's GPU test needs it
  [ -f .whl/ray-slim.tar.xz ] && tar -C /tmp/site -xJf .whl/ray-slim.tar.xz
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1 PAGODA_LOG_LEVEL=INFO
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# the device copy's git history stays at the session's first commit: the code's fingerprint
# (bench/gpu/tree_id.sh COMMIT gives a commit's, to match) says what ran
echo "tree $(bash bench/gpu/tree_id.sh 2>/dev/null)" | tee -a "$OUT/gpu.txt"
B8=bench/configs/llama-3.1-8b
B1=bench/configs/llama-3.2-1b
B3=bench/configs/llama-3.2-3b
M30=bench/configs/qwen3-30b-a3b
MODEL=${MODEL:-$B8}  # the decode1 and throughput stages' model (bench/configs/...)
SHAPE="--dtype bfloat16 --max-model-len 4096"
COMMON="--load-format dummy $SHAPE"
GGUF8=/tmp/b8-q4_k_m.gguf
GGUF1=/tmp/b1-q4_k_m.gguf
GGUF8_Q8=/tmp/b8-q8_0.gguf

# config $1 as a GGUF of random blocks of mix $4 (default q4_k_m) at $2 and its word
# tokenizer in $3, made once
make_gguf() {
  [ -f $2 ] || { python3 -m pagoda.bench.dummy_gguf $1 $2.part --mix ${4:-q4_k_m} \
                   && mv $2.part $2; }
  [ -f $3/tokenizer.json ] || python3 -m pagoda.bench.word_tokenizer $1 $3 > /dev/null
}

# the 8B as a GGUF of random Q4_K_M blocks (about 4.6 GiB), its head untied
make_gguf8() { make_gguf $B8 $GGUF8 /tmp/b8w; }

# the 8B's --model and load flags for a quantized variant (issue 18's benchmarks; moe-*: the
# dummy Qwen3-30B-A3B in bf16, FP8 at load, AWQ); gguf reads
# its weights from the file (not --load-format dummy) and keeps its blocks quantized
# (gguf-dequantized: --quantization none, decoded to bf16 at load)
quant_model() {
  case "$1" in
    bf16) echo "--model $B8 $COMMON" ;;
    fp8) echo "--model $B8 --quantization fp8 $COMMON" ;;
    fp8kv) echo "--model $B8 --quantization fp8 --kv-cache-dtype fp8 $COMMON" ;;
    moe-bf16) echo "--model $M30 $COMMON" ;;
    moe-fp8) echo "--model $M30 --quantization fp8 $COMMON" ;;
    moe-awq) echo "--model $M30-awq $COMMON" ;;
    awq|awq-zp) echo "--model $B8-awq $COMMON" ;;
    gguf) make_gguf8 >&2
          echo "--model $GGUF8 --tokenizer /tmp/b8w --load-format gguf --quantization gguf $SHAPE" ;;
    gguf-dequantized) make_gguf8 >&2
          echo "--model $GGUF8 --tokenizer /tmp/b8w --load-format gguf --quantization none $SHAPE" ;;
    # the 8B as a GGUF of random Q8_0 blocks (about 8 GiB; its lows -128 times the scale:
    # PAGODA_CENTRED_CODES=0 holds them as mins)
    gguf-q8_0) make_gguf $B8 $GGUF8_Q8 /tmp/b8w q8_0 >&2
               echo "--model $GGUF8_Q8 --tokenizer /tmp/b8w --load-format gguf --quantization gguf $SHAPE" ;;
    # Llama 3.2 1B as a random Q4_K_M GGUF: its LM head tied to a Q6_K table
    gguf1b) make_gguf $B1 $GGUF1 /tmp/b1w >&2
            echo "--model $GGUF1 --tokenizer /tmp/b1w --load-format gguf --quantization gguf $SHAPE" ;;
  esac
}

# decode-1 of the 8B as quantized variant $1 (quant_model; awq-zp: zero points in planes),
# its JSON at $OUT/decode1-$2.json, its single-stream line labelled $3
quant_decode1() {
  local zero_points=${PAGODA_PLANE_ZERO_POINTS:-0}
  [ $1 = awq-zp ] && zero_points=1
  PAGODA_PLANE_ZERO_POINTS=$zero_points python3 -m pagoda.cli.main bench throughput \
    $(quant_model $1) --num-prompts 1 --input-len 1024 --output-len 256 \
    --output-json "$OUT/decode1-$2.json" 2>&1 \
    | grep "single stream" | sed "s/^/$3: /"
}

# `bench throughput` of the 8B as quantized variant $1 with the flags after $3, its JSON at
# $OUT/$2.json, its elapsed time and token rates printed labelled $3
quant_elapsed() {
  local variant=$1 name=$2 label=$3
  shift 3
  python3 -m pagoda.cli.main bench throughput $(quant_model $variant) "$@" \
    --output-json "$OUT/$name.json" > /dev/null 2>&1
  python3 -c "import json, sys; s = json.load(open(sys.argv[1]))['systems']['pagoda']; \
print(sys.argv[2] + ': %.3f s, %.1f output tok/s, %d tok/s in all' \
      % (s['elapsed_s'], s['output_tokens_per_s'], s['total_tokens_per_s']))" \
    "$OUT/$name.json" "$label"
}

# prefill of 64 prompts of 1024 tokens (one output token each) of the 8B as quantized variant
# $1, its JSON at $OUT/prefill-$2.json, labelled $3
quant_prefill() {
  quant_elapsed $1 prefill-$2 "$3" --num-prompts 64 --input-len 1024 --output-len 1
}

# BATCH (default 48) prompts of 1024 tokens decoded together for 512 tokens by the 8B as
# quantized variant $1, its JSON at $OUT/batch-$2.json, labelled $3
quant_batch() {
  local batch=${BATCH:-48}
  quant_elapsed $1 batch-$2 "$3" --num-prompts $batch --input-len 1024 --output-len 512 \
    --max-num-seqs $batch
}

# issue 18's throughput workload (THROUGHPUT_PROMPTS, default 1000, of 1,024 -> 512) of the
# 8B as quantized variant $1, its JSON at $OUT/$2.json, labelled $3
throughput_of() {
  quant_elapsed $1 $2 "$3" --num-prompts ${THROUGHPUT_PROMPTS:-1000} --input-len 1024 \
    --output-len 512 --max-num-seqs 256 --max-num-batched-tokens 8192
}

# MEASURE (quant_decode1 or throughput_of) of each of the variants $1 in this tree and in
# .base/ (bench/gpu/pack_base.sh), alternated twice, labelled $2VARIANT[-base]-runN
against_base() {
  local variants=$1 prefix=$2 measure=$3
  [ -f .base/COMMIT ] || { echo "no .base/: run bench/gpu/pack_base.sh"; return 1; }
  [ -e .base/bench ] || ln -s ../bench .base/bench  # the configs
  echo "base: $(cat .base/COMMIT)"
  for run in 1 2; do for q in $variants; do
    for tree in . .base; do
      local label=$prefix$q$([ $tree = .base ] && echo -base)-run$run
      (cd $tree && PYTHONPATH=/tmp/site:. $measure $q $label $label)
    done
  done; done
}

# run "$@" with the environment variable SWITCH set to $VALUE ("default": unset)
with_switch() {
  if [ "$VALUE" = default ]; then (unset $SWITCH; "$@"); else (export $SWITCH=$VALUE; "$@"); fi
}

run_stage() {
  case "$1" in
    tests) timeout ${TESTS_TIMEOUT:-360} python3 -m pytest -q -rfE ${TESTS:-tests/gpu} 2>&1 \
             | tee -a "$OUT/gpu-tests.log" | tail -40 ;;
    # LoRA against the base model in one pass (issue 19's benchmark; LORA_PROMPTS of 1000)
    lora) timeout ${LORA_TIMEOUT:-420} python3 -m pagoda.bench.lora --model $B8 --load-format dummy \
            --num-prompts ${LORA_PROMPTS:-1000} --input-len 1024 --output-len 512 --adapters 1 4 16 \
            --max-loras 16 --rank 16 --output-json "$OUT/lora-8b.json" 2>&1 | grep -v INFO | tail -30 ;;
    kernels) python3 bench/kernels/attention_bench.py 2>&1 | tail -30 ;;
    moe-kernels) python3 bench/kernels/moe_bench.py --output-json "$OUT/moe-kernels.json" 2>&1 | tail -16; \
               python3 bench/kernels/moe_bench.py --profile 1 2>&1 | tail -22 ;;
    # Qwen3-30B-A3B's MoE layer with its experts as codes against bf16, then decode-1 and
    # prefill (64 x 1,024 tokens) of the dummy model in bf16, FP8 (quantized at load; its
    # experts on FP8 tensor cores, then weight-only: PAGODA_MOE_FP8_FROM=off) and AWQ (dummy
    # 4-bit codes, groups of 128)
    quant-moe) python3 bench/kernels/moe_bench.py --codes float8 float8-tc int4-g128 int4-g32 \
                 int8-g32 --tokens 1 4 16 64 256 1024 4096 \
                 --output-json "$OUT/moe-kernels-codes.json" 2>&1 | tail -44
               for q in moe-bf16 moe-fp8 moe-awq; do
                 quant_decode1 $q qwen3-30b-$q $q
                 quant_prefill $q qwen3-30b-$q "$q prefill"
               done
               (export PAGODA_MOE_FP8_FROM=off
                quant_decode1 moe-fp8 qwen3-30b-moe-fp8-weight-only "moe-fp8 weight-only"
                quant_prefill moe-fp8 qwen3-30b-moe-fp8-weight-only "moe-fp8 weight-only prefill") ;;
    # a decode's RoPE and KV store in the attention kernel against their own launch (NewToken)
    attention-new-token) python3 bench/kernels/attention_bench.py --new-token --batches 1 16 64 256 \
                           --contexts 1024 4096 --output-json "$OUT/attention-new-token.json" \
                           2>&1 | tail -12 ;;
    kernels-graph) python3 bench/kernels/attention_bench.py --graph-sweep --sweep-top 8 \
                     2> "$OUT/kernels-graph.log" | tee "$OUT/kernels-graph.txt" ;;
    decode1) python3 -m pagoda.cli.main bench throughput --model $MODEL $COMMON --num-prompts 1 \
               --input-len 1024 --output-len 256 --output-json "$OUT/decode1.json" $EXTRA 2>&1 | grep -v INFO ;;
    # decode-1 of $MODEL with programmatic dependent launch on and off, alternated twice
    pdl-decode1) for run in 1 2; do for pdl in 1 0; do
                   PAGODA_PDL=$pdl python3 -m pagoda.cli.main bench throughput --model $MODEL $COMMON \
                     --num-prompts 1 --input-len 1024 --output-len 256 \
                     --output-json "$OUT/decode1-pdl$pdl-run$run.json" $EXTRA 2>&1 | grep "single stream" \
                     | sed "s/^/PAGODA_PDL=$pdl: /"
                 done; done ;;
    # decode-1 of each QUANT_VARIANTS (default bf16 awq fp8) in this tree and in the commit
    # bench/gpu/pack_base.sh put in .base/, alternated twice (the base's JSONs: *-base-*)
    ab-decode1) against_base "${QUANT_VARIANTS:-bf16 awq fp8}" "" quant_decode1 ;;
    # issue 18's throughput workload (THROUGHPUT_PROMPTS, default 1000, of 1,024 -> 512) of
    # QUANT_VARIANTS (default bf16), this tree and .base/ alternated twice
    ab-throughput) against_base "${QUANT_VARIANTS:-bf16}" throughput- throughput_of ;;
    # decode-1 of QUANT_VARIANTS (default awq fp8) with the environment variable SWITCH set
    # to each of SWITCH_VALUES, alternated twice (RUNS, default "1 2", names the rounds)
    # (e.g. SWITCH=PAGODA_PLANE_ZERO_POINTS SWITCH_VALUES="1 0")
    # ("default" in SWITCH_VALUES leaves it unset); switch-prefill the same for quant_prefill
    # (e.g. SWITCH=PAGODA_DECODE_FROM SWITCH_VALUES="default 0" QUANT_VARIANTS="gguf awq"),
    # switch-batch for quant_batch (e.g. SWITCH=PAGODA_FP8_GEMM SWITCH_VALUES="default cublas"
    # QUANT_VARIANTS=fp8 BATCH=48), switch-throughput for throughput_of (THROUGHPUT_PROMPTS)
    switch-decode1|switch-prefill|switch-batch|switch-throughput)
                    [ -n "${SWITCH:-}" ] && [ -n "${SWITCH_VALUES:-}" ] \
                      || { echo "$1: set SWITCH and SWITCH_VALUES"; return 1; }
                    local measure=quant_decode1
                    [ $1 = switch-prefill ] && measure=quant_prefill
                    [ $1 = switch-batch ] && measure=quant_batch
                    [ $1 = switch-throughput ] && measure=throughput_of
                    for run in ${RUNS:-1 2}; do for q in ${QUANT_VARIANTS:-awq fp8}; do
                      for VALUE in $SWITCH_VALUES; do
                        # (a comma in a file name keeps it from coming back from the device)
                        with_switch $measure $q $q-$SWITCH-${VALUE//,/-}-run$run "$q $SWITCH=$VALUE"
                      done
                    done; done ;;
    small) python3 -m pagoda.cli.main bench throughput --model $B1 $COMMON --num-prompts 256 \
               --input-len-range 100 1024 --output-len-range 100 1024 --max-num-seqs 256 \
               --max-num-batched-tokens 8192 --gpu-busy --output-json "$OUT/small.json" $EXTRA 2>&1 | grep -v INFO ;;
    throughput) python3 -m pagoda.cli.main bench throughput --model $MODEL $COMMON --num-prompts 1000 \
               --input-len 1024 --output-len 512 --max-num-seqs 256 --max-num-batched-tokens 8192 \
               --compare hf --hf-num-prompts ${HF_PROMPTS:-64} --output-json "$OUT/throughput.json" $EXTRA 2>&1 | grep -v INFO ;;
    throughput-only) python3 -m pagoda.cli.main bench throughput --model $MODEL $COMMON --num-prompts 1000 \
               --input-len 1024 --output-len 512 --max-num-seqs 256 --max-num-batched-tokens 8192 \
               --output-json "$OUT/throughput.json" $EXTRA 2>&1 | grep -v INFO ;;
    # the multi-process executor with one rank against the in-process one, alternated
    executor-cost) for backend in uni mp; do
                     python3 -m pagoda.cli.main bench throughput --model $B8 $COMMON --num-prompts 1 \
                       --input-len 1024 --output-len 256 --distributed-executor-backend $backend \
                       --output-json "$OUT/decode1-$backend.json" 2>&1 | grep -v INFO
                     python3 -m pagoda.cli.main bench throughput --model $B8 $COMMON --num-prompts 1000 \
                       --input-len 1024 --output-len 512 --max-num-seqs 256 --max-num-batched-tokens 8192 \
                       --distributed-executor-backend $backend --output-json "$OUT/throughput-$backend.json" 2>&1 | grep -v INFO
                   done ;;
    # issue 18: the quantized kernels at the 8B's layer shapes, then decode-1 and throughput
    # of the dummy 8B in bf16, FP8 (quantized at load) and AWQ (4-bit, groups of 128)
    quant-kernels) python3 bench/kernels/quant_bench.py --output-json "$OUT/quant-kernels.json" \
                     ${QUANT_TOKENS:+--tokens $QUANT_TOKENS} 2>&1 | tail -80 ;;
    # one-token products with their weights cold, hot, and asked of L2 during the kernel before
    l2-prefetch) python3 bench/kernels/l2_prefetch_bench.py --output-json "$OUT/l2-prefetch.json" \
                   2>&1 | tail -16 ;;
    # 4-bit codes in planes against the same codes in halves (bench/kernels/int4_planes.py)
    # PLANES_SWEEP=1: also the few-token tile candidates (PLANES_FEW), both ways
    int4-planes) python3 bench/kernels/int4_planes.py --output-json "$OUT/int4-planes.json" \
                   ${QUANT_TOKENS:+--tokens $QUANT_TOKENS} ${PLANES_SWEEP:+--sweep-few} 2>&1 \
                   | tail -120 ;;
    # QUANT_VARIANTS (default bf16 fp8 awq; fp8kv: FP8 weights and a float8 KV cache; gguf:
    # the random Q4_K_M GGUF, written to $GGUF8 on first use; gguf-dequantized: the same
    # decoded to bf16 at load; gguf-q8_0: the 8B as random Q8_0 blocks; awq-zp: AWQ with its
    # zero points held as such in planes, PAGODA_PLANE_ZERO_POINTS=1); quant-throughput's
    # prompts THROUGHPUT_PROMPTS (1000)
    quant-decode1) for q in ${QUANT_VARIANTS:-bf16 fp8 awq}; do
                     PAGODA_PLANE_ZERO_POINTS=$([ $q = awq-zp ] && echo 1 || echo 0) \
                     python3 -m pagoda.cli.main bench throughput $(quant_model $q) \
                       --num-prompts 1 --input-len 1024 --output-len 256 \
                       --output-json "$OUT/decode1-$q.json" 2>&1 | grep -v INFO | tail -4
                   done ;;
    quant-throughput) for q in ${QUANT_VARIANTS:-bf16 fp8 fp8kv}; do
                        python3 -m pagoda.cli.main bench throughput $(quant_model $q) \
                          --num-prompts ${THROUGHPUT_PROMPTS:-1000} --input-len 1024 --output-len 512 --max-num-seqs 256 \
                          --max-num-batched-tokens 8192 --output-json "$OUT/throughput-$q.json" \
                          2>&1 | grep -v INFO | tail -4
                      done ;;
    profile) python3 bench/gpu/profile_decode.py 2>&1 | grep -v "^$" | head -45 ;;
    profile-kernels) python3 bench/gpu/profile_kernels.py $B8 1 2>&1 | grep -v INFO | tail -28; \
               python3 bench/gpu/profile_kernels.py $B1 128 2>&1 | grep -v INFO | tail -28 ;;
    # where the 8B as a Q4_K_M GGUF (kept) spends a decode-1 step, each kernel's own time
    profile-gguf) make_gguf8 >&2
                  PAGODA_PDL=0 python3 bench/gpu/profile_kernels.py $GGUF8 1 --load-format gguf \
                    --tokenizer /tmp/b8w 2>&1 | grep -v INFO | tail -28 ;;
    # the gate-up planes product at one token under Nsight Compute: its counters, stall reasons
    # and per-instruction samples of its sm_90 code
    profile-planes) timeout 200 ncu --clock-control none --set full --import-source no \
                      --kernel-name regex:_planes_kernel --launch-skip 2 --launch-count 1 \
                      -o "$OUT/planes-gate-up" python3 bench/kernels/planes_products.py \
                      --eager gate_up > "$OUT/profile-planes.log" 2>&1
                    ncu -i "$OUT/planes-gate-up.ncu-rep" --page details --print-details all \
                      > "$OUT/planes-gate-up-details.txt" 2>&1
                    ncu -i "$OUT/planes-gate-up.ncu-rep" --page source --print-source sass --csv \
                      > "$OUT/planes-gate-up-sass.csv" 2>&1
                    tail -3 "$OUT/profile-planes.log"; wc -l "$OUT"/planes-gate-up-* ;;
    profile-steps) python3 bench/gpu/profile_steps.py $B1 2>&1 | grep -v INFO | tail -30 ;;
    profile-cpu-ops) python3 bench/gpu/profile_cpu_ops.py $B1 2>&1 | grep -v INFO | tail -30 ;;
    imports) python3 bench/gpu/import_profile.py --top 12 torch pagoda.engine.core_proc \
               pagoda.entrypoints.openai.server ;;
    profile-host) python3 bench/gpu/profile_host.py 2>&1 | grep -v "^$" | grep -v INFO | head -120 ;;
    serve-sweep) serve_sweep ;;
    reliability) reliability ;;
    structured) python3 -m pagoda.cli.main bench structured --model $B8 $COMMON --tokenizer .bench-tok \
               --num-prompts 256 --input-len 256 --output-len 256 --max-num-seqs 256 --disable-detokenize \
               --output-json "$OUT/structured.json" $EXTRA 2>&1 | grep -v INFO ;;
    fleet) python3 -m pagoda.cli.main bench fleet --model llama8b=$B8 --model llama3b=$B3 \
               --model llama1b=$B1 --wake llama8b=$B8 --wake llama1b=$B1 \
               --swap llama8b=$B8 --swap llama1b=$B1 --swap-limit 20GiB --num-prompts ${FLEET_PROMPTS:-128} \
               --max-concurrency 32 --output-json "$OUT/fleet.json" 2>&1 | grep -v INFO ;;
    # the first run meets cold disk and Triton caches (as on a fresh machine), the second warm
    # ones, the third warm disk but an empty Triton cache (it lists the kernels compiled)
    coldstart) for run in coldstart coldstart-warm coldstart-triton-cold; do
                 [ $run = coldstart-triton-cold ] && export TRITON_CACHE_DIR=$(mktemp -d)
                 python3 -m pagoda.bench.cold_start $B8 $COMMON --max-num-seqs 256 > "$OUT/$run.json"
                 python3 -c "import json; r = json.load(open('$OUT/$run.json')); print('$run', round(r['seconds_to_first_token'], 1), r['engine_startup_s'])"
               done
               find "$TRITON_CACHE_DIR" -name "*.cubin" | xargs -n1 basename | sort | uniq -c
               unset TRITON_CACHE_DIR ;;
  esac
}
# pagoda serve on the dummy 8B (with a word tokenizer, so it serves text), swept by bench serve
serve_sweep() {
  python3 -m pagoda.bench.word_tokenizer $B8 /tmp/b8w > /dev/null
  python3 -m pagoda.cli.main serve /tmp/b8w $COMMON --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --port 8011 --disable-log-requests > "$OUT/serve-sweep-server.log" 2>&1 &
  local server=$!
  for _ in $(seq 240); do python3 -c "import urllib.request as u; u.urlopen('http://localhost:8011/health')" 2>/dev/null && break; sleep 0.5; done
  python3 -m pagoda.cli.main bench serve --port 8011 --tokenizer /tmp/b8w --random-input-len 1024 \
    --random-output-len 128 --ignore-eos --sweep max-concurrency=${SWEEP:-1,4,16,64} \
    --sweep-prompts-per-concurrency ${PER_CONC:-8} --label "pagoda $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
    --num-warmups 8 --metric-percentiles 50,90,99 --result-dir "$OUT" --result-filename serve-sweep-8b.json \
    --disable-tqdm
  kill $server; wait $server
}
# the reliability suite (fuzz, 2x overload soak, faults, swaps) on the dummy 8B with a word
# tokenizer; needs schemathesis in .whl (../shared/tools/device-wheels.sh schemathesis). One
# device command runs at most 10 minutes: split with RELIABILITY_PHASES (fuzz / soak /
# faults,swaps) and SOAK_S; every call writes its own JSON. The fuzz server takes at most
# 1024 tokens of context (a conforming body without max_tokens then ends in seconds), and
# FUZZ_ARGS' default reaches the issue's 2,000 cases with 500 generating in about 3 minutes
# (45 and 900 gave 2,306 and 477). SOAK_SEQS sets the server's --max-num-seqs (the soak's
# capacity) and QUEUE_WAIT its --max-queue-wait. A 10-minute soak (SOAK_S=600) outlasts one
# call: run it with bench/gpu/detached.sh over two.
# SERVER_EXTRA adds server flags (e.g. --prefill-first); LABEL names the result file.
reliability() {
  python3 -m pagoda.bench.word_tokenizer $B8 /tmp/b8w > /dev/null
  local phases=${RELIABILITY_PHASES:-fuzz,soak,faults,swaps}
  local context=4096
  [ "$phases" = fuzz ] && context=1024
  python3 -m pagoda.cli.main bench reliability --model /tmp/b8w --profile full --phases "$phases" \
    --max-num-seqs ${SOAK_SEQS:-256} --soak-seconds ${SOAK_S:-600} --soak-max-queue-wait ${QUEUE_WAIT:-1} \
    ${FUZZ_ARGS:---fuzz-cases-per-route 45 --generation-cases 1100} \
    --server-args "$COMMON --max-model-len $context --max-num-batched-tokens 8192 ${SERVER_EXTRA:-}" --label h200 \
    --output-json "$OUT/reliability-8b-${phases//,/-}${LABEL:+-$LABEL}.json" --log-dir "$OUT/reliability-logs" \
    2>&1 | grep -v INFO
}
# processes a stage left on the GPU (a test's engine outliving its pytest, stopped at
# TESTS_TIMEOUT) stopped, so that no later timing shares the GPU with them
stop_gpu_leftovers() {
  local pids
  pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
  [ -z "$pids" ] && return 0
  echo "stopping processes left on the GPU: $(echo $pids)"
  kill $pids 2>/dev/null || return 0  # (none of ours: another namespace's)
  sleep 5; kill -9 $pids 2>/dev/null; sleep 1
}

EXTRA=${EXTRA:-}
for stage in "$@"; do
  echo "=== $stage ==="
  start=$(date +%s)
  run_stage "$stage"
  stop_gpu_leftovers
  echo "=== $stage done in $(( $(date +%s) - start )) s ==="
done
