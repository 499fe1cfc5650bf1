"""Generated gRPC stubs for proto/segmentation.proto (make proto); do not edit."""
