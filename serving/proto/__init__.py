"""The public gRPC API's .proto and its generated code; `python -m serving.proto` regenerates it."""
