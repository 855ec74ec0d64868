"""Settings of a lipfarm installation, read once from the environment.

Each setting has one environment variable, a default and a line saying what it does; docs/configuration.md's
settings table is generated from ``SETTINGS`` (``lipfarm config --markdown``) and a test keeps
the two in step. Settings say where things are and how hard a machine may work; what a render
looks like is ``RenderOptions``, fixed per job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lipfarm.common import defaults
from lipfarm.common.errors import InputError


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: object  # a value of ``kind``, or a string naming another setting (``<home>/storage``)
    kind: type
    doc: str

    @property
    def default_text(self) -> str:
        if isinstance(self.default, float) and self.default.is_integer():
            return str(int(self.default))
        return str(self.default)


SETTINGS = (
    Setting("home", "LIPFARM_HOME", defaults.HOME, Path,
            "Local state: imported avatars (avatars/), local renders' work files, caches."),
    Setting("storage_url", "LIPFARM_STORAGE_URL", "<home>/storage", str,
            "Object storage for jobs: a directory, file:///dir or s3://bucket[/prefix]."),
    Setting("broker_url", "LIPFARM_BROKER_URL", defaults.BROKER_URL, str,
            "Celery broker (Redis)."),
    Setting("redis_url", "LIPFARM_REDIS_URL", "<broker_url>", str,
            "Redis for job and chunk state (the same server as the broker by default)."),
    Setting("key_prefix", "LIPFARM_KEY_PREFIX", defaults.KEY_PREFIX, str,
            "Prefix of every Redis key lipfarm writes, so farms can share a Redis."),
    Setting("s3_endpoint_url", "LIPFARM_S3_ENDPOINT_URL", "", str,
            "S3 endpoint for non-AWS servers (MinIO, SeaweedFS); AWS_ENDPOINT_URL_S3 also works."),
    Setting("s3_region", "LIPFARM_S3_REGION", "", str, "S3 region; AWS_DEFAULT_REGION also works."),
    Setting("s3_access_key", "LIPFARM_S3_ACCESS_KEY_ID", "", str,
            "S3 access key; if unset, boto3's chain (AWS_ACCESS_KEY_ID, ~/.aws, roles)."),
    Setting("s3_secret_key", "LIPFARM_S3_SECRET_ACCESS_KEY", "", str, "S3 secret key (see above)."),
    Setting("precision", "LIPFARM_PRECISION", defaults.PRECISION, str,
            "Default precision of new renders and jobs: fp32, bf16 (OpenVINO), fp16 (CUDA) or auto."),
    Setting("backend", "LIPFARM_BACKEND", defaults.BACKEND, str,
            "Default inference backend: auto, cpu, openvino or cuda."),
    Setting("auto_min_psnr_db", "LIPFARM_AUTO_MIN_PSNR_DB", defaults.AUTO_MIN_PSNR_DB, float,
            "`--precision auto`: the lowest PSNR (dB, against fp32 on the job's model) a faster precision may "
            "have to be chosen; inf: output identical to fp32 only."),
    Setting("inference_threads", "LIPFARM_INFERENCE_THREADS", 0, int,
            "Inference threads per render process; 0 = the process's share of the CPU cores."),
    Setting("worker_concurrency", "LIPFARM_WORKER_CONCURRENCY", defaults.WORKER_CONCURRENCY, int,
            "Render processes per `lipfarm worker` (chunks rendered at once on one machine)."),
    Setting("cache_dir", "LIPFARM_CACHE_DIR", "<home>/cache", Path,
            "Worker cache of avatars and models, by content hash."),
    Setting("cache_max_gb", "LIPFARM_CACHE_MAX_GB", defaults.CACHE_MAX_GB, float,
            "Size bound of the worker cache; least recently used entries go first."),
    Setting("template_cache_frames", "LIPFARM_TEMPLATE_CACHE_FRAMES", defaults.TEMPLATE_CACHE_FRAMES, int,
            "Prepared template frames kept in memory per render process (~1.6 MB each at 720p)."),
    Setting("chunk_time_limit_s", "LIPFARM_CHUNK_TIME_LIMIT_S", defaults.CHUNK_TIME_LIMIT_S, int,
            "Hard time limit of one chunk task; the soft limit is 90% of it, the broker's "
            "visibility timeout twice it."),
    Setting("heartbeat_interval_s", "LIPFARM_HEARTBEAT_INTERVAL_S", defaults.HEARTBEAT_INTERVAL_S, float,
            "How often a rendering chunk renews its lease."),
    Setting("lease_s", "LIPFARM_LEASE_S", defaults.LEASE_S, float,
            "A chunk (or finalizer) whose lease is not renewed for this long is taken back."),
    Setting("max_attempts", "LIPFARM_MAX_ATTEMPTS", defaults.MAX_ATTEMPTS, int,
            "Attempts per chunk before the chunk, and its job, fail."),
    Setting("reconcile_interval_s", "LIPFARM_RECONCILE_INTERVAL_S", defaults.RECONCILE_INTERVAL_S, float,
            "How often the recovery pass runs (in every worker, taking turns, and `lipfarm reconcile --loop`)."),
    Setting("job_retention_s", "LIPFARM_JOB_RETENTION_S", defaults.JOB_RETENTION_S, float,
            "Seconds after its end that an ended job's records leave Redis (the recovery pass removes them; "
            "storage keeps them, and asking for the job brings it back). 0: never."),
    Setting("worker_reconcile", "LIPFARM_WORKER_RECONCILE", 1, int,
            "1: every worker also runs the recovery pass, taking turns (one pass per interval across the "
            "farm); 0: only `lipfarm reconcile --loop` does."),
    Setting("hold_dir", "LIPFARM_HOLD_DIR", "", str,
            "For debugging and tests: while `<job id>.<chunk>.hold` exists in this folder, that chunk pauses "
            "before its next batch (keeping its lease); the file may hold a frame count to reach first."),
    Setting("redis_tls_ca_file", "LIPFARM_REDIS_TLS_CA_FILE", "", str,
            "CA certificate (PEM) that `rediss://` broker and state servers are verified against; "
            "`?ssl_ca_certs=` in a URL wins. Unset: the system's CAs."),
    Setting("max_audio_s", "LIPFARM_MAX_AUDIO_S", defaults.MAX_AUDIO_S, float,
            "Longest audio accepted, in seconds: longer files are refused at submission (by what the "
            "container says) and at decoding (by what it holds). 0 = no limit."),
    Setting("api_max_audio_mb", "LIPFARM_API_MAX_AUDIO_MB", defaults.API_MAX_AUDIO_MB, float,
            "`lipfarm api`: largest audio upload (or storage object) a job accepts, in MB; larger ones get 413."),
    Setting("api_max_avatar_mb", "LIPFARM_API_MAX_AVATAR_MB", defaults.API_MAX_AVATAR_MB, float,
            "`lipfarm api`: largest avatar archive upload, in MB; larger ones get 413."),
    Setting("api_max_model_mb", "LIPFARM_API_MAX_MODEL_MB", defaults.API_MAX_MODEL_MB, float,
            "`lipfarm api`: largest ONNX model upload, in MB; larger ones get 413."),
    Setting("api_body_timeout_s", "LIPFARM_API_BODY_TIMEOUT_S", defaults.API_BODY_TIMEOUT_S, float,
            "`lipfarm api`: a request body that sends nothing for this many seconds is cut off (408), so a "
            "client that declares a body and never sends it does not hold a connection."),
    Setting("api_secret_key", "LIPFARM_API_SECRET", "", str,
            "`lipfarm api`: the secret that signs output URLs (HMAC-SHA256). Unset: a random one made once "
            "and kept in Redis, shared by every API process."),
    Setting("api_url_ttl_s", "LIPFARM_API_URL_TTL_S", defaults.API_URL_TTL_S, float,
            "`lipfarm api`: how long a signed output URL stays valid, in seconds."),
    Setting("archive_max_members", "LIPFARM_ARCHIVE_MAX_MEMBERS", defaults.ARCHIVE_MAX_MEMBERS, int,
            "Uploaded avatar archives: most files and folders one may hold."),
    Setting("archive_max_mb", "LIPFARM_ARCHIVE_MAX_MB", defaults.ARCHIVE_MAX_MB, float,
            "Uploaded avatar archives: most MB their members may declare together."),
    Setting("archive_max_ratio", "LIPFARM_ARCHIVE_MAX_RATIO", defaults.ARCHIVE_MAX_RATIO, float,
            "Uploaded avatar archives: the expansion ratio beyond which one is a decompression bomb."),
    Setting("webhook_secret_key", "LIPFARM_WEBHOOK_SECRET", "", str,
            "The secret that signs webhook events (HMAC-SHA256 in the `Lipfarm-Signature` header). Unset: "
            "events are sent unsigned and receivers cannot tell them from forgeries."),
    Setting("webhook_retry_s", "LIPFARM_WEBHOOK_RETRY_S", defaults.WEBHOOK_RETRY_S, float,
            "How long a job's webhook event is retried (from the job's end) before it is given up."),
    Setting("webhook_backoff_s", "LIPFARM_WEBHOOK_BACKOFF_S", defaults.WEBHOOK_BACKOFF_S, float,
            "Wait before a webhook's first retry; it doubles with each attempt (at most an hour)."),
    Setting("webhook_timeout_s", "LIPFARM_WEBHOOK_TIMEOUT_S", defaults.WEBHOOK_TIMEOUT_S, float,
            "How long one webhook POST may take (connect, send, answer) before it counts as failed."),
    Setting("outbound_allow", "LIPFARM_OUTBOUND_ALLOW", "", str,
            "CIDRs and host names (comma-separated) the farm may send webhooks to although they are "
            "inside a private network (loopback, RFC 1918, link-local...). Unset: only public addresses."),
    Setting("api_metrics_auth", "LIPFARM_API_METRICS_AUTH", 0, int,
            "`lipfarm api`: 1: `/metrics` needs an API token (a read-only one will do); 0: it is open, "
            "as Prometheus scrapes usually are (it holds counts only: no job ids, names or URLs)."),
    Setting("temp_dir", "LIPFARM_TEMP_DIR", "", str,
            "Where farm processes keep temporary folders (finalize work, chunk work, API uploads), each under a "
            "folder of its own process; those of dead processes are removed at every role's start. "
            "Unset: the system's temporary folder."),
    Setting("farm_id", "LIPFARM_FARM_ID", "", str,
            "This farm's id, stamped in every job it submits; a rebuild from storage adopts only its own farm's "
            "jobs. Unset: derived from the Redis URL and key prefix (the same after Redis loses its data); set it "
            "where hosts reach one Redis by different names."),
    Setting("allow_evicting_redis", "LIPFARM_ALLOW_EVICTING_REDIS", 0, int,
            "1: accept a Redis whose `maxmemory-policy` is not `noeviction` (it may drop some of lipfarm's keys "
            "and strand jobs); 0: every role refuses one at start (exit 5) and `/v1/health` answers 503."),
)


@dataclass(frozen=True)
class Settings:
    home: Path
    storage_url: str
    broker_url: str
    redis_url: str
    key_prefix: str
    s3_endpoint_url: str
    s3_region: str
    s3_access_key: str
    s3_secret_key: str
    precision: str
    backend: str
    auto_min_psnr_db: float
    inference_threads: int
    worker_concurrency: int
    cache_dir: Path
    cache_max_gb: float
    template_cache_frames: int
    chunk_time_limit_s: int
    heartbeat_interval_s: float
    lease_s: float
    max_attempts: int
    reconcile_interval_s: float
    job_retention_s: float
    worker_reconcile: int
    hold_dir: str
    redis_tls_ca_file: str
    max_audio_s: float
    api_max_audio_mb: float
    api_max_avatar_mb: float
    api_max_model_mb: float
    api_body_timeout_s: float
    api_secret_key: str
    api_url_ttl_s: float
    archive_max_members: int
    archive_max_mb: float
    archive_max_ratio: float
    webhook_secret_key: str
    webhook_retry_s: float
    webhook_backoff_s: float
    webhook_timeout_s: float
    outbound_allow: str
    api_metrics_auth: int
    temp_dir: str
    farm_id: str
    allow_evicting_redis: int

    @property
    def avatars_dir(self) -> Path:
        return self.home / "avatars"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    def s3_settings(self) -> dict:
        return {"endpoint_url": self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None,
                "region": self.s3_region or None,
                "access_key": self.s3_access_key or None, "secret_key": self.s3_secret_key or None}

    def threads_per_process(self, processes: int | None = None) -> int:
        """Inference threads for one render process: the setting, or an equal share of the cores."""
        from lipfarm.common.sysinfo import usable_cores

        if self.inference_threads > 0:
            return self.inference_threads
        return max(1, usable_cores() // max(1, processes or self.worker_concurrency))


def _parse(setting: Setting, raw: str):
    if setting.kind is Path:
        return Path(raw).expanduser()
    try:
        return setting.kind(raw)
    except ValueError:
        raise InputError(f"not a valid {setting.kind.__name__}", field=setting.env, found=raw) from None


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Settings from ``env`` (default ``os.environ``), with defaults for what is unset."""
    env = os.environ if env is None else env
    values: dict = {}
    for setting in SETTINGS:
        raw = env.get(setting.env, "")
        if raw == "":
            raw = (setting.default_text.replace("<home>", str(values.get("home", "")))
                   .replace("<broker_url>", str(values.get("broker_url", ""))))
        values[setting.name] = _parse(setting, raw)
    return Settings(**values)


def settings_markdown() -> str:
    """The settings table of docs/configuration.md."""
    rows = ["| setting | environment variable | default | what it does |", "| --- | --- | --- | --- |"]
    rows += [f"| {s.name} | `{s.env}` | {f'`{s.default_text}`' if s.default_text else '(unset)'} | {s.doc} |"
             for s in SETTINGS]
    return "\n".join(rows)
