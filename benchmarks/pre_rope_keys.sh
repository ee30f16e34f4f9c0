#!/usr/bin/env bash
# Keys before RoPE against the package's keys after RoPE (issue 22): perplexity of 512 tokens
# after a 2k prefix with every token kept at 2 bits (keys per channel, values per token), on the
# book and the legal text, float32 and bfloat16. Needs bases from
#   hf-subtok calibrate --out bench_out/bases/smollm2-pre-rope --key-space pre_rope
#   python benchmarks/key_bases_variants.py bench_out/bases/smollm2-pre-rope
set -euo pipefail
C="bits=2+rotate=true+num_groups=2+keep_groups=2+window=16+pack_chunk=8"
B=bench_out/bases/smollm2-pre-rope
M="dense,subtok:$C,subtok:$C+key_space=pre_rope"
for v in "" -hadamard -pca-hadamard -pca-uncentred; do M="$M,subtok:$C+key_space=pre_rope+key_bases=$B$v"; done
for dtype in float32 bfloat16; do
  for text in book legal; do
    hf-subtok --threads "${THREADS:-1}" bench --suite ppl --ppl-prefix 2k --ppl-text "$text" --budgets 0.25 \
      --methods "$M" --dtype "$dtype" --out "bench_out/pre-rope-keys/$dtype-$text"
  done
done
