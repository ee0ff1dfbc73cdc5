"""SR backbones behind the SRBackbone protocol (see base.py)."""
