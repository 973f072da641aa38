"""Generated docstrings next to the real ones, for held-out functions of an SFT run's data.

    python scripts/sft_samples.py --data runs/sft-full --runs runs/tiny-bpe runs/sft-full \\
        runs/sft-lora --n 4

Takes the `--n` held-out examples of `--data`'s run (its config's data settings) with the
shortest prompts, completes each greedily with every run in `--runs` (`infra.generate.complete`,
the newest checkpoint; a base LM run sees the same `[BOS] prompt`), and prints Markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def held_out_examples(workdir: str, n: int) -> list[dict]:
    from infra import config as config_lib
    from infra.data import docstrings, sft

    cfg = config_lib.load_saved(workdir)
    d = cfg.data
    if d.source == "stdlib_docstrings":
        _, val = docstrings.build(docstrings.default_directory(d.cache_dir, d.val_fraction,
                                                               d.docstrings_format),
                                  val_fraction=d.val_fraction, fmt=d.docstrings_format)
        files = [str(val)]
    else:
        files = sft.resolve(d.eval_files, "data.eval_files")
    records = [r for _, _, r in sft.read_jsonl(files) if "prompt" in r]
    records = [r for r in records if 20 <= len(r["completion"]) <= 200]
    return sorted(records, key=lambda r: (len(r["prompt"]), r["prompt"]))[:n]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="SFT run whose held-out examples to use")
    p.add_argument("--runs", nargs="+", required=True, help="workdirs to generate with")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=48)
    args = p.parse_args()
    from infra import process
    from infra.generate import complete

    process.setup()
    for i, ex in enumerate(held_out_examples(args.data, args.n), 1):
        print(f"#### Example {i}\n\n```python\n{ex['prompt'].rstrip()}\n```\n")
        print(f"- **real**: {ex['completion']!r}")
        for run in args.runs:
            out = complete(run, ex["prompt"], max_new_tokens=args.max_new_tokens, temperature=0.0)
            print(f"- **{Path(run).name}**: {out['text']!r}"
                  + (" (stopped at the token limit)" if out["finish_reason"] == "length" else ""))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
