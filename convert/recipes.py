"""Mixed-precision recipes: data files in `recipes/`, turned into a per-module bits decision.

A recipe is JSON: `bits` (the body), an optional `group_size`, and `rules`, tried in order; the first
rule whose `match` regex is found in the module path gives that module its `bits` (and `group_size`).
`"layers": "sensitive"` limits a rule to the layers llama.cpp's Q4_K_M and mlx-lm's mixed recipes give
more bits: the first and last eighth of the stack and every third layer between.

The mlx-lm-named recipes (`mixed_2_6`, `mixed_3_4`, `mixed_3_6`, `mixed_4_6`) produce exactly the
modules and bits of `mlx_lm.convert --quant-predicate` with one deliberate difference: the MoE router
(`mlp.gate`) stays at 8 bits, group 64, as in uniform quantization (mlx-lm's recipes quantize it with
the body; routing is the most quantization-sensitive part of an MoE model and the router is tiny).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.quant import SUPPORTED_GROUP_SIZES, Recipe, check_bits

RECIPES_DIR = Path(__file__).with_name("recipes")
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


@dataclass(frozen=True)
class RecipeFile:
    name: str
    description: str
    bits: int
    rules: tuple[dict[str, Any], ...]
    group_size: int | None = None

    def predicate(self, num_layers: int, group_size: int) -> Recipe:
        """`module path -> {"group_size", "bits", "mode"}`, the entry mlx-lm writes for each module."""
        group_size = self.group_size or group_size
        rules = [(re.compile(rule["match"]), rule) for rule in self.rules]

        def choose(path: str) -> dict[str, Any]:
            bits, size = self.bits, group_size
            for pattern, rule in rules:
                if not pattern.search(path):
                    continue
                if rule.get("layers") == "sensitive" and not is_sensitive(path, num_layers):
                    continue
                bits, size = rule["bits"], rule.get("group_size", group_size)
                break
            return {"group_size": size, "bits": bits, "mode": "affine"}

        return choose


def is_sensitive(path: str, num_layers: int) -> bool:
    """mlx-lm's `use_more_bits` (from llama.cpp): first and last eighth, and every third layer between."""
    found = LAYER_INDEX.search(path)
    if found is None:
        return False
    index = int(found.group(1))
    eighth = num_layers // 8
    return index < eighth or index >= 7 * num_layers // 8 or (index - eighth) % 3 == 2


def load_recipe(name_or_path: str) -> RecipeFile:
    """A shipped recipe by name, or a JSON file of the same shape by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise QwenMLXError(
            f"unknown recipe {name_or_path!r}; choose one of {', '.join(available_recipes())} or pass a .json file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        recipe = RecipeFile(
            name=path.stem,
            description=str(data.get("description", "")),
            bits=int(data["bits"]),
            rules=tuple(data.get("rules", [])),
            group_size=data.get("group_size"),
        )
        for rule in recipe.rules:
            re.compile(rule["match"])
            check_bits(int(rule["bits"]), rule.get("group_size", recipe.group_size or 64))
        check_bits(recipe.bits, recipe.group_size or 64)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, re.error) as error:
        raise QwenMLXError(
            f"recipe {path} is malformed ({error.__class__.__name__}: {error}); it needs 'bits' and 'rules' "
            "with 'match' and 'bits'"
        ) from None
    if recipe.group_size is not None and recipe.group_size not in SUPPORTED_GROUP_SIZES:
        raise QwenMLXError(f"recipe {path}: group_size {recipe.group_size} is not supported")
    return recipe
