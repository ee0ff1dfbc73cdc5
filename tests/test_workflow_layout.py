"""The UI workflows' nodes do not overlap once the frontend sizes them. The frontend grows a node
to fit its title, its slot names side by side and one row per slot or widget (LiteGraph's
computeSize); the estimate here errs large (8 px per character, 20 px per row, 30 px title)."""
import json
import re
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
TITLE, ROW, CHAR = 30, 20, 8


def needed(node: dict) -> tuple[int, int]:
    inputs = [i for i in node.get("inputs", []) if not i.get("widget")]
    outputs = node.get("outputs", [])
    values = node.get("widgets_values")
    widgets = len(values) if isinstance(values, list) else 0
    rows = max(len(inputs) + widgets, len(outputs), 1)
    longest_in = max([len(i.get("label") or i["name"]) for i in inputs] + [0])
    longest_out = max([len(o.get("label") or o["name"]) for o in outputs] + [0])
    width = max(CHAR * (longest_in + longest_out) + 60, CHAR * len(node.get("title") or node["type"]) + 40)
    return width, ROW * rows + 10


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_nodes_do_not_overlap_when_sized(path):
    nodes = json.loads(path.read_text())["nodes"]
    boxes = {}
    for node in nodes:
        width, height = needed(node)
        saved = node.get("size", [0, 0])
        x, y = node["pos"]
        boxes[node["id"]] = (x, y - TITLE, x + max(saved[0], width), y + max(saved[1], height))
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            A, B = boxes[a], boxes[b]
            assert not (A[0] < B[2] and B[0] < A[2] and A[1] < B[3] and B[1] < A[3]), (path.name, a, b)


def test_template_titles_read_well_and_sort_in_order():
    """ComfyUI's template browser titles a pack's workflows by file name (there is no title field):
    the names are the titles, numbered so that any sort shows them in the order of the docs."""
    stems = [p.stem for p in WORKFLOWS]
    assert all(re.fullmatch(r"CoZ \d - [A-Z][\w ()'-]+", s) for s in stems), stems
    assert [s.split(" - ")[0] for s in sorted(stems)] == [f"CoZ {i}" for i in range(1, len(stems) + 1)]
