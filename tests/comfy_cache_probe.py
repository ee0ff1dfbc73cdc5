"""Run a zoom-loop prompt in ComfyUI's own executor (no server) and print, per number of steps,
the bytes of the distinct tensors its output cache holds afterwards.

    COZ_PACK=<pack> COZ_INPUT=<input dir> COZ_SIZE=<px> python comfy_cache_probe.py CACHE STEPS...

Runs with cwd = the ComfyUI checkout, under its python; CACHE is classic or lru:N; the prompt is
comfy_fixtures.loop_prompt. Prints one JSON object {steps: bytes}.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys

import torch


class _Server:
    """What the executor needs from a PromptServer: a client id and somewhere to send events."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass


def held_bytes(cache) -> int:
    seen: dict[int, int] = {}

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        elif hasattr(obj, "scales"):  # the loop state
            visit(obj.scales)
        elif hasattr(obj, "outputs"):  # ComfyUI's cache entries
            visit(obj.outputs)

    def walk(c):
        for value in c.cache.values():
            visit(value)
        for sub in c.subcaches.values():
            walk(sub)

    walk(cache)
    return sum(seen.values())


def main() -> None:
    cache, *steps_list = sys.argv[1:]
    pack_dir, input_dir, size = os.environ["COZ_PACK"], os.environ["COZ_INPUT"], int(os.environ["COZ_SIZE"])
    sys.path.insert(0, os.getcwd())
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import utils.install_util  # noqa: F401  ComfyUI's `utils` package before `nodes` shadows it
    import comfy.options  # noqa: F401
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths

    folder_paths.set_input_directory(input_dir)
    import execution
    import nodes
    import server
    from aiohttp import web

    from comfy_fixtures import loop_prompt

    stub = _Server()
    stub.routes = web.RouteTableDef()
    server.PromptServer.instance = stub
    loop = asyncio.new_event_loop()
    loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert loop.run_until_complete(nodes.load_custom_node(pack_dir))
    if cache.startswith("lru"):
        executor = execution.PromptExecutor(stub, cache_type=execution.CacheType.LRU,
                                            cache_size=int(cache.partition(":")[2]))
    else:
        executor = execution.PromptExecutor(stub, cache_type=execution.CacheType.CLASSIC)
    held = {}
    for i, steps in enumerate(int(s) for s in steps_list):
        prompt = loop_prompt(steps, size)
        valid = loop.run_until_complete(execution.validate_prompt(str(i), prompt, None))
        assert valid[0], valid[1]
        executor.execute(prompt, str(i), {}, valid[2])
        assert executor.success, executor.status_messages
        held[steps] = held_bytes(executor.caches.outputs)
    print(json.dumps(held))


if __name__ == "__main__":
    main()
