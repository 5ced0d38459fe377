"""Generated from proto/cmdgate/v1/agent.proto: do not edit, run `make proto`."""
