"""Every default and contract constant of lipfarm, each with what it bounds.

Contract constants (the SyncTalk_2D numbers of docs/contract.md) are facts about the model family and
are not options. Tunables are defaults of ``RenderOptions`` or of the farm settings.
"""

# --- Audio features: the Wav2Lip mel that SyncTalk_2D's audio encoder was trained on -------------
SAMPLE_RATE_HZ = 16_000  # all features are computed from 16 kHz mono
PREEMPHASIS = 0.97  # y[n] = x[n] - 0.97 x[n-1]
N_FFT = 800  # 50 ms STFT window
HOP_SAMPLES = 200  # 12.5 ms hop: 80 mel frames per second
N_MELS = 80
MEL_FMIN_HZ = 55.0
MEL_FMAX_HZ = 7600.0
REF_LEVEL_DB = 20.0
MEL_FRAMES_PER_SECOND = 80
WINDOW_MEL_FRAMES = 16  # one encoder window spans 16 mel frames (200 ms)
EMBEDDING_SIZE = 512  # audio encoder output per window
FEATURE_CONTEXT_FRAMES = 8  # frame i reads padded feature rows i-8 .. i+7
AUDIO_INPUT_SHAPE = (32, 16, 16)  # [16, 512] reshaped in C order
# Encoder windows run in batches aligned to multiples of this, as the reference does (batch 64):
# a chunk then computes every window with exactly the same batch-mates as a whole-track run.
ENCODER_BATCH_WINDOWS = 64
# Mel frames are computed in blocks aligned to multiples of this, for the same reason.
MEL_BLOCK_FRAMES = 256

# --- Video ---------------------------------------------------------------------------------------
FPS = 25
ROI_RING_PX = 4  # the generated ROI sits inside a 4-px ring of the bicubic crop
MASK_ORIGIN_PX = 5  # cv2.rectangle(roi, (5, 5, roi - 10, roi - 15)) blacks out the mouth area

# --- Rendering options (RenderOptions defaults) ---------------------------------------------------
CHUNK_FRAMES = 250  # 10 s of video per chunk: long enough to amortise set-up, short to retry
# A fast start cuts the first chunks shorter, so the first playable segment of a job is ready a few
# seconds after a worker takes it (1 s, 2 s, 4 s, then chunk_frames each). Rounded to whole GOPs.
FAST_START = True
FAST_START_S = (1.0, 2.0, 4.0)
GOP_FRAMES = 25  # one keyframe per second; chunk boundaries must fall on keyframes
UNET_BATCH_FRAMES = 0  # 0 = by backend: the two below
# On a CPU the UNet's 320x320 convolutions already fill the cores: on the CI machine (AMX) batch 1
# ran 10% faster than 4 in fp32 (ONNX Runtime and OpenVINO) and bf16, with a third of the memory
# (0.5 GB against 1.5 GB at 320 px). A GPU needs large batches to be busy.
UNET_BATCH_FRAMES_CPU = 1
UNET_BATCH_FRAMES_GPU = 32
VIDEO_QP = 20  # constant quantiser: each GOP is a pure function of its frames (see worker/encode)
X264_PRESET = "superfast"  # within ~8% of veryfast's size here for a third less CPU
X264_THREADS = 1  # part of the bitstream, so fixed per job (not a worker setting)
AUDIO_BITRATE_BPS = 128_000
# How the video fits the avatar's template (common/syncmode.py): back and forth, as before sync modes.
SYNC_MODE = "bounce"
# Audio below 32 kHz is encoded to AAC at 48 kHz: an AAC frame (1024 samples) must end within a
# video frame of the video's end, which at 16 kHz (64 ms) it would not.
AAC_MIN_RATE_HZ = 32_000
AAC_LOW_RATE_TARGET_HZ = 48_000
PRECISION = "fp32"
BACKEND = "auto"
# --precision auto keeps candidates whose outputs are within this PSNR of fp32's on the job's own
# model (inf: bit-identical only). 40 dB on the 0..255 scale is an RMS error of 2.55 levels.
AUTO_MIN_PSNR_DB = 40.0

# --- Jobs --------------------------------------------------------------------------------------------
PRIORITIES = ("high", "normal", "low")  # queue order: every high chunk before any normal one
PRIORITY = "normal"

# --- Farm settings (common.config: each can be set by its environment variable) ---------------------
HOME = "~/.lipfarm"
BROKER_URL = "redis://127.0.0.1:6379/0"
KEY_PREFIX = "lipfarm"
WORKER_CONCURRENCY = 1
CACHE_MAX_GB = 20.0  # the worker's avatar and model cache; least recently used first out
CHUNK_TIME_LIMIT_S = 3600  # a chunk task is killed after this (soft limit at 90%)
# A worker that dies is noticed when its lease runs out (another host), or at once (this host: its
# process is gone). Lease + one reconcile interval bound the wait: 20 s, with room for 2 missed beats
# (and Redis outages shorter than the lease are ridden out).
HEARTBEAT_INTERVAL_S = 5.0
LEASE_S = 15.0  # a chunk (or finalizer) not heard from for this long is taken back
MAX_ATTEMPTS = 3  # attempts per chunk before the chunk, and its job, fail
RECONCILE_INTERVAL_S = 5.0
# A host whose clock is further than this from Redis's logs a warning (the farm runs on Redis's
# clock, so this is a sign of a host to fix, not a fault in its work).
CLOCK_DRIFT_WARN_S = 2.0
# How often (across the farm) the recovery pass looks for state Redis lost part of: it reads every
# listed job, so not on every pass.
REPAIR_INTERVAL_S = 60.0
# An ended job's records leave Redis this long after its end (they stay in storage, ended.json, and
# come back when the job is asked for): Redis holds the live farm, not its whole history.
JOB_RETENTION_S = 7 * 24 * 3600.0
# A failed attempt's chunk waits before its next one: 5 s, 10 s, 20 s, ... at most 60 s (common.retry).
RETRY_DELAY_S = 5.0
RETRY_DELAY_MAX_S = 60.0
# A chunk done before the planner has encoded its share of the audio waits this long for it.
AUDIO_PIECE_WAIT_S = 120.0
# Uploads are retried inside an attempt before it is given up: after 0.5 s, 1 s, 2 s.
UPLOAD_RETRIES = 3
UPLOAD_RETRY_DELAY_S = 0.5

