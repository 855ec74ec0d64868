"""Rendering one chunk: features, batched inference, compositing, segment encoding; its Celery tasks."""
