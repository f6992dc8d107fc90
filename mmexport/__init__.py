"""mmexport: export multimodal LLMs part by part to ONNX / TensorRT, run them torch-free, prove parity.

Importing the package imports nothing heavy: torch and transformers are loaded only by the export
and verify paths, never by `mmexport.runtime`.
"""
__version__ = "0.1.0"
