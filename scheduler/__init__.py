"""Job intake and planning, the finalizer, the reconciler, the local renderer and the CLI."""
