"""ComfyUI entry point of the Chain-of-Zoom node pack (one registration path: the mappings)."""
if __package__:  # ComfyUI imports this folder as a package
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # pytest imports this file as a plain module when the folder's name is no package name
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

# served by ComfyUI; web/docs/<node key>.md are the nodes' help pages in the frontend
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
