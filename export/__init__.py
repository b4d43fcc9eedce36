"""Export stage: checkpoint -> fused ONNX model directory -> TensorRT engine.

Importing the package imports nothing heavy: `export.model_dir` and `export.tensorrt_engine` are torch-free
so that the server can use them; the torch-based modules (fused, onnx_export, parity, exporter) are imported
where they are needed.
"""
