"""Prints the folder of scoremerge's FusionBench configs, for `fusion_bench --config-dir`."""
from . import CONFIG_DIR

print(CONFIG_DIR)
