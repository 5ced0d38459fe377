"""The cmdgate agent: verifies tokens, decides through two gates, runs templates, audits."""

import os

# A run's child execs at once, so gRPC's fork handlers have nothing to do; and when a
# run switches users (a plain fork, not vfork) they may crash the child while gRPC's
# threads are busy. Set before gRPC initialises, which happens after this import.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
