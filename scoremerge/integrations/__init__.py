"""scoremerge's methods inside other merging toolkits, one subpackage per toolkit.

Nothing here is imported by `import scoremerge`, and this file imports none of the toolkits:
each subpackage imports its own (`scoremerge.integrations.fusion_bench` needs the `fusion-bench`
extra), so scoremerge installs and imports without any of them.
"""
