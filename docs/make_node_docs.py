"""Write web/docs/<node key>.md, the nodes' help pages in ComfyUI's frontend, from the node
definitions (description, inputs with ranges and tooltips, outputs). Run after changing a node:
``python docs/make_node_docs.py``."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_pack():
    spec = importlib.util.spec_from_file_location("coz_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["coz_pack"] = module
    spec.loader.exec_module(module)
    return module


def describe(name: str, entry: tuple, optional: bool) -> str:
    kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
    if not isinstance(kind, str):
        kind = "choice: " + ", ".join(map(str, kind[:8])) + (" ..." if len(kind) > 8 else "")
    facts = [kind]
    if "min" in opts:
        facts.append(f"{opts['min']} to {opts['max']}")
    if opts.get("default") not in (None, ""):
        facts.append(f"default {opts['default']}")
    return f"- **{name}**{' (optional)' if optional else ''} ({', '.join(facts)}): {opts.get('tooltip', '')}"


def page(key: str, cls, title: str) -> str:
    lines = [f"# {title}", "", cls.DESCRIPTION, "", "## Inputs", ""]
    spec = cls.INPUT_TYPES()
    for group in ("required", "optional"):
        lines += [describe(n, e, group == "optional") for n, e in spec.get(group, {}).items()]
    lines += ["", "## Outputs", ""]
    tips = getattr(cls, "OUTPUT_TOOLTIPS", ("",) * len(cls.RETURN_TYPES))
    lines += [f"- **{n}** ({k}): {t}" for n, k, t in zip(cls.RETURN_NAMES, cls.RETURN_TYPES, tips)]
    lines += ["", "More: the pack's docs/NODES.md (model folders, the loop, the example workflows).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    pack = load_pack()
    out = ROOT / "web" / "docs"
    out.mkdir(parents=True, exist_ok=True)
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        (out / f"{key}.md").write_text(page(key, cls, pack.NODE_DISPLAY_NAME_MAPPINGS[key]), encoding="utf-8")
        print(out / f"{key}.md")
