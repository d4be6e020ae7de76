"""What the benchmark writes: the machine it ran on, medians and ratios, a markdown table and a chart.

Every ratio is qwen_mlx ÷ mlx-lm of the medians over the rounds: above 1 is better for speeds (tok/s),
below 1 is better for TTFT and memory. The speculative tables (`speculative_markdown`) give each side's
speed as a ratio to plain decoding on its own library, next to its work counts (drafts kept, target passes
per generated token), which do not depend on the machine.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlx.core as mx

# (key, title, unit, higher is better)
METRICS = (
    ("decode_tps", "decode tok/s", "tok/s", True),
    ("prefill_tps", "prefill tok/s", "tok/s", True),
    ("ttft_s", "TTFT", "s", False),
    ("peak_memory", "peak memory", "bytes", False),
)


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=False
            ).stdout.strip()
        except OSError:
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return out or None
    return None


def backend() -> str:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def machine() -> dict[str, Any]:
    memory = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "backend": backend(),
        "device": str(mx.default_device()),
        "device_info": {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))},
        "gpu": _gpu_name(),
        "mlx": mx.__version__,
        "mlx_lm": _package_version("mlx-lm"),
        "qwen_mlx": _package_version("qwen-mlx"),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line for the table's caption: the chip, the backend and the versions."""
    chip = info.get("gpu") or info["device_info"].get("device_name") or info["cpu"]
    if info["backend"] == "cpu":
        chip = f"{info['cpu']}, {info['cpu_count']} cores"
    return f"{chip} ({info['backend']}), mlx {info['mlx']}, mlx-lm {info['mlx_lm']}, {info['platform']}"


def summarize(runs: list[dict[str, Any]], sides: tuple[str, str]) -> dict[str, Any]:
    """Median of each metric per side and the ratio first side ÷ second side."""
    summary = {}
    for key, *_ in METRICS:
        medians = {side: statistics.median(r[key] for r in runs if r["side"] == side) for side in sides}
        ratio = medians[sides[0]] / medians[sides[1]] if medians[sides[1]] else float("nan")
        summary[key] = {**medians, "ratio": ratio}
    return summary


