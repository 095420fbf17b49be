"""`mixer recipes`: the named training presets and what each sets."""

from __future__ import annotations

import argparse
import json

from ..recipes import DEFAULT_RECIPE, RECIPES, Recipe, get_recipe


def register(p: argparse.ArgumentParser) -> None:
    p.description = ("List the named training presets with the fields each changes from the defaults; "
                     "with NAME, print that recipe in full as JSON.")
    p.add_argument("name", nargs="?", help="print this recipe in full (all fields) as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.name:
        print(json.dumps(get_recipe(args.name).to_dict(), indent=1))
        return 0
    defaults = Recipe().to_dict()
    for name in RECIPES:
        full = get_recipe(name).to_dict()
        changed = {k: v for k, v in full.items() if v != defaults[k]}
        mark = " (default for `mixer train`)" if name == DEFAULT_RECIPE else ""
        print(f"{name}{mark}:")
        print("  " + ", ".join(f"{k}={json.dumps(v)}" for k, v in changed.items()))
    print("`mixer recipes NAME` prints one in full; flags or --config FILE.json override any field.")
    return 0
