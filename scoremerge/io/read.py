"""Read a whole state dict: a .safetensors or .pt/.pth/.bin file, or a Hugging Face-style folder
(io.checkpoint decides which files, and checks them)."""
from .checkpoint import Checkpoint


def load_state_dict(path):
    """{key: tensor} on the CPU from a file or folder; errors name the file and what is wrong,
    including a file rewritten or replaced while it was read."""
    with Checkpoint(path) as checkpoint:
        state_dict = checkpoint.load()
        checkpoint.check_unchanged()
    return state_dict
