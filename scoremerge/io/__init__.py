"""Checkpoints: what may be read and written (access), the safetensors format, checkpoints opened
for reading, and writers."""
from .read import load_state_dict
from .write import check_writable, parse_size, save_state_dict

__all__ = ["load_state_dict", "save_state_dict", "check_writable", "parse_size"]
