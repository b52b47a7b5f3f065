"""Generated gRPC code (scripts/gen-proto.sh from proto/); do not edit."""