# --- Resource bounds ------------------------------------------------------------------------------
TEMPLATE_CACHE_FRAMES = 512  # prepared template frames kept per worker process (~1.6 MB each at 720p)
# OpenVINO models compiled per batch size kept per session: a chunk meets two or three batch sizes
# (the full one, the last partial one), and compiling one takes a fraction of a second.
OPENVINO_COMPILED_MODELS = 4
PIPELINE_QUEUE_BATCHES = 3  # batches in flight between render stages; bounds memory
HELPER_THREAD_NICE = 10  # prepare/composite threads yield the cores to inference (Linux nice)

# --- Input bounds (security) ----------------------------------------------------------------------
# The longest audio a job or a local render accepts, once decoded. A few kilobytes of Opus or MP3
# silence can decode to hours of samples (and gigabytes of 16 kHz PCM in storage): the submit-time
# probe refuses a container that says it is longer, the decode stops as soon as it passes this.
MAX_AUDIO_S = 4 * 3600.0

# --- The HTTP API (lipfarm api) -------------------------------------------------------------------
API_HOST = "127.0.0.1"  # loopback unless asked: the API is a door into the farm
API_PORT = 8750
# Uploads are streamed to a temporary file and refused (413) as soon as they pass their bound.
API_MAX_AUDIO_MB = 500.0  # one audio file: 4 h of 256 kbit/s AAC, or 45 min of 48 kHz stereo WAV
API_MAX_AVATAR_MB = 2048.0  # one avatar archive: JPEG frames, ~100 KB each at 720p
API_MAX_MODEL_MB = 1024.0  # one ONNX model (UNet-328 is 48 MB in fp32)
API_FORM_FIELD_BYTES = 64 * 1024  # one non-file form field (a name, an option, a URL)
API_FORM_MAX_PARTS = 64  # parts of one multipart form
API_BODY_TIMEOUT_S = 30.0  # a request body that sends nothing for this long is cut off (408)
API_AUDIO_URL_TIMEOUT_S = 30.0  # audio_url: connecting, and each read, may take this long
API_AUDIO_URL_TOTAL_S = 300.0  # audio_url: the whole download may take this long (a trickling server is cut off)
API_KEEP_ALIVE_S = 5  # an idle connection (or one whose unread body never comes) is closed after this
API_URL_TTL_S = 6 * 3600.0  # a signed output URL (a <video>'s src, which cannot send a token) lives this long
API_PAGE_JOBS = 20  # jobs per page of GET /v1/jobs unless asked
API_MAX_PAGE_JOBS = 100
API_LIST_SCAN_JOBS = 2000  # job ids one page may look through for a state filter (then it returns a cursor)
IDEMPOTENCY_TTL_S = 24 * 3600  # an Idempotency-Key answers with its job for this long
IDEMPOTENCY_PENDING_S = 15 * 60  # a key whose request died mid-submission is free again after this
IDEMPOTENCY_RETRY_AFTER_S = 2  # Retry-After of a 409 for a key whose first request is still submitting
TENANT_QUEUED_RETRY_S = 30  # Retry-After of a 429 for a tenant at its limit of jobs not yet ended
# Avatar archives uploaded to the API are checked by common.archive before anything is written.
ARCHIVE_MAX_MEMBERS = 100_000  # a 30-minute dataset: 45,000 frames and as many landmark files
ARCHIVE_MAX_MB = 8192.0  # bytes all members may declare together
ARCHIVE_MAX_RATIO = 100.0  # expansion beyond this is a decompression bomb (JPEG frames barely compress)

# --- Webhooks (common.webhooks) -----------------------------------------------------------------------
# A job's end is POSTed to its webhook_url until the receiver answers 2xx: retries wait 5 s, 10 s,
# 20 s, ... (at most an hour, and less than the broker's visibility timeout), for a day at most.
WEBHOOK_RETRY_S = 24 * 3600.0
WEBHOOK_BACKOFF_S = 5.0
WEBHOOK_MAX_DELAY_S = 3600.0
WEBHOOK_TIMEOUT_S = 10.0  # one POST: connect, send, and the receiver's answer
WEBHOOK_TOLERANCE_S = 300.0  # receivers should refuse a signature whose timestamp is older than this

# --- Metrics (common.metrics) -------------------------------------------------------------------------
METRICS_PORT = 9808  # the port the deploy files give `lipfarm worker --metrics-port`
METRICS_ADDRESS = "127.0.0.1"  # loopback unless asked (containers pass --metrics-address 0.0.0.0)
