"""lipfarm: a distributed, frame-parallel render farm for audio-driven lip-sync video.

The roles live in their own subpackages, each a folder at the top of the repository:
``lipfarm.common`` (what every role shares), ``lipfarm.job`` (a job's life in storage),
``lipfarm.worker``, ``lipfarm.scheduler``, ``lipfarm.api``, ``lipfarm.cli``, ``lipfarm.demo`` and
``lipfarm.benchmarks``.
"""
