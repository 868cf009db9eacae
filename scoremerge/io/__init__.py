"""Checkpoints: read state dicts from files and HF-style folders; write safetensors atomically."""
from .read import load_state_dict
from .write import check_writable, parse_size, save_state_dict

__all__ = ["load_state_dict", "save_state_dict", "check_writable", "parse_size"]
