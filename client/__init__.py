"""``lipfarm.client``: the farm's HTTP API from Python, on httpx, sync and async.

    from lipfarm.client import Client
    with Client("https://lipfarm.example.com", token="lf_...") as farm:
        job = farm.submit("talk.wav", avatar="demo")
        job = farm.wait(job.id, progress=lambda j: print(j.frames_done, "/", j.frames_total))
        farm.download(job, "talk.mp4")

Every refusal of the API raises ``ApiError`` (its status, code, message and field). This room imports
no other lipfarm room: it is what a user installs to talk to a farm.
"""

from lipfarm.client.errors import ApiError, WebhookSignatureError
from lipfarm.client.models import Job
from lipfarm.client.sync import Client
from lipfarm.client.async_client import AsyncClient
from lipfarm.client.webhooks import verify_webhook

__all__ = ["ApiError", "AsyncClient", "Client", "Job", "WebhookSignatureError", "verify_webhook"]
