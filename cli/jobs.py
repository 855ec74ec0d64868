"""``lipfarm submit|status|jobs|cancel``: jobs on the farm.

A job id typed by a user is checked (``checked_part``) before anything else happens: it becomes part
of Redis keys and storage keys, so ``../x`` or ``a/b`` must be refused (exit 2), not looked up.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from lipfarm.common import defaults
from lipfarm.common.config import Settings
from lipfarm.common.storage import open_storage
from lipfarm.common.storage.layout import checked_part
from lipfarm.cli.options import add_model_flags, add_option_flags, models_from_args, options_from_args


def add_commands(commands) -> None:
    submit = commands.add_parser("submit", help="queue a render job on the farm")
    submit.add_argument("--avatar", required=True, help="name of an imported avatar")
    submit.add_argument("--audio", required=True, help="audio file (wav, flac, mp3, ogg, m4a, mp4, mov)")
    add_model_flags(submit)
    submit.add_argument("--priority", default=defaults.PRIORITY, choices=defaults.PRIORITIES)
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    submit.add_argument("--quiet", action="store_true", help="no progress bar with --wait")
    add_option_flags(submit)
    submit.set_defaults(func=cmd_submit)

    status = commands.add_parser("status", help="state, progress and output of a job")
    status.add_argument("job")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)

    jobs = commands.add_parser("jobs", help="recent jobs")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(func=cmd_jobs)

    cancel = commands.add_parser("cancel", help="cancel a job: nothing is published")
    cancel.add_argument("job")
    cancel.set_defaults(func=cmd_cancel)

    watch = commands.add_parser("watch", help="where to watch a job while it renders, and its progress")
    watch.add_argument("job")
    watch.set_defaults(func=cmd_watch)

    resume = commands.add_parser("resume", help="go on with a failed or cancelled job (committed chunks are kept)")
    resume.add_argument("job")
    resume.set_defaults(func=cmd_resume)


def cmd_submit(args, settings: Settings) -> int:
    from lipfarm.scheduler.submit import submit_job

    options = options_from_args(args, settings)
    encoder, generator = models_from_args(args, settings)
    handle = submit_job(settings, avatar=args.avatar, audio=Path(args.audio), encoder=encoder,
                        generator=generator, options=options, priority=args.priority)
    print(handle.job_id)
    if args.wait:
        status = handle.wait(show_progress=not args.quiet)
        print(f"done: {status.frames_total} frames in {status.elapsed_s:.1f} s; output: {status.output_location}")
    return 0


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def cmd_status(args, settings: Settings) -> int:
    from lipfarm.scheduler.submit import connect_farm

    checked_part(args.job, "job id")
    status = connect_farm(settings).status(args.job)
    if args.json:
        print(json.dumps(status.to_dict(), indent=2))
        return 0
    share = f" ({100 * status.frames_done / status.frames_total:.0f}%)" if status.frames_total else ""
    chunks = ", ".join(f"{state} {n}" for state, n in sorted(status.chunks.items())) or "not planned yet"
    print(f"job {status.job_id}: {status.state.value}")
    print(f"  avatar {status.avatar}, audio {status.audio}, priority {status.priority}")
    print(f"  frames {status.frames_done} / {status.frames_total}{share}; chunks: {chunks}")
    left = f", about {duration_text(status.eta_s)} left at the pace so far" if status.eta_s is not None else ""
    print(f"  elapsed {duration_text(status.elapsed_s)}{left}")
    for chunk in status.running:
        where = f"chunk {chunk.index} (frames {chunk.frames}) on {chunk.worker}, attempt {chunk.attempt}"
        if chunk.lease_expired:
            print(f"  stalled: {where}: no heartbeat for {duration_text(chunk.heartbeat_age_s)}, "
                  "its lease has run out and it will be taken back")
        else:
            print(f"  running: {where}: {chunk.frames_done} frames, "
                  f"heartbeat {duration_text(chunk.heartbeat_age_s)} ago")
    if status.playlist_key:
        print(f"  watch: {_playlist_location(settings, status)} (playable to {duration_text(status.playable_until_s)})")
    if status.output_location:
        print(f"  output: {status.output_location}")
    if status.reason and status.state.terminal and status.state.value != "done":
        print(f"  reason: {status.reason}")
    return 0


def cmd_jobs(args, settings: Settings) -> int:
    from lipfarm.scheduler.submit import connect_farm

    store = connect_farm(settings)
    ids = store.job_ids(args.limit)
    if not ids:
        print("no jobs")
        return 0
    print(f"{'job':<24} {'state':<11} {'frames':>15} {'priority':<8} {'submitted':<19} avatar / audio")
    for s in store.statuses(ids):
        job_id = s.job_id
        when = datetime.fromtimestamp(s.created_at).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{job_id:<24} {s.state.value:<11} {f'{s.frames_done}/{s.frames_total}':>15} "
              f"{s.priority:<8} {when:<19} {s.avatar} / {s.audio}")
    return 0


def cmd_cancel(args, settings: Settings) -> int:
    from lipfarm.scheduler.submit import JobHandle, connect_farm

    checked_part(args.job, "job id")
    store = connect_farm(settings)
    handle = JobHandle(args.job, store, open_storage(store.job(args.job).storage_url, settings))
    state = handle.status().state.value
    if handle.cancel():
        print(f"job {args.job} cancelled (was {state}); running chunks stop at their next batch")
        return 0
    print(f"job {args.job} already ended: {state}")
    return 0


def cmd_resume(args, settings: Settings) -> int:
    from lipfarm.scheduler.submit import JobHandle, connect_farm

    checked_part(args.job, "job id")
    store = connect_farm(settings)
    handle = JobHandle(args.job, store, open_storage(store.job(args.job).storage_url, settings))
    queued = handle.resume()
    print(f"job {args.job} resumed: {queued} chunks queued again" if queued else f"job {args.job} resumed")
    return 0


def _playlist_location(settings: Settings, status) -> str:
    """Where a player finds the job's playlist: a path for local storage; for S3, the API serves it
    with signed segment URLs (``lipfarm api``)."""
    storage = open_storage(settings.storage_url, settings)
    path = storage.local_path(status.playlist_key)
    return str(path) if path is not None else f"/v1/jobs/{status.job_id}/playlist.m3u8 on the API"


def cmd_watch(args, settings: Settings) -> int:
    """Print where to watch the job, then follow it until it ends (a progress bar of playable time)."""
    from tqdm import tqdm

    from lipfarm.scheduler.submit import connect_farm

    checked_part(args.job, "job id")
    store = connect_farm(settings)
    status = store.status(args.job)
    total_s = status.frames_total / defaults.FPS if status.frames_total else None
    shown = False
    with tqdm(total=total_s, unit="s", desc=f"{args.job} playable", dynamic_ncols=True,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s [{elapsed}]") as bar:
        while True:
            if status.playlist_key and not shown:
                tqdm.write(f"watch: {_playlist_location(settings, status)}")
                shown = True
            bar.total = status.frames_total / defaults.FPS or bar.total
            bar.n = status.playable_until_s
            bar.set_postfix_str(status.state.value)
            bar.refresh()
            if status.state.terminal:
                break
            time.sleep(1.0)
            status = store.status(args.job)
    print(f"job {args.job}: {status.state.value}" + (f"; output: {status.output_location}" if status.output_location else ""))
    return 0 if status.state.value == "done" else 6 if status.state.value == "failed" else 7
