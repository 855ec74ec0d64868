"""The HTTP API (``lipfarm api``): a thin shell over the functions the CLI calls, and the jobs page.

Why FastAPI: its OpenAPI document is generated from the same pydantic types that validate every
request and answer, so the document cannot drift from the code. The committed docs/openapi.json is
that document (a test fails when they differ), and the test suite's schemathesis run fuzzes the
live API from it. Uvicorn serves it (ASGI: uploads are read as streams, see ``uploads``).

One module per concern: ``app`` (assembly), ``context`` (the farm a request works with), ``auth``
(tokens), ``signing`` (signed URLs), ``uploads`` (streamed bodies with limits), ``errors`` (one JSON
shape for every refusal), ``params`` / ``submission`` (a submission's fields, idempotency),
``listing`` (pages of jobs), ``views`` (a job's JSON), ``model_cache`` and ``avatar_archive`` (models
by hash, archives to avatars), and the ``routes_*`` modules, each a group of endpoints.
"""
