"""Several Macs as one: tensor- and pipeline-parallel Qwen3 over `mx.distributed`, started by `mlx.launch`.

Design decisions:
- The transport, the launcher and the collectives are MLX's own (`mx.distributed` with its ring, MPI and
  JACCL backends; `mlx.launch` starts one process per host). Nothing here opens a socket.
- Tensor parallelism (`tp`) splits attention heads and MLP columns with MLX's `shard_linear`
  (all-to-sharded into a block, sharded-to-all out of it: one all-reduce after attention and one after the
  MLP), on float and quantized layers alike. MoE layers are expert-parallel: each rank holds
  `num_experts / N` whole experts, the router is replicated, each rank runs the chosen experts it holds and
  the all-reduce adds the ranks' parts.
- Pipeline parallelism (`pp`) gives each rank a contiguous range of layers (rank 0 the first), sized by
  `--layers` or by each host's memory; activations go rank to rank with `send`/`recv`, and the last
  stage's output reaches every rank with one all-gather. One hop per stage per token: the choice over
  slow links, where tensor parallelism's two all-reduces per layer cost too much.
- In both modes the embedding and the head are vocabulary-parallel (each rank holds 1/N of the 151,936
  rows; lookups are all-reduced, logits all-gathered), so every rank holds about 1/N of the weights.
- Each rank reads only what it owns: pipeline stages skip the safetensors shards (per the index) and the
  tensors of other stages, and download only their own shards from the Hub; every rank reads its slice of
  each tensor (heads, columns, experts, vocabulary rows) straight from the file (`read_owned`), never the
  whole tensor, so its peak memory while loading is its share. Quantizing on load, which needs whole
  float tensors, reads them lazily a layer at a time instead, and copies the slices out (`mx.array`) so
  that no view keeps a whole tensor alive.
- Rank 0 leads and the others follow (`follow`): rank 0 runs the command (the CLI's generation, the
  endpoint) and every `Generation` it starts is mirrored: its start is shared as JSON (never pickle), the
  sampled token is broadcast from rank 0 inside the step's graph (so sampling cannot diverge), and one
  small all-reduce per token says go on, take these forced tokens, or stop. The followers need no
  tokenizer, sampler or grammar: they only feed the tokens rank 0 chose.
- A rank that dies closes its sockets (MLX raises "connection to a peer was lost") or is reported by
  `mlx.launch`, which stops the others (SIGTERM); a host that goes silent is caught by a watchdog on
  rank 0 that ends the run when a step makes no progress for `--peer-timeout` seconds.

The parts, one concern each: `plan` (the mode, the group, the split, checked up front), `reading` (each
rank reads and assembles only its part; the cutting itself is `Model.shard` / `Model.keep_stage`), `link`
(the lockstep between rank 0 and the others), `launch` (starting the ranks through `mlx.launch`, relaying
what they say). Nothing imports this package but the command line and the server's worker.
"""

from .launch import launch, preflight, serve_in_background
from .link import Link, PeerLost, report_status, run_follower, watch_signals
from .reading import load_part

__all__ = [
    "Link",
    "PeerLost",
    "launch",
    "load_part",
    "preflight",
    "report_status",
    "run_follower",
    "serve_in_background",
    "watch_signals",
]