def _value(key: str, value: float) -> str:
    if key == "ttft_s":
        return f"{value * 1e3:.0f} ms" if value < 10 else f"{value:.1f} s"
    if key == "peak_memory":
        return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def ratio_table(configs: list[dict[str, Any]], ours: str, theirs: str) -> str:
    head = "| model | " + " | ".join(f"{title} {'↑' if up else '↓'}" for _, title, _, up in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for config in configs:
        cells = []
        for key, *_ in METRICS:
            s = config["summary"][key]
            cells.append(f"**{s['ratio']:.2f}×** ({_value(key, s[ours])} vs {_value(key, s[theirs])})")
        lines.append(f"| {config['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conversation_table(conversation: dict[str, Any], ours: str, others: list[str]) -> str:
    head = f"| turn | prompt tokens | reused by {ours} | TTFT {ours} |"
    head += "".join(f" TTFT {name} | ratio |" for name in others)
    lines = [head, "|---" * (4 + 2 * len(others)) + "|"]
    for turn in conversation["turns"]:
        run = turn["runs"][ours]
        row = (
            f"| {turn['turn']} | {turn['prompt_tokens']} | {run['cached_tokens']} | {_value('ttft_s', run['ttft_s'])} |"
        )
        for name in others:
            other = turn["runs"][name]
            row += f" {_value('ttft_s', other['ttft_s'])} | **{run['ttft_s'] / other['ttft_s']:.2f}×** |"
        lines.append(row)
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    ours, theirs = results["sides"]
    parts = [
        f"Ratios {ours} ÷ {theirs} (medians of {results['settings']['rounds']} interleaved rounds; ↑ higher is "
        f"better, ↓ lower is better), prompt {results['settings']['prompt_tokens']} tokens, "
        f"{results['settings']['max_tokens']} generated, greedy. {machine_line(results['machine'])}.",
        "",
        ratio_table(results["configs"], ours, theirs),
    ]
    conversation = results.get("conversation")
    if conversation:
        others = [name for name in conversation["sides"] if name != ours]
        parts += [
            "",
            f"{len(conversation['turns'])}-turn thinking conversation on {conversation['label']}, full history "
            f"sent each turn, {conversation['max_tokens']} tokens generated per turn; TTFT per turn "
            f"(ratio {ours} ÷ the other):",
            "",
            conversation_table(conversation, ours, others),
        ]
    return "\n".join(parts)


def chart(results: dict[str, Any], path: Path) -> Path | None:
    """Ratio bars per metric and model, and TTFT per conversation turn; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours, theirs = results["sides"]
    conversation = results.get("conversation")
    fig, axes = plt.subplots(1, 2 if conversation else 1, figsize=(14 if conversation else 8, 5), squeeze=False)
    bars = axes[0][0]
    configs = results["configs"]
    width = 0.8 / max(1, len(configs))
    for i, config in enumerate(configs):
        xs = [m + (i - (len(configs) - 1) / 2) * width for m in range(len(METRICS))]
        ratios = [config["summary"][key]["ratio"] for key, *_ in METRICS]
        drawn = bars.bar(xs, ratios, width, label=config["label"])
        bars.bar_label(drawn, labels=[f"{r:.2f}" for r in ratios], fontsize=7)
    bars.axhline(1.0, color="black", linewidth=0.8)
    all_ratios = [c["summary"][key]["ratio"] for c in configs for key, *_ in METRICS]
    if max(all_ratios) / min(all_ratios) > 10:  # a log scale keeps 0.1× and 10× equally far from 1×
        bars.set_yscale("log")
    bars.set_xticks(
        range(len(METRICS)), [f"{title}\n({'higher' if up else 'lower'} is better)" for _, title, _, up in METRICS]
    )
    bars.set_ylabel(f"{ours} ÷ {theirs}")
    bars.set_title(f"{ours} vs {theirs}, side by side")
    bars.legend(fontsize=8)
    if conversation:
        lines = axes[0][1]
        turns = [t["turn"] for t in conversation["turns"]]
        for name in conversation["sides"]:
            lines.plot(turns, [t["runs"][name]["ttft_s"] * 1e3 for t in conversation["turns"]], marker="o", label=name)
        times = [r["ttft_s"] for t in conversation["turns"] for r in t["runs"].values()]
        if max(times) / min(times) > 20:
            lines.set_yscale("log")
        lines.set_xlabel("turn (full history sent each turn)")
        lines.set_ylabel("TTFT (ms)")
        lines.set_title(f"TTFT per turn, {conversation['label']}")
        tokens = lines.twinx()
        tokens.plot(
            turns,
            [t["prompt_tokens"] for t in conversation["turns"]],
            color="grey",
            linestyle=":",
            label="prompt tokens",
        )
        tokens.set_ylabel("prompt tokens", color="grey")
        lines.legend(fontsize=8, loc="upper left")
    fig.suptitle(machine_line(results["machine"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _same(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def speculative_table(prompts: list[dict[str, Any]], plain: dict[str, str]) -> str:
    """One row per prompt and side: speed (and its ratio to that library's plain decoding), work counts."""
    lines = [
        "| prompt | side | decode tok/s | ÷ plain | TTFT | total | drafts kept | passes/token | tokens = plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for prompt in prompts:
        summary = prompt["summary"]
        for side, s in summary.items():
            speed, base = s["decode_tps"], summary[plain[side]]["decode_tps"]
            lines.append(
                f"| {prompt['name']} ({prompt['prompt_tokens']} tokens) | {side} | {_value('decode_tps', speed)}"
                f" | {speed / base:.2f}× | {_value('ttft_s', s['ttft_s'])} | {_value('ttft_s', s['total_s'])}"
                f" | {_share(s['acceptance'])}"
                f" | {s['passes_per_token']:.2f} | {_same(s['same_tokens'])} |"
            )
    return "\n".join(lines)


def work_table(prompts: list[dict[str, Any]]) -> str:
    lines = ["| prompt | side | tokens | drafts kept | passes/token | tokens = plain |", "|---|---|---|---|---|---|"]
    for prompt in prompts:
        for side, s in prompt["sides"].items():
            lines.append(
                f"| {prompt['name']} ({prompt['prompt_tokens']} tokens) | {side} | {s['completion_tokens']}"
                f" | {_share(s['acceptance'])} | {s['passes_per_token']:.2f} | {_same(s['same_tokens'])} |"
            )
    return "\n".join(lines)


def speculative_markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    info = results["machine"]
    parts = [
        f"Speculative decoding, greedy, {settings['num_draft_tokens']} drafts per pass, prompts up to "
        f"{settings['prompt_tokens']} tokens, {settings['max_tokens']} generated, medians of {settings['rounds']} "
        f"rounds in rotating order. Decode counts from the first target pass's last token (mlx-lm's first pass "
        f"already verifies drafts); total is the call to the last token. {machine_line(info)}.",
    ]
    if info["backend"] == "cpu":
        parts.append(
            "\nOn MLX's CPU backend a pass over k tokens costs about k single steps, so the speeds below are "
            "not what speculation gains where decoding is bound by reading the weights (Apple silicon, a GPU); "
            "the work counts (drafts kept, passes per token) are the same on any machine."
        )
    plain = {side: side.partition(" + ")[0] for side in results["sides"]}
    for target in results["speculative"]:
        head = target["head_to_head"]
        parts += [
            "",
            f"Target {target['label']}, draft {target['draft']}: random weights, so what they accept says nothing "
            f"about real text (the trained models' counts below do); these rows are for speed. qwen_mlx ÷ mlx-lm, "
            f"decode / end to end: plain **{head['plain decode']:.2f}×** / {head['plain end to end']:.2f}×, "
            f"with the same draft model **{head['draft decode']:.2f}×** / {head['draft end to end']:.2f}×.",
            "",
            speculative_table(target["prompts"], plain),
        ]
    work = results.get("work_counts")
    if work:
        parts += [
            "",
            f"Work counts on models trained to answer their prompts ({work['label']}: the demo answers a "
            f"question, the repeater repeats an edited file; each drafts for itself, so every draft a plain "
            f"decode would make is kept), up to {work['max_tokens']} tokens, greedy, end token on:",
            "",
            work_table(work["prompts"]),
        ]
    return "\n".join(parts)


def _write_text(path: Path, text: str) -> None:
    """Atomically: a run stopped halfway leaves the previous results whole."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write(results: dict[str, Any], out: Path, stem: str, render=markdown, draw=chart) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md` (by `render`) and, unless `draw` is None, `<stem>.png`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    _write_text(paths["json"], json.dumps(results, indent=1) + "\n")
    _write_text(paths["markdown"], render(results) + "\n")
    if draw is not None and draw(results, out / f"{stem}.png"):
        paths["png"] = out / f"{stem}.png"
    return paths
