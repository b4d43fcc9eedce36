"""Export stage: checkpoint -> fused ONNX model directory -> TensorRT engine.

Importing the package imports nothing heavy: `export.tensorrt_engine` (the engine builder; running an
engine is `server.tensorrt_runner`) is torch-free; the model-dir contract is `efficientad.model_dir`.
The server never imports this package; the torch-based modules (fused, onnx_export, parity, exporter) are
imported where they are needed.
"""
