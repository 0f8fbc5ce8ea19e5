"""The only package that imports SGLang.

- `plugin`: the hooks SGLang 0.5.15+ installs through the `sglang.srt.plugins` entry point.
- `legacy`: what `patches/sglang-0.5.10.patch` calls on releases without plugins.
- `loader`: the glue both share (the target's load, the seed's publication, rank facts).
- `launch`: running SGLang server processes on this machine (the demo, benchmarks and tests).
- `patching`, `unidiff`: `sglang-mx patch apply|check|revert`, with the patch files in `patches/`.

Importing this package imports nothing from SGLang; each module imports it where needed.
"""
