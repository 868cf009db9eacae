"""scoremerge's methods as FusionBench algorithms (`pip install 'scoremerge[fusion-bench]'`).

Same class names and constructor arguments as FusionBench 0.2.33's own, so changing a config's
`_target_` from `fusion_bench.method.X` to `scoremerge.integrations.fusion_bench.X` is the whole
migration. Hydra configs for each are in CONFIG_DIR (`fusion_bench --config-dir` it, then
`method=scoremerge/tsv` etc.); `python -m scoremerge.integrations.fusion_bench` prints it.
"""
from pathlib import Path

try:
    import fusion_bench  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "fusion_bench":
        raise
    raise ModuleNotFoundError(
        "scoremerge.integrations.fusion_bench needs FusionBench: pip install "
        "'scoremerge[fusion-bench]' (fusion-bench==0.2.33)", name="fusion_bench") from None

from .algorithms import (ISO_C_Merge, ISO_CTS_Merge, IsotropicMergingInCommonAndTaskSubspace,
                         IsotropicMergingInCommonSubspace, MagMaxAlgorithm, ScoreMergingAlgorithm,
                         ScoremergeAlgorithm, TaskArithmeticAlgorithm, TaskSingularVectorMerging,
                         TiesMergingAlgorithm)

CONFIG_DIR = Path(__file__).parent / "config"

__all__ = ["CONFIG_DIR", "ISO_CTS_Merge", "ISO_C_Merge", "IsotropicMergingInCommonAndTaskSubspace",
           "IsotropicMergingInCommonSubspace", "MagMaxAlgorithm", "ScoreMergingAlgorithm",
           "ScoremergeAlgorithm", "TaskArithmeticAlgorithm", "TaskSingularVectorMerging",
           "TiesMergingAlgorithm"]
