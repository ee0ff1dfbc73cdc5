"""ComfyUI nodes: thin wrappers over coz_core. Each family module exports NODE_CLASS_MAPPINGS."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
