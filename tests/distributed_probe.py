"""One rank of a distributed test run (started by `mlx.launch`), or the single-process reference (`--single`).

Every rank loads its part, then rank 0 plays a fixed scenario through `Generation` while the others follow:
1. greedy, with tokens forced in after the third (as the thinking budget's guide forces them: a logits
   processor on rank 0 that leaves one choice);
2. the same cache continued with a new message, the consumer walking away after four tokens;
3. sampled at temperature 1 from an RNG seeded differently on every rank (only rank 0's draw may count).
Each rank prints one `PROBE {json}` line: the tokens it fed, its weight bytes, and its resident and peak
memory after loading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "--hub-cache" in sys.argv:  # a Hub cache of this rank's own (read when huggingface_hub is imported)
    _base = sys.argv[sys.argv.index("--hub-cache") + 1]
    os.environ["HF_HUB_CACHE"] = os.path.join(_base, f"rank{os.environ.get('MLX_RANK', '0')}")

import mlx.core as mx  # noqa: E402

from qwen_mlx.cache import make_cache  # noqa: E402
from qwen_mlx.engine import Generation  # noqa: E402
from qwen_mlx.memory import model_nbytes  # noqa: E402
from qwen_mlx.sampling import Sampling  # noqa: E402

# <|im_start|>user\nHello there, how are you today?<|im_end|>\n<|im_start|>assistant\n
PROMPT = [151644, 872, 198, 9707, 1052, 11, 1246, 525, 498, 3351, 30, 151645, 198, 151644, 77091, 198]
FORCED = [151667, 198, 1654]  # <think>\nWe
FOLLOW_UP = [151645, 198, 151644, 872, 198, 40, 1490, 13, 151645, 198, 151644, 77091, 198]
END_IDS = [151645, 151643]


def force_after_three(tokens: mx.array, logits: mx.array) -> mx.array:
    """FORCED as the only choices for the 4th to 6th generated tokens (a processor sees prompt + generated)."""
    generated = tokens.size - len(PROMPT)
    if 3 <= generated < 3 + len(FORCED):
        return mx.where(mx.arange(logits.shape[-1]) == FORCED[generated - 3], logits, -mx.inf)
    return logits


def scenario(model, link) -> list[list[int]]:
    cache = make_cache(model)
    first = Generation(model, PROMPT, cache, max_tokens=10, end_ids=END_IDS, logits_processors=[force_after_three],
                       link=link)  # fmt: skip
    list(first)
    second = Generation(model, FOLLOW_UP, cache, max_tokens=10, end_ids=END_IDS, link=link)
    for _ in second:
        if len(second.tokens) == 4:
            break
    sampled = Generation(
        model,
        PROMPT,
        make_cache(model),
        sampler=Sampling(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0).sampler(model.args.vocab_size),
        max_tokens=8,
        end_ids=[],
        link=link,
    )
    list(sampled)
    return [first.tokens, second.tokens, sampled.tokens]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("mode", choices=("tp", "pp", "single"))
    parser.add_argument("--layers")
    parser.add_argument("--hub-cache", help="each rank downloads into DIR/rank<N> (the model is a repo id)")
    args = parser.parse_args()
    if args.mode == "single":
        from qwen_mlx.loader import load_model

        loaded, rank = load_model(args.model), 0
    else:
        from qwen_mlx.distributed import load_part

        loaded = load_part(args.model, args.mode, layers=args.layers)
        rank = loaded.link.rank
    model = loaded.model
    mx.clear_cache()
    record = {"rank": rank, "weights": model_nbytes(model), "active": mx.get_active_memory(),
              "peak": mx.get_peak_memory()}  # fmt: skip
    mx.random.seed(1234 + rank)  # a different RNG on every rank: agreement must come from rank 0's broadcast
    if rank == 0:
        record["tokens"] = scenario(model, loaded.link)
        if args.mode != "single":
            loaded.link.close()
    else:
        from qwen_mlx.distributed.link import follow

        seen: list[list[int]] = []
        follow(loaded, on_generation=lambda generation: seen.append(list(generation.tokens)))
        record["tokens"] = seen
    print("PROBE " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
