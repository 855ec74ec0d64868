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
MIN_LEVEL = 1e-5  # amplitude floor before dB (-100 dB)
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
PRECISION = "fp32"
BACKEND = "auto"

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
# A failed attempt's chunk waits before its next one: 5 s, 10 s, 20 s, ... at most 60 s (common.retry).
RETRY_DELAY_S = 5.0
RETRY_DELAY_MAX_S = 60.0
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
