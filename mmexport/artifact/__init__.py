"""The filesystem side of an artifact directory, plain Python (no numpy, no torch): both the export
side and the torch-free runtime use it.

- `paths`: every path a manifest names is relative, normalized and stays inside the directory
  (symbolic links included); files are opened only when they are regular files, without blocking.
- `files`: writes go to a fresh, exclusively created temporary file that is renamed into place, so
  nothing is ever written through a symbolic link and no reader sees half a file.
- `onnx_refs`: the external-data locations an ONNX file points at, read without the onnx package.
- `destination`: what a build does to its output directory: a lock for the whole build, removal
  of stale temporary directories left by killed builds, and `--force` rules (only an artifact or an
  empty directory is replaced; never the working directory, its ancestors, the home directory or /).
"""
