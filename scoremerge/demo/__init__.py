"""The embedded benchmark (the main job): leave-one-domain-out merging on rotated digits.

    from scoremerge.demo import demo_config, run_demo
    results = run_demo(demo_config(quick=True), out="runs/demo")
"""
from .experiment import DemoConfig, demo_config, merge_variants, run_experiment
from .run import run_demo

__all__ = ["DemoConfig", "demo_config", "merge_variants", "run_experiment", "run_demo"]
