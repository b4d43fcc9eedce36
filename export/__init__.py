"""Export stage: checkpoint -> fused ONNX model directory -> TensorRT engine.

Importing the package imports nothing heavy: `export.model_dir` (an alias of `efficientad.model_dir`) and
`export.tensorrt_engine` (the engine builder; its runner half is `server.tensorrt_runner`) are torch-free.
The server never imports this package; the torch-based modules (fused, onnx_export, parity, exporter) are
imported where they are needed.
"""
