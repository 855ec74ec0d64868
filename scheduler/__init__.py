"""Job intake and planning, the finalizer, the reconciler and the local renderer."""
