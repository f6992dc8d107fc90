"""torch -> ONNX export of declared components, graph checks, and the build that writes an artifact directory."""
